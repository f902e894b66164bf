#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels benchmarks/gpu_run.sh installs on the GPU machine (Python 3.12 there):
# transformers with its dependencies (so both machines run the same model code) and fastapi's closure for
# msc serve. Run once on a fresh checkout, then carry ".whl" in every device call.
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  transformers==5.25.0 huggingface_hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 kernels==0.19.1 hf-xet==1.8.0 \
  typer==0.29.2 rich==15.0.0 regex==2026.5.9 tqdm==4.70.1 click==8.5.1 shellingham==1.5.4 markdown-it-py==4.3.0 \
  mdurl==0.1.2 Pygments==2.20.0 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
  typing_extensions==4.15.0 fastapi==0.165.0 uvicorn==0.55.0 httpx==0.29.0 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 \
  sniffio==1.3.1 idna==3.21 certifi==2026.5.20 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.3 \
  prometheus_client==0.26.0 PyYAML==6.0.3 networkx==3.6.1
echo "$(ls .whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1))"
