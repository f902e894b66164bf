"""The launch bundle: a directory that explains itself.

  manifest.json          versions, spec, resolved plan, model facts, roles (rank -> program), passes run
  spec.yaml              the spec as compiled
  programs/NAME.json     a role's program (msc.ir JSON form) and programs/NAME.py, its readable code
  weights/NAME.json      a role's weight map: get_attr target -> {source, shape, dtype}
  constants.safetensors  small computed buffers (rotary tables)
  checkpoint/            the materialised random-weight checkpoint (random-weight specs only)
  launch/                local.sh (msc run) and torchrun_ROLE.sh per role process
"""
from __future__ import annotations

import json
import platform
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import yaml
from safetensors.torch import save_file

import msc
from msc.checkpoint import CheckpointReader, WeightEntry, stream_load
from msc.errors import MscError
from msc.ir import graph_from_json, graph_to_json

MANIFEST = "manifest.json"


def versions() -> dict[str, str]:
    import transformers

    return {
        "msc": msc.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _tp_note(role: dict) -> str:
    tp = role.get("tp")
    if not tp or tp["size"] == 1:
        return ""
    return f", tensor-parallel rank {tp['rank']} of {tp['size']} with ranks {tp['ranks']}"


def write_bundle(out: Path, *, manifest: dict, spec_dump: dict, programs: dict, constants: dict[str, torch.Tensor]) -> None:
    """Write everything but the checkpoint into `out` (an empty staging directory)."""
    (out / "programs").mkdir()
    (out / "weights").mkdir()
    (out / "launch").mkdir()
    for name, prog in programs.items():
        (out / "programs" / f"{name}.json").write_text(json.dumps(graph_to_json(prog.gm.graph)))
        (out / "programs" / f"{name}.py").write_text(prog.gm.code)
        wmap = {t: {"source": prog.weights[t], "shape": prog.shapes[t], "dtype": prog.dtypes[t]} for t in prog.weights}
        (out / "weights" / f"{name}.json").write_text(json.dumps(wmap, indent=1))
    save_file({k: v.contiguous() for k, v in constants.items()}, str(out / "constants.safetensors"))
    (out / "spec.yaml").write_text(yaml.safe_dump(spec_dump, sort_keys=False))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _write_launch_files(out, manifest)


def _write_launch_files(out: Path, manifest: dict) -> None:
    world = len(manifest["roles"])
    (out / "launch" / "local.sh").write_text(
        "#!/usr/bin/env bash\n# Start every role on this machine and generate for the prompts given as arguments.\n"
        'cd "$(dirname "$0")/.." && exec msc run . "$@"\n'
    )
    for role in manifest["roles"]:
        cmd = [
            "torchrun", "--nnodes", str(world), "--node-rank", str(role["rank"]), "--nproc-per-node", "1",
            "--master-addr", "${MSC_MASTER_ADDR:-127.0.0.1}", "--master-port", "${MSC_MASTER_PORT:-29511}",
            "-m", "msc.runtime.worker", "--bundle", "${MSC_BUNDLE:-$(dirname \"$0\")/..}",
        ]
        body = " ".join(c if c.startswith("$") else shlex.quote(c) for c in cmd)
        (out / "launch" / f"torchrun_{role['name']}.sh").write_text(
            f"#!/usr/bin/env bash\n# Role {role['name']} (rank {role['rank']} of {world}){_tp_note(role)}: run one of these per role,\n"
            f"# on the host that should run it. The attention roles also take --requests FILE --result FILE.\n{body} \"$@\"\n"
        )
    for f in (out / "launch").iterdir():
        f.chmod(0o755)


@dataclass
class Bundle:
    """A compiled bundle on disk, opened for running."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "Bundle":
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise MscError(f"{path} is not an msc bundle (no {MANIFEST}); make one with `msc compile SPEC -o {path}`")
        return cls(path, json.loads((path / MANIFEST).read_text()))

    @property
    def roles(self) -> list[dict]:
        return self.manifest["roles"]

    def checkpoint_dir(self) -> Path:
        ck = self.manifest["model"]["checkpoint"]
        if ck is None:
            raise MscError(
                f"bundle {self.path} was compiled for the meta device and has no weights; compile with device: cpu to run it"
            )
        p = Path(ck)
        return p if p.is_absolute() else self.path / p

    def load_program(self, name: str, device: str | torch.device = "cpu", *, reader: CheckpointReader | None = None,
                     progress: bool | None = None, random_weights: bool = False, seed: int = 0) -> fx.GraphModule:
        """Rebuild a role's GraphModule and read its weights (only its own tensors) from the checkpoint.

        Weights stream shard by shard onto `device` (see msc.checkpoint.stream_load), so the role's peak
        memory is about its own bytes. reader: a CheckpointReader of this bundle's checkpoint to use (its
        counters then say what was read); progress: a bar on stderr (None: when stderr is a terminal).
        random_weights: make the weights on `device` instead (msc.random_weights; needs no checkpoint).
        """
        from safetensors.torch import load_file

        graph = graph_from_json(json.loads((self.path / "programs" / f"{name}.json").read_text()), device)
        wmap = json.loads((self.path / "weights" / f"{name}.json").read_text())
        # the dtype recorded at compile time: the model's dtype for parameters, float32 for rotary tables
        entries = [WeightEntry(t, e["source"], e["shape"], getattr(torch, e["dtype"])) for t, e in wmap.items()]
        needs_constants = any("constant" in e.source for e in entries)
        constants = load_file(str(self.path / "constants.safetensors")) if needs_constants else {}
        if random_weights:
            from msc.random_weights import random_attrs

            return fx.GraphModule(random_attrs(graph, entries, constants, device, seed), graph)
        own = reader is None
        reader = CheckpointReader(self.checkpoint_dir()) if own else reader
        try:
            attrs = stream_load(reader, entries, device, constants=constants, label=f"program '{name}'", progress=progress)
        finally:
            if own:
                reader.close()
        return fx.GraphModule(attrs, graph)
