"""msc's environment variables: one table (name, kind, default, what it does), and strict readers.

Every `MSC_*` variable msc reads is declared here; `msc env` prints the table with the values set now, and
docs/env.md is this table (a test keeps the two equal and checks that the code reads no undeclared name).

NOTE: a value msc does not understand is an error naming the variable and what it takes, never a silent
default: `MSC_OVERLAP=yes please` would otherwise quietly mean "off" (or "on") and a comparison run would
measure something other than what its author believed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from msc.errors import MscError


@dataclass(frozen=True)
class EnvVar:
    name: str
    kind: str  # "switch" | "choice" | "int" | "number" | "text"
    default: str  # as it would be written in the environment; "" for unset
    help: str
    choices: tuple[str, ...] = ()
    internal: bool = False  # set by msc for the processes it starts; not for users
    secret: bool = False  # never printed (msc env shows whether it is set)

    def describe_kind(self) -> str:
        if self.kind == "switch":
            return "1 / 0"
        if self.kind == "choice":
            return " / ".join(self.choices)
        return self.kind


_TRUE = ("1", "on", "true", "yes")
_FALSE = ("0", "off", "false", "no")

VARS: dict[str, EnvVar] = {v.name: v for v in [
    # --- what runs (kernels, graphs, fusions)
    EnvVar("MSC_OVERLAP", "switch", "",
           "overlap engine steps (schedule step n+1 while step n runs); default on for a colocated program on a "
           "GPU, off elsewhere (docs/engine.md, 'Overlapped steps')"),
    EnvVar("MSC_FUSE", "switch", "1", "the load-time fusions (msc/fusions.py); 0 keeps every program as stored"),
    EnvVar("MSC_FUSE_LINEARS", "switch", "",
           "fuse sibling linears (q/k/v, gate/up) at load; default on a GPU only"),
    EnvVar("MSC_NORM_KERNEL", "switch", "1", "the Triton RMSNorm kernel on a GPU; 0 runs the eager ops"),
    EnvVar("MSC_EXPERTS", "choice", "auto",
           "the experts' kernel: auto (fused Triton MoE on a GPU) or eager (the reference, for comparisons)",
           ("auto", "eager")),
    EnvVar("MSC_MOE_AUTOTUNE", "switch", "1",
           "tune the fused MoE's tiles on first use on a GPU without a tile table (cached on disk); role "
           "processes default to 0"),
    EnvVar("MSC_STAGE_GRAPHS", "choice", "off",
           "CUDA graphs for an attention role's compute between its communication ops (emulate: the same "
           "bookkeeping without CUDA, for tests)", ("off", "on", "emulate")),
    EnvVar("MSC_DEVICE_EXCHANGE", "choice", "auto",
           "the role processes' GPU-memory exchange (auto: under MPS or across GPUs with one replica)",
           ("auto", "on", "off")),
    EnvVar("MSC_PREFIX_CACHE", "switch", "",
           "automatic prefix caching of full KV pages; default: the spec's runtime.prefix_caching, else on "
           "unless the model has state layers"),
    EnvVar("MSC_STATE_PREFILL", "choice", "auto",
           "prompt steps of state layers (DeltaNet, Mamba, lightning): chunked forms or the token loop",
           ("auto", "chunked", "loop")),
    # --- communication
    EnvVar("MSC_M2N_HOST", "text", "127.0.0.1", "the address the M2N transports bind and announce"),
    EnvVar("MSC_SHM_SPIN_US", "number", "",
           "microseconds a shared-memory endpoint polls before sleeping on its doorbell (default by core count)"),
    EnvVar("MSC_RDMA_DEVICE", "text", "", "the RDMA device to open (default: the first one pyverbs lists)"),
    # --- a bundle's launch scripts (launch/*.sh read them)
    EnvVar("MSC_MASTER_ADDR", "text", "127.0.0.1", "launch/torchrun_<role>.sh: torchrun's rendezvous host"),
    EnvVar("MSC_MASTER_PORT", "int", "29511", "launch/torchrun_<role>.sh: torchrun's rendezvous port"),
    EnvVar("MSC_BUNDLE", "text", "", "launch/torchrun_<role>.sh: the bundle folder (default: the script's own)"),
    # --- files, serving, debugging
    EnvVar("MSC_CACHE_DIR", "text", "~/.cache/msc", "where the planner's costs and tuned MoE tiles are cached"),
    EnvVar("MSC_NO_CACHE", "switch", "0", "1 turns the planner's cost cache off"),
    EnvVar("MSC_API_KEY", "text", "", "msc serve / msc bench serve: the bearer key (as --api-key)",
           secret=True),
    EnvVar("MSC_PROFILE_DIR", "text", "", "a folder: every role process writes a cProfile dump there"),
    EnvVar("MSC_BENCH_PROFILE", "text", "", "msc bench m2n: a file prefix for per-rank cProfile dumps"),
    # --- set by msc for the processes it starts
    EnvVar("MSC_PARENT_PID", "int", "", "the launcher's pid; a role exits when it dies", internal=True),
    EnvVar("MSC_RUN_DIR", "text", "", "the run's folder (sockets, logs)", internal=True),
    EnvVar("MSC_RUN_TAG", "text", "", "the run's tag (names its shared-memory files)", internal=True),
    EnvVar("MSC_JOB_STORE", "text", "", "HOST:PORT of msc launch's job store", internal=True),
    EnvVar("MSC_NODE_RANK", "int", "", "this node's rank under msc launch", internal=True),
    EnvVar("MSC_FAULT_EXIT_ROLE", "text", "", "tests only: the role that exits on purpose", internal=True),
    EnvVar("MSC_FAULT_EXIT_AFTER", "int", "", "tests only: after how many steps it exits", internal=True),
]}


def _declared(name: str) -> EnvVar:
    try:
        return VARS[name]
    except KeyError:
        raise MscError(f"{name} is not one of msc's environment variables (msc/env.py)") from None


def raw(name: str) -> str | None:
    """The variable's text as set (None when unset or empty)."""
    _declared(name)
    value = os.environ.get(name)
    return value if value else None


