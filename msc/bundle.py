"""The launch bundle: a directory that explains itself.

  manifest.json          versions, spec, resolved plan, model facts, roles (rank -> program), passes run
  spec.yaml              the spec as compiled
  programs/NAME.json     a role's program (msc.ir JSON form) and programs/NAME.py, its readable code
  weights/NAME.json      a role's weight map: get_attr target -> {source, shape, dtype}
  constants.safetensors  small computed buffers (rotary tables)
  checkpoint/            the materialised random-weight checkpoint (random-weight specs only)
  checkpoint.json        what the bundle expects of a checkpoint: the tensors its weight maps read (name ->
                         dtype, shape) and the config.json keys that matter (msc.checkpoint.check_checkpoint)
  launch/                local.sh (msc run) and torchrun_ROLE.sh per role process

The manifest records a sha256 digest of every program JSON and weight map ("digests"); a program is
loaded only when its files still match (Bundle.read_checked).

Portable: no absolute host path is recorded. The checkpoint (`model.checkpoint`), the tokenizer folder
(`model.tokenizer`) and the spec's `model.path` (manifest and spec.yaml) are relative to the bundle folder,
so a bundle moved together with its checkpoint still runs; one moved without it runs with the checkpoint
given at launch (`--checkpoint PATH`, `resolve_checkpoint`), which is checked against checkpoint.json first.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import yaml
from safetensors.torch import save_file

import msc
from msc.checkpoint import EXPECTED_FILE, CheckpointReader, WeightEntry, check_checkpoint, stream_load
from msc.errors import MscError
from msc.ir import decode_dtype, graph_from_json, graph_to_json

MANIFEST = "manifest.json"
DIGESTS = "digests"  # manifest key: {"programs/NAME.json" | "weights/NAME.json": sha256 hex digest}
_PROGRAM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


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


def write_bundle(out: Path, *, manifest: dict, spec_dump: dict, programs: dict, constants: dict[str, torch.Tensor],
                 expected_checkpoint: dict | None = None) -> None:
    """Write everything but the checkpoint into `out` (an empty staging directory). expected_checkpoint:
    msc.checkpoint.checkpoint_expectations of the checkpoint compiled against (None: no checkpoint)."""
    (out / "programs").mkdir()
    (out / "weights").mkdir()
    (out / "launch").mkdir()
    digests: dict[str, str] = {}

    def put(rel: str, text: str) -> None:
        data = text.encode()
        (out / rel).write_bytes(data)
        digests[rel] = hashlib.sha256(data).hexdigest()

    for name, prog in programs.items():
        put(f"programs/{name}.json", json.dumps(graph_to_json(prog.gm.graph)))
        # the readable code, for people; what runs is always rebuilt from the checked JSON
        (out / "programs" / f"{name}.py").write_text(prog.gm.code)
        wmap = {t: {"source": prog.weights[t], "shape": prog.shapes[t], "dtype": prog.dtypes[t]} for t in prog.weights}
        put(f"weights/{name}.json", json.dumps(wmap, indent=1))
    if expected_checkpoint is not None:
        put(EXPECTED_FILE, json.dumps(expected_checkpoint))
    # NOTE: recorded in the caller's manifest dict, so a later rewrite of manifest.json (the compiler adds
    # compile_seconds) keeps them
    manifest[DIGESTS] = dict(sorted(digests.items()))
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
        # NOTE: PYTHONSAFEPATH: the role's interpreter does not put the current folder on sys.path, so no .py
        # file in the folder the script runs from can shadow an import
        body = "PYTHONSAFEPATH=1 " + " ".join(c if c.startswith("$") else shlex.quote(c) for c in cmd)
        (out / "launch" / f"torchrun_{role['name']}.sh").write_text(
            f"#!/usr/bin/env bash\n# Role {role['name']} (rank {role['rank']} of {world}){_tp_note(role)}: run one of these per role,\n"
            f"# on the host that should run it. The attention roles also take --requests FILE --result FILE.\n{body} \"$@\"\n"
        )
    for f in (out / "launch").iterdir():
        f.chmod(0o755)


def _plain_name(name: object) -> str:
    """`name` when it can only name a file inside programs/ or weights/ (no path separators, no '..')."""
    if not isinstance(name, str) or not _PROGRAM_NAME.fullmatch(name) or ".." in name:
        raise MscError(f"program name {str(name)[:80]!r} is not a plain file name (letters, digits, _ . -)")
    return name


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

    def checkpoint_dir(self, override: str | Path | None = None) -> Path:
        """The checkpoint folder to read (absolute): `override` (a checkpoint given at launch) when given, else
        the manifest's, relative to the bundle folder (an absolute one from an older msc is taken as it is).
        MscError, saying to pass --checkpoint, when the recorded one is not there. Not checked against the
        bundle's expectations: `resolve_checkpoint` does that."""
        if override is not None:
            return Path(override).expanduser().resolve()
        ck = self.manifest["model"]["checkpoint"]
        if ck is None:
            raise MscError(
                f"bundle {self.path} was compiled for the meta device and has no weights; compile with device: cpu to run it"
            )
        # NOTE: resolve(), not a lexical normpath: the relative path was computed from the bundle's real folder,
        # so '..' must be taken after the symlinks of the path the bundle is opened by
        p = Path(ck) if Path(ck).is_absolute() else (self.path / ck).resolve()
        if not p.is_dir():
            raise MscError(f"bundle {self.path} expects its checkpoint at {ck} (relative to the bundle), which is not "
                           f"there ({p}); pass --checkpoint PATH with the checkpoint folder")
        return p

    def checkpoint_expectations(self) -> dict | None:
        """What this bundle needs of a checkpoint (checkpoint.json, digest-checked), or None for a bundle
        written without one (meta compiles, older msc)."""
        if EXPECTED_FILE not in (self.manifest.get(DIGESTS) or {}):
            return None
        data = self.read_checked(EXPECTED_FILE)
        if not isinstance(data, dict) or not isinstance(data.get("tensors"), dict):
            raise MscError(f"{self.path / EXPECTED_FILE}: expected {{config, tensors}} as msc writes it")
        return data

    def read_checked(self, rel: str) -> object:
        """The parsed JSON of a program or weight map (`rel`: "programs/NAME.json", "weights/NAME.json"), once
        its bytes match the digest recorded at compile time; MscError naming the file otherwise."""
        digests = self.manifest.get(DIGESTS)
        if not isinstance(digests, dict):
            raise MscError(f"bundle {self.path} records no digests of its programs (made by an older msc); "
                           "compile it again")
        if rel not in digests:
            raise MscError(f"bundle {self.path} has no {rel} recorded at compile time; expected one of "
                           f"{', '.join(sorted(digests))}")
        try:
            data = (self.path / rel).read_bytes()
        except OSError as e:
            raise MscError(f"{self.path / rel}: cannot read it: {e.strerror}") from None
        if hashlib.sha256(data).hexdigest() != digests[rel]:
            what = "program" if rel.startswith("programs/") else "weight map"
            raise MscError(f"{what} {rel} of bundle {self.path} was modified after compilation: digest mismatch; "
                           "compile the bundle again")
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:
            raise MscError(f"{self.path / rel}: not valid JSON ({str(e)[:80]})") from None

    def program_graph(self, name: str, device: str | torch.device = "cpu") -> fx.Graph:
        """A role's program rebuilt from its checked JSON (digest, allow-listed targets, fixed tables): the
        graph that runs, without its weights."""
        rel = f"programs/{_plain_name(name)}.json"
        data = self.read_checked(rel)
        try:
            graph = graph_from_json(data, device, source=f"{self.path / rel}")
        except RecursionError:
            raise MscError(f"{self.path / rel}: arguments are nested too deeply to be a program msc wrote") from None
        from msc.fusions import fuse_program

        fuse_program(graph)  # RMSNorm (+ the residual add), rotary, as single ops; MSC_FUSE=0 keeps the graph as stored
        return graph

    def weight_entries(self, name: str) -> list[WeightEntry]:
        """A role's weight map (checked against its digest) as WeightEntry rows, dtypes from a fixed table."""
        rel = f"weights/{_plain_name(name)}.json"
        wmap = self.read_checked(rel)
        if not isinstance(wmap, dict) or not all(isinstance(e, dict) and {"source", "shape", "dtype"} <= set(e)
                                                 for e in wmap.values()):
            raise MscError(f"{self.path / rel}: expected a mapping of weight name -> {{source, shape, dtype}}")
        # the dtype recorded at compile time: the model's dtype for parameters, float32 for rotary tables
        return [WeightEntry(t, e["source"], e["shape"], decode_dtype(e["dtype"], f"{rel}: weight '{t}'"))
                for t, e in wmap.items()]

    def load_program(self, name: str, device: str | torch.device = "cpu", *, reader: CheckpointReader | None = None,
                     progress: bool | None = None, random_weights: bool = False, seed: int = 0,
                     checkpoint: str | Path | None = None) -> fx.GraphModule:
        """Rebuild a role's GraphModule and read its weights (only its own tensors) from the checkpoint.

        Weights stream shard by shard onto `device` (see msc.checkpoint.stream_load), so the role's peak
        memory is about its own bytes. reader: a CheckpointReader of this bundle's checkpoint to use (its
        counters then say what was read); progress: a bar on stderr (None: when stderr is a terminal).
        random_weights: make the weights on `device` instead (msc.random_weights; needs no checkpoint).
        checkpoint: the checkpoint folder to read instead of the bundle's own (see checkpoint_dir; the caller
        checks it first with resolve_checkpoint).
        """
        from safetensors.torch import load_file

        graph = self.program_graph(name, device)
        entries = self.weight_entries(name)
        needs_constants = any("constant" in e.source for e in entries)
        constants = load_file(str(self.path / "constants.safetensors")) if needs_constants else {}
        from msc.fusions import fuse_weights

        if random_weights:
            from msc.random_weights import random_attrs

            gm = fx.GraphModule(random_attrs(graph, entries, constants, device, seed), graph)
            fuse_weights(gm, device)  # sibling linears as one (on a GPU)
            return gm
        own = reader is None
        reader = CheckpointReader(self.checkpoint_dir(checkpoint)) if own else reader
        try:
            attrs = stream_load(reader, entries, device, constants=constants, label=f"program '{name}'", progress=progress)
        finally:
            if own:
                reader.close()
        gm = fx.GraphModule(attrs, graph)
        del attrs  # NOTE: the fusion frees the originals it concatenates only when nothing else holds them
        fuse_weights(gm, device)
        return gm


