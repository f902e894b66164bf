"""The GPU catalogue: datasheet figures and prices of the GPU types the planner can deploy on, as data.

The built-in catalogue is `gpus.yaml` beside this module (read with yaml.safe_load; each entry is
documented there, with the assumptions behind its network figure and price). Users extend it without
touching code:

    load_catalogue()                                   # the built-in GPUs
    load_catalogue("my_gpus.yaml")                     # + new GPU types, or known ones replaced whole
    load_catalogue(overrides={"H20": {"price_per_hour": 1.1}})   # change single figures of known GPUs

An extra catalogue (file or dict) has the built-in format, ``{"gpus": [{"name": ..., <figures>}, ...]}``;
a bare list of entries, or a mapping ``{name: {<figures>}}`` under ``gpus``, is accepted too.

Every figure must be a finite number > 0; a bad one raises MscError naming the GPU, the key and what was
expected. Names are matched case-insensitively everywhere (`get_gpu`, replacements, overrides).

Public API: ``GPU``, ``load_catalogue``, ``get_gpu``, ``BUILTIN_CATALOGUE``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from msc.errors import MscError

BUILTIN_CATALOGUE = Path(__file__).with_name("gpus.yaml")

# NOTE: strict numbers: a YAML string such as "312" or a boolean is an error, not silently converted.
_FIGURE = dict(gt=0, strict=True, allow_inf_nan=False)


class GPU(BaseModel):
    """One GPU type. Catalogue units (TFLOP/s, GB/s, GiB, Gb/s, USD/h); the properties give SI units."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    bf16_tflops: float = Field(**_FIGURE)  # dense bf16 peak, TFLOP/s
    mem_bw_gbs: float = Field(**_FIGURE)  # memory bandwidth, GB/s (1e9 B/s)
    mem_gib: float = Field(**_FIGURE)  # memory capacity, GiB
    nic_gbps: float = Field(**_FIGURE)  # network bandwidth per GPU, Gb/s (1e9 bit/s)
    nvlink_gbs: float = Field(**_FIGURE)  # intra-node GPU-GPU bandwidth per direction, GB/s
    price_per_hour: float = Field(**_FIGURE)  # USD per GPU-hour (an assumption: override it)

    @property
    def flops(self) -> float:
        """Dense bf16 peak, FLOP/s."""
        return self.bf16_tflops * 1e12

    @property
    def mem_bw(self) -> float:
        """Memory bandwidth, bytes/s."""
        return self.mem_bw_gbs * 1e9

    @property
    def mem_bytes(self) -> float:
        """Memory capacity, bytes."""
        return self.mem_gib * 2**30

    @property
    def nic_bw(self) -> float:
        """Network bandwidth per GPU, bytes/s."""
        return self.nic_gbps * 1e9 / 8

    @property
    def nvlink_bw(self) -> float:
        """Intra-node GPU-to-GPU bandwidth per direction, bytes/s."""
        return self.nvlink_gbs * 1e9


FIGURES = tuple(k for k in GPU.model_fields if k != "name")


def _expected(field: str) -> str:
    return "a non-empty string" if field == "name" else "a number > 0"


def _validate(entry: Any, where: str) -> GPU:
    """One catalogue entry -> GPU, or MscError with one line naming the GPU, the key and what was expected."""
    if not isinstance(entry, dict):
        raise MscError(f"{where}: a GPU entry is {type(entry).__name__} {entry!r}: expected a mapping with "
                       f"name, {', '.join(FIGURES)}")
    name = entry.get("name")
    label = f"GPU '{name}'" if isinstance(name, str) and name else "a GPU entry"
    try:
        return GPU.model_validate(entry)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "?"
        if err["type"] == "extra_forbidden":
            raise MscError(f"{where}: {label}: unknown key '{key}' (expected keys: name, {', '.join(FIGURES)})") from None
        if err["type"] == "missing":
            raise MscError(f"{where}: {label}: missing key '{key}' (expected {_expected(key)})") from None
        raise MscError(f"{where}: {label}: {key} = {err.get('input')!r}: expected {_expected(key)}") from None


