#!/usr/bin/env bash
# One device call: set up msc on the lent GPU machine (its own torch and triton; pydantic and the CPU machine's
# transformers with its dependencies carried as wheels in .whl/ (made by benchmarks/gpu_wheels.sh), so both machines run the same model code), then run the stages named on the command line, logging each under $OUT.
#   bash benchmarks/gpu_run.sh enginetests enginestep benchserve pytest decodeprof flags prefill calib mla placement tests kerneltests moe attention e2e profile tune m2n rolestrace commtests ipcphases multidry servetests serveload prefixcache mpson mpsoff   (env: TUNE_TOKENS, TUNE_ARGS, MOE_TOKENS, E2E_ARGS ...)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# msc's source folders install under the msc package (pyproject's package-dir); link them the same way here
for d in backends passes models; do [ -e msc/$d ] || ln -s ../$d msc/$d; done
export PYTHONPATH=$PWD:${PYTHONPATH:-}
msc() { python3 -m msc.cli "$@"; }
TAG=${TAG:-}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
for stage in "$@"; do
  echo "=== $stage ($(date +%T))"
  case $stage in
    tests) python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/test_colocated_engine.py 2>&1 | tail -25 ;;
    kerneltests) python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels 2>&1 | tail -25 ;;
    commtests) python3 -m pytest -q -m gpu -p no:cacheprovider tests/comm 2>&1 | tail -25 ;;
    ipcphases) python3 benchmarks/cuda_ipc_phases.py --size ${PHASE_SIZE:-256KB} --out "$OUT/cuda_ipc_phases$TAG.json" 2>&1 | tail -9 ;;
    multidry) # benchmarks/multi_gpu.py on however many GPUs there are (role processes share them): a dry run
              python3 benchmarks/multi_gpu.py ${MULTI_ARGS:---gpus 4 --layers 2 --max-batch 32 --input-len 64 --output-len 16} \
                --out "$OUT/multi_gpu.json" 2>&1 | tee "$OUT/multi.log" | tail -14 ;;
    tune) python3 benchmarks/moe_kernel.py --tune --write-config ${TUNE_ARGS:-} --tokens ${TUNE_TOKENS:-16,64,256,1024,4096,8192} --out "$OUT/moe_kernel.json" 2>&1 | tee "$OUT/moe.log" | tail -14
          # only the table this run wrote (the newest): the other GPUs' tables are in git, and files back are few
          cp "$(ls -t backends/compute/moe_configs/*.json | head -1)" "$OUT/" ;;
    moe) python3 benchmarks/moe_kernel.py --tokens ${MOE_TOKENS:-16,64,256,1024,4096,8192} ${MOE_ARGS:-} --out "$OUT/moe_kernel.json" 2>&1 | tee "$OUT/moe.log" | tail -10
         # tiles tuned on first use (a GPU without a table): brought back beside the log
         find ~/.cache/msc/moe_tiles -name '*.json' -exec cp {} "$OUT/" \; 2>/dev/null ;;
    attention) python3 benchmarks/decode_attention.py ${ATT_ARGS:-} --out "$OUT/decode_attention.json" 2>&1 | tee "$OUT/attention.log" | tail -12 ;;
    decodeprof) python3 benchmarks/decode_profile.py ${DPROF_ARGS:-} --out "$OUT/decode_profile$TAG.json" 2>&1 | tail -${DPROF_TAIL:-40} ;;
    e2e) python3 benchmarks/e2e_decode.py ${E2E_ARGS:-} --out "$OUT/e2e_decode.json" 2>&1 | tee "$OUT/e2e.log" | tail -14 ;;
    m2n) msc bench m2n --device cuda --mn ${M2N_MN:-1} --scale ${M2N_SCALE:-0.5} -o "$OUT/m2n_gpu$TAG.json" --plot "$OUT/m2n_gpu$TAG.png" 2>&1 | tee "$OUT/m2n$TAG.log" | tail -20 ;;
    mpson) # the CUDA MPS control daemon up: processes on one GPU then share it instead of time-slicing it.
           # Stages after this one, until mpsoff, run under MPS (their files get the suffix _mps).
           export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
           mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
           nvidia-cuda-mps-control -d && echo "MPS daemon started" && TAG=_mps ;;
    mpsoff) echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; TAG= ;;
    servetests) python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_serving.py tests/test_paged_roles.py 2>&1 | tail -15 ;;
    serveload) python3 benchmarks/engine_step.py --parts roles,serve ${SERVE_ARGS:---batch 64 --m 1 --serve 64} \
                 --out "$OUT/serve_load$TAG.json" 2>&1 | tee "$OUT/serve_load$TAG.log" | tail -12 ;;
    enginestep) python3 benchmarks/engine_step.py ${ENGINE_ARGS:-} --out "$OUT/engine_step$TAG.json" 2>&1 | tee "$OUT/engine_step$TAG.log" | tail -20 ;;
    enginetests) python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine tests/test_serving.py tests/test_paged_roles.py tests/test_colocated_engine.py tests/kernels 2>&1 | tail -25 ;;
    benchserve) # msc serve (the role processes, random weights on the GPU) of a Mixtral-8x7B-shape bundle, loaded by
                # msc bench serve from a separate process (the reference's workload; env BS_LAYERS, BS_BATCH, BS_M, BS_REQUESTS)
          printf '%s\n' "model:" \
            "  config: {model_type: mixtral, vocab_size: 32000, hidden_size: 4096, intermediate_size: 14336," \
            "           num_hidden_layers: ${BS_LAYERS:-16}, num_attention_heads: 32, num_key_value_heads: 8," \
            "           num_local_experts: 8, num_experts_per_tok: 2, max_position_embeddings: 32768, rope_theta: 1000000.0}" \
            "  dtype: bfloat16" "device: meta" \
            "plan: {attention: {replicas: 1}, experts: {nodes: 1}, microbatches: ${BS_M:-1}, batch_size: ${BS_BATCH:-64}}" \
            "runtime: {timeout_s: 600, max_seq_len: 4096}" > /tmp/m8x7b.yaml
          rm -rf /tmp/m8x7b; msc compile /tmp/m8x7b.yaml -o /tmp/m8x7b > /dev/null || continue
          msc serve /tmp/m8x7b --random-weights --device cuda --port 8123 --no-access-log > "$OUT/serve$TAG.log" 2>&1 &
          SERVE_PID=$!
          for i in $(seq 600); do curl -sf localhost:8123/health > /dev/null && break; sleep 0.5; done
          msc bench serve --url http://127.0.0.1:8123 --concurrency ${BS_BATCH:-64} --num-requests ${BS_REQUESTS:-192} \
            --no-progress -o "$OUT/bench_serve$TAG.json" 2>&1 | tail -22
          kill -INT $SERVE_PID; wait $SERVE_PID; tail -2 "$OUT/serve$TAG.log" ;;
    pytest) # the whole log comes back as pytest.log (the tail alone loses all but the last traceback);
            # PYTEST_MARK (default gpu) selects by marker, PYTEST_K by name (-k); PYTEST_MARK= (empty) runs every test named, the kernel
            # tests that run on both a CPU and a GPU included
            # (pyproject's addopts deselect gpu tests; a -m given here replaces its -m)
            MARK=${PYTEST_MARK-gpu}
            timeout ${PYTEST_TIMEOUT:-560} python3 -m pytest -q -m "${MARK:-gpu or not gpu}" ${PYTEST_K:+-k "$PYTEST_K"} -p no:cacheprovider -rfE --tb=short \
              ${PYTEST_ARGS:-tests/engine} > "$OUT/pytest$TAG.log" 2>&1; echo "pytest rc $?"; tail -${PYTEST_TAIL:-30} "$OUT/pytest$TAG.log" ;;
    prefixcache) python3 benchmarks/prefix_cache.py ${PC_ARGS:---model mixtral --layers 8 --device cuda --system 1024 --unique 32 --new 16} \
                   --out "$OUT/prefix_cache$TAG.json" 2>&1 | tail -8 ;;
    placement) python3 benchmarks/expert_placement.py ${PLACEMENT_ARGS:-} --out "$OUT/expert_placement.json" 2>&1 | tail -14 ;;
    mla) python3 benchmarks/mla_decode.py ${MLA_ARGS:-} --out "$OUT/mla_decode.json" 2>&1 | tail -40 ;;
    calib) python3 benchmarks/plan_calibration.py ${CALIB_ARGS:-} --out "$OUT/plan_calibration.json" 2>&1 | tail -40 ;;
    prefill) python3 benchmarks/prefill_profile.py ${PREFILL_ARGS:-} --out "$OUT/prefill_profile.json" 2>&1 | tail -40 ;;
    flags) python3 benchmarks/device_flags_pingpong.py ${FLAGS_ARGS:-} --out "$OUT/device_flags$TAG.json" 2>&1 | tail -9 ;;
    rolestrace) python3 benchmarks/roles_trace.py ${ROLES_ARGS:-} --out "$OUT/roles_trace.json" 2>&1 | tee "$OUT/roles_trace.log" | tail -8 ;;
    profile) msc profile examples/mixtral-8x7b-h200.yaml ${PROFILE_ARGS:-} -o "$OUT/profile_mixtral_8x7b_h200.json" 2>&1 | tee "$OUT/profile.log" | tail -16 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== done ($(date +%T))"