def resolve_checkpoint(bundle: Bundle, given: str | Path | None) -> str | None:
    """The checkpoint folder a run of `bundle` reads, as an absolute path, checked against the bundle before
    anything starts: `given` (--checkpoint PATH) when set, else the bundle's own, relative to its folder.

    None for a bundle that has no checkpoint (compiled for the meta device; it runs with random weights)
    when none is given. MscError, one line, when the folder is missing (with a hint to pass --checkpoint),
    holds no safetensors, or differs from what the bundle was compiled against (the first difference: a
    config.json key, a missing tensor, another shape or dtype). What `msc run`, `msc serve` and `msc launch`
    call; the result goes to the role processes as the run config's "checkpoint".
    """
    expected = bundle.checkpoint_expectations()
    if bundle.manifest["model"].get("checkpoint") is None:
        if given is None:
            return None
        raise MscError(f"bundle {bundle.path} was compiled without a checkpoint (device: meta), so it cannot check "
                       f"--checkpoint {given} against one; compile it with model.path or run it with --random-weights")
    path = bundle.checkpoint_dir(given)
    if expected is None:  # NOTE: a bundle from before checkpoint.json: only the folder itself can be checked
        CheckpointReader(path).close()
        return str(path)
    return str(check_checkpoint(path, expected))