def _entries(data: Any, where: str) -> list[Any]:
    """The list of GPU entries in a catalogue document (see the module docstring for the accepted forms)."""
    if isinstance(data, dict) and "gpus" in data:
        extra = sorted(set(data) - {"gpus"})
        if extra:
            raise MscError(f"{where}: unknown top-level key(s) {', '.join(map(str, extra))} (expected only 'gpus')")
        data = data["gpus"]
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        out = []
        for name, figures in data.items():
            if not isinstance(figures, dict):
                raise MscError(f"{where}: GPU '{name}' is {type(figures).__name__} {figures!r}: expected a mapping of figures")
            out.append({"name": str(name), **figures})
        return out
    raise MscError(f"{where}: expected a mapping with a 'gpus' list of GPU entries, got {type(data).__name__}")


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MscError(f"GPU catalogue {path} does not exist") from None
    except OSError as e:
        raise MscError(f"cannot read GPU catalogue {path}: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise MscError(f"GPU catalogue {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None


def _add(catalogue: dict[str, GPU], entries: list[Any], where: str) -> None:
    seen: set[str] = set()
    for entry in entries:
        gpu = _validate(entry, where)
        key = gpu.name.lower()
        if key in seen:
            raise MscError(f"{where}: GPU '{gpu.name}' is listed twice")
        seen.add(key)
        for old in [k for k in catalogue if k.lower() == key]:  # replace a known GPU whole
            del catalogue[old]
        catalogue[gpu.name] = gpu


def load_catalogue(extra: str | Path | dict | None = None, overrides: dict[str, dict] | None = None) -> dict[str, GPU]:
    """The GPU catalogue, name -> GPU.

    extra: a YAML file (path) or an already-parsed dict/list in the catalogue format; its entries add new GPU
    types or replace known ones whole (names compared case-insensitively).
    overrides: {gpu name: {figure: value}}, applied last, changing single figures of GPUs in the catalogue.
    """
    catalogue: dict[str, GPU] = {}
    _add(catalogue, _entries(_read_yaml(BUILTIN_CATALOGUE), str(BUILTIN_CATALOGUE)), str(BUILTIN_CATALOGUE))
    if extra is not None:
        if isinstance(extra, (str, Path)):
            path = Path(extra)
            _add(catalogue, _entries(_read_yaml(path), f"GPU catalogue {path}"), f"GPU catalogue {path}")
        elif isinstance(extra, (dict, list)):
            _add(catalogue, _entries(extra, "extra GPU catalogue"), "extra GPU catalogue")
        else:
            raise MscError(f"extra GPU catalogue is {type(extra).__name__}: expected a YAML path or a dict")
    for name, changes in (overrides or {}).items():
        gpu = _lookup(str(name), catalogue, "GPU override")
        if not isinstance(changes, dict):
            raise MscError(f"GPU override for '{name}' is {type(changes).__name__} {changes!r}: expected a mapping "
                           f"of figures ({', '.join(FIGURES)})")
        if "name" in changes:
            raise MscError(f"GPU override for '{name}' changes its name: overrides change figures only "
                           f"({', '.join(FIGURES)})")
        catalogue[gpu.name] = _validate({**gpu.model_dump(), **changes}, "GPU override")
    return catalogue


def get_gpu(name: str, catalogue: dict[str, GPU]) -> GPU:
    """The catalogue entry called `name` (case-insensitive); MscError listing the known GPUs if none is."""
    return _lookup(name, catalogue, "GPU")


def _lookup(name: str, catalogue: dict[str, GPU], what: str) -> GPU:
    want = str(name).lower()
    for key, gpu in catalogue.items():
        if key.lower() == want:
            return gpu
    raise MscError(f"{what}: unknown GPU '{name}' (known GPUs: {', '.join(sorted(catalogue, key=str.lower))})")
