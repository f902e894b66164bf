"""The model spec (`model.yaml`): what to compile, where it runs, and the deployment plan.

Validation is pydantic's; errors are turned into one line per problem naming the key, the file and
line it came from, and what was expected.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from msc.errors import MscError

DType = Literal["float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """Either `path` (a local Hugging Face checkpoint directory) or `config` (a transformers config:
    `model_type` plus overrides) built with random weights from `seed`."""

    path: Optional[str] = None
    config: Optional[dict[str, Any]] = None
    seed: int = 0
    dtype: DType = "float32"

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of model.path (a checkpoint directory) or model.config (a transformers config)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a 'model_type' (for example: mixtral)")
        return self


class AttentionPlan(_Strict):
    replicas: Optional[int] = Field(default=None, ge=1)
    tp: Optional[int] = Field(default=None, ge=1)


class ExpertPlan(_Strict):
    nodes: Optional[int] = Field(default=None, ge=1)
    tp: Optional[int] = Field(default=None, ge=1)


class PlanSpec(_Strict):
    """Deployment plan; fields left unset take defaults (later: the planner's choice)."""

    attention: AttentionPlan = Field(default_factory=AttentionPlan)
    experts: ExpertPlan = Field(default_factory=ExpertPlan)
    microbatches: Optional[int] = Field(default=None, ge=1, le=8)
    batch_size: Optional[int] = Field(default=None, ge=1)


class PassEntry(_Strict):
    name: str
    config: dict[str, Any] = Field(default_factory=dict)


class DelaySpec(_Strict):
    """Simulated compute per layer and step, for tests and demos of the pipeline on slow hardware: each
    micro-batch of a step waits its even share (a step split into m micro-batches waits delay/m per
    micro-batch and layer, as real compute time splits with the batch)."""

    attention: float = Field(default=0.0, ge=0)
    expert: float = Field(default=0.0, ge=0)


class RuntimeSpec(_Strict):
    # auto: shared memory when every role is on one host (cuda_ipc for GPU roles), tcp across hosts.
    transport: Literal["auto", "shm", "tcp", "cuda_ipc", "rdma", "torch_dist"] = "auto"
    timeout_s: float = Field(default=60.0, gt=0)
    # Per-pair receive buffer of the shm / cuda_ipc transports; larger messages stream through it.
    buffer_bytes: int = Field(default=4 << 20, ge=4096)
    # Injected delay in milliseconds per layer (see DelaySpec); zero in real deployments.
    delay_ms: DelaySpec = Field(default_factory=DelaySpec)
    # The attention side's KV cache is paged on every device (the engine allocates pages on demand);
    # "auto" and "paged" mean the same and are kept so that older specs still load.
    kv_cache: Literal["auto", "paged"] = "auto"
    # The longest sequence (prompt + new tokens) a request may have; default: the model's
    # max_position_embeddings, at most 4096.
    max_seq_len: Optional[int] = Field(default=None, ge=1)
    # The token budget of one engine step: prompt chunks and decode tokens together.
    max_step_tokens: int = Field(default=8192, ge=1)
    # The KV pool of each attention replica, in tokens; default: batch_size sequences of max_seq_len,
    # capped at a quarter of the device's memory (1 GiB on the CPU).
    kv_cache_tokens: Optional[int] = Field(default=None, ge=1)


class PoolSpec(_Strict):
    """GPUs of one type: `gpu` names a catalogue entry (msc/planner/gpus.yaml or `hardware.catalogue`)."""

    gpu: str
    count: int = Field(ge=1)
    per_node: int = Field(default=8, ge=1)


class HardwareSpec(_Strict):
    """The GPUs the planner may use: one pool for both sides (`pool`), or one per side (heterogeneous)."""

    pool: Optional[PoolSpec] = None
    attention: Optional[PoolSpec] = None
    experts: Optional[PoolSpec] = None
    catalogue: Optional[str] = None  # a YAML file adding or replacing GPU types
    overrides: dict[str, dict[str, float]] = Field(default_factory=dict)  # {"H20": {"price_per_hour": 1.1}}


class WorkloadSpec(_Strict):
    input_len: int = Field(default=571, ge=1)
    output_len: int = Field(default=159, ge=1)
    tpot_ms: float = Field(default=150.0, gt=0)


class Spec(_Strict):
    model: ModelSpec
    device: Literal["cpu", "cuda", "meta"] = "cpu"
    plan: PlanSpec = Field(default_factory=PlanSpec)
    passes: Optional[list[PassEntry]] = None
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    hardware: Optional[HardwareSpec] = None  # for `msc plan`
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    planner: dict[str, Any] = Field(default_factory=dict)  # Efficiency overrides, objective, profile path


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (k.value,)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _describe(err: dict, model_cls: type[BaseModel]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        parent = _model_at(model_cls, err["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent is not None else "?"
        return f"unknown key (expected one of: {allowed})"
    if kind == "missing":
        return "required key is missing"
    got = err.get("input")
    return f"{msg} (got {got!r})" if not isinstance(got, dict) else msg


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        ann = getattr(ann, "__args__", (ann,))[0] if getattr(ann, "__origin__", None) is not None else ann
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def parse_spec(data: Any, source: str = "<spec>", text: str | None = None) -> Spec:
    """Validate a spec given as a dict; raise MscError with one line per problem."""
    if not isinstance(data, dict):
        raise MscError(f"{source}: the spec must be a mapping with at least a 'model' key, got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        where = _yaml_lines(text) if text else {}
        out = []
        for err in e.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            key = ".".join(str(p) for p in loc) or "(top level)"
            line = next((where[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in where), None)
            pos = f"{source}:{line}" if line else source
            out.append(f"{pos}: key '{key}': {_describe(err, Spec)}")
        raise MscError("; ".join(out)) from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a `model.yaml` (safe YAML only)."""
    path = Path(path)
    if not path.is_file():
        raise MscError(f"spec file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MscError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    spec = parse_spec(data, str(path), text)
    # A relative checkpoint path is relative to the spec file, as a user reading the file expects.
    if spec.model.path is not None and not Path(spec.model.path).is_absolute():
        spec.model.path = str((path.parent / spec.model.path).resolve())
    return spec


DEFAULT_SPEC_YAML = """\
# The embedded default: a tiny random-weight Mixtral, 1 attention process and 2 expert processes on CPU.
model:
  config: {model_type: mixtral, vocab_size: 256, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
           num_attention_heads: 4, num_key_value_heads: 2, num_local_experts: 4, num_experts_per_tok: 2}
  seed: 0
  dtype: float32
device: cpu
plan:
  experts: {nodes: 2}
"""


def default_spec() -> Spec:
    return parse_spec(yaml.safe_load(DEFAULT_SPEC_YAML), "<default spec>", DEFAULT_SPEC_YAML)