def switch(name: str, overrides: dict | None = None) -> bool | None:
    """A switch's value: True / False as set (1 / on / true / yes, 0 / off / false / no), else its default
    (None when it has none: the caller decides). overrides: variables given to child processes, read first."""
    var = _declared(name)
    text = (overrides or {}).get(name) or os.environ.get(name) or var.default
    if not text:
        return None
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise MscError(f"{name}={text!r}: expected 1 / on / true / yes or 0 / off / false / no")


def choice(name: str) -> str:
    """A choice's value as set, else its default; anything outside its choices is refused."""
    var = _declared(name)
    text = (os.environ.get(name) or var.default).strip().lower()
    if text not in var.choices:
        raise MscError(f"{name}={os.environ.get(name)!r}: expected one of {', '.join(var.choices)}")
    return text


def text(name: str) -> str | None:
    """A text variable's value as set, else its declared default (None when it has none)."""
    return os.environ.get(name) or _declared(name).default or None


def _converted(name: str, convert, expected: str):
    value = text(name)
    if value is None:
        return None
    try:
        return convert(value)
    except ValueError:
        raise MscError(f"{name}={value!r}: expected {expected}") from None


def number(name: str) -> float | None:
    """A number variable's value (None when unset and without a default)."""
    return _converted(name, float, "a number")


def cache_dir() -> Path:
    """msc's on-disk cache (planner costs, tuned MoE tiles): MSC_CACHE_DIR, else ~/.cache/msc."""
    return Path(raw("MSC_CACHE_DIR") or Path.home() / ".cache" / "msc")


def integer(name: str) -> int | None:
    """An int variable's value (None when unset and without a default)."""
    return _converted(name, int, "a whole number")


def check_all() -> list[tuple[EnvVar, str | None, str | None]]:
    """Every declared variable with its value now and the error its value would raise (None when fine)."""
    rows = []
    for var in VARS.values():
        value = os.environ.get(name := var.name)
        error = None
        try:
            {"switch": switch, "choice": choice, "int": integer, "number": number, "text": raw}[var.kind](name)
        except MscError as e:
            error = str(e)
        rows.append((var, value, error))
    return rows


def markdown_table() -> str:
    """docs/env.md's table (users' variables first, then those msc sets for its own processes)."""
    lines = ["| variable | takes | default | what it does |", "|---|---|---|---|"]
    for internal in (False, True):
        for var in VARS.values():
            if var.internal == internal:
                who = " (set by msc)" if internal else ""
                lines.append(f"| `{var.name}`{who} | {var.describe_kind()} | {var.default or '—'} | {var.help} |")
    return "\n".join(lines) + "\n"
