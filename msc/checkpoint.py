"""Checkpoints: materialising a random-weight model once, and reading a role's share of a checkpoint.

A weight source (stored per parameter in a role's weight map) says how to build one graph parameter
from checkpoint tensors:
  {"key": K}                      the tensor K
  {"key": K, "rows": [a, b]}      rows a..b-1 of K (an expert node's slice of a fused experts tensor)
  {"stack": [[K1, K2], [K3, K4]]} stack over experts of the concatenation (dim 0) of each group
  {"constant": NAME}              a small computed buffer stored in the bundle (rotary tables)
Only the named tensors (or rows) are read from disk: safetensors slices are lazy.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from msc.errors import MscError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def materialize_random(config, seed: int, dtype: torch.dtype, out_dir: Path) -> Path:
    """Build the transformers model with random weights from `seed` and save it as a real checkpoint."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


class CheckpointReader:
    """Lazy access to the tensors of a Hugging Face safetensors checkpoint (single file or sharded)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise MscError(f"checkpoint directory does not exist: {self.dir}")
        if (self.dir / INDEX).is_file():
            index = json.loads((self.dir / INDEX).read_text())
            self.key_to_file = {k: self.dir / f for k, f in index["weight_map"].items()}
        elif (self.dir / SINGLE).is_file():
            with safe_open(self.dir / SINGLE, "pt") as f:
                self.key_to_file = {k: self.dir / SINGLE for k in f.keys()}
        else:
            raise MscError(f"no {SINGLE} or {INDEX} in checkpoint directory {self.dir} (msc reads safetensors only)")
        self._open: dict[Path, object] = {}

    def keys(self) -> set[str]:
        return set(self.key_to_file)

    def _file(self, key: str):
        if key not in self.key_to_file:
            raise MscError(f"checkpoint {self.dir} has no tensor '{key}'")
        path = self.key_to_file[key]
        if path not in self._open:
            self._open[path] = safe_open(path, "pt")
        return self._open[path]

    def shape(self, key: str) -> list[int]:
        return list(self._file(key).get_slice(key).get_shape())

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        sl = self._file(key).get_slice(key)
        return sl[rows[0] : rows[1]] if rows is not None else sl[:]

    def build(self, source: dict, constants: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Materialise one graph parameter from its weight source (see module docstring)."""
        if "constant" in source:
            return constants[source["constant"]]
        if "stack" in source:
            return torch.stack([torch.cat([self.read(k) for k in group], dim=0) for group in source["stack"]])
        rows = tuple(source["rows"]) if "rows" in source else None
        return self.read(source["key"], rows)

    def source_shape(self, source: dict) -> list[int]:
        """The shape `build(source)` would have, from headers only (no tensor is read)."""
        if "stack" in source:
            groups = source["stack"]
            first = [self.shape(k) for k in groups[0]]
            return [len(groups), sum(s[0] for s in first), *first[0][1:]]
        shape = self.shape(source["key"])
        if "rows" in source:
            shape[0] = source["rows"][1] - source["rows"][0]
        return shape

    def close(self) -> None:
        self._open.clear()
