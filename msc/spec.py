"""The model spec (`model.yaml`): what to compile, where it runs, and the deployment plan.

Validation is pydantic's; errors are turned into one line per problem naming the key, the file and
line it came from, and what was expected.
"""
from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from msc.errors import MscError

DType = Literal["float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    # NOTE: strict: a YAML `true` or `"8"` is not the integer 1 or 8 (pydantic would coerce both); an int
    # is still accepted where a float is expected. Infinities and NaN are refused: no setting means them.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


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
    # A role silent for longer than this (no heartbeat: stopped, wedged) is reported by name and the run or
    # the server's requests fail (msc.runtime.lifecycle); the transports' own waits are bounded by timeout_s.
    heartbeat_timeout_s: float = Field(default=5.0, gt=0)
    # Automatic prefix caching: full KV pages found again by their tokens (a shared system prompt, the turns
    # of a chat) are attached instead of computed. Default (None): on, except for models with state layers,
    # whose recurrent state is not in pages; MSC_PREFIX_CACHE=0 / 1 overrides.
    prefix_caching: Optional[bool] = None


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
    tpot_ms: float = Field(default=150.0, gt=0, allow_inf_nan=False)


class Spec(_Strict):
    model: ModelSpec
    device: Literal["cpu", "cuda", "meta"] = "cpu"
    plan: PlanSpec = Field(default_factory=PlanSpec)
    passes: Optional[list[PassEntry]] = None
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    hardware: Optional[HardwareSpec] = None  # for `msc plan`
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    planner: dict[str, Any] = Field(default_factory=dict)  # Efficiency overrides, objective, profile path


# ---------------------------------------------------------------------------------------------- YAML
# NOTE: a spec is a few kilobytes of a few levels; these bounds are far above any real one and far below
# what makes a parser, pydantic or a later walk over the spec (manifest, cache key) slow.
MAX_SPEC_BYTES = 1 << 20
MAX_DEPTH = 50
MAX_EXPANDED_VALUES = 10_000
_MAX_PROBLEMS = 8  # validation problems listed in the one-line message; the rest are counted


def _short(value: Any, limit: int = 60) -> str:
    """repr(value) on one line, cut to `limit` characters: messages never echo a large input back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses deep nesting while composing and duplicate keys while constructing.

    Aliases are checked between the two steps (`_check_expansion`), on the composed node graph, before any
    Python object is built from it."""

    def __init__(self, text: str, source: str):
        super().__init__(text)
        self._source, self._depth = source, 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise MscError(f"{self._source}:{line}: the YAML nests deeper than {MAX_DEPTH} levels; "
                               "a spec is a few levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self._refuse_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_duplicates(self, node: yaml.MappingNode) -> None:
        # NOTE: only the mapping's own keys: a key that overrides one brought in by a `<<: *merge` is what
        # merge keys are for, and flatten_mapping (called by the base class next) resolves it.
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in first:
                    raise MscError(f"{self._source}:{line}: duplicate key {_short(key)} (first at line {first[key]}); "
                                   "a key may appear once in a mapping")
                first[key] = line
            except TypeError:  # unhashable: the base class refuses it with its own message
                continue


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a node graph whose aliases expand to more than MAX_EXPANDED_VALUES values or MAX_DEPTH levels,
    or refer to themselves.

    NOTE: aliases are allowed (sharing a block is a fair use of YAML) but counted before expansion: the
    expanded size and depth of each distinct node are computed once (memoised, an iterative post-order walk),
    so a 1 KB alias bomb that expands to billions of values costs as much to refuse as it has nodes."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    entered: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        key = id(node)
        if leaving:
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            line = node.start_mark.line + 1
            if size[key] > MAX_EXPANDED_VALUES:
                raise MscError(f"{source}:{line}: the YAML aliases here expand to more than {MAX_EXPANDED_VALUES} "
                               "values; a spec needs far fewer (write the values out or use fewer aliases)")
            if depth[key] > MAX_DEPTH:
                raise MscError(f"{source}:{line}: the YAML aliases here nest deeper than {MAX_DEPTH} levels; "
                               "a spec is a few levels deep")
            continue
        if key in size:
            continue
        if key in entered:  # entered, not left: the node is inside itself
            raise MscError(f"{source}:{node.start_mark.line + 1}: a YAML alias refers to the block that contains it; "
                           "a spec cannot be recursive")
        entered.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node))


def _yaml_error(e: yaml.YAMLError, source: str, text: str) -> MscError:
    """One line for a YAML syntax error, with the line it is on."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        line = mark.line + 1
    elif isinstance(e, yaml.reader.ReaderError):
        line = text.count("\n", 0, e.position) + 1
    else:
        line = None
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    what = _one_line(f"{problem} ({context})" if context else problem)
    return MscError(f"{source}:{line}: not valid YAML: {what}" if line else f"{source}: not valid YAML: {what}")


def load_yaml_text(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """(data, line of each key path) of a spec's YAML text; MscError (one line) for anything a spec cannot be:
    a syntax error, nesting deeper than MAX_DEPTH, aliases expanding beyond MAX_EXPANDED_VALUES, a duplicate key.

    Composed first (nodes, no Python objects), checked, then constructed by the same safe loader."""
    loader = None
    try:
        loader = _SpecLoader(text, source)  # the reader refuses control characters here
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _check_expansion(node, source)
        return loader.construct_document(node), _node_lines(node)
    except yaml.YAMLError as e:
        raise _yaml_error(e, source, text) from None
    except RecursionError:  # NOTE: the depth bounds above should make this unreachable; a guard, not the check
        raise MscError(f"{source}: the YAML nests too deeply to read; a spec is a few levels deep") from None
    finally:
        if loader is not None:
            loader.dispose()


def _node_lines(root: yaml.Node | None) -> dict[tuple, int]:
    """Map each key path of a composed document to its 1-based line number.

    A block reached again through an alias is not walked again (paths inside it fall back to the line of
    the alias), so the walk is linear in the document, whatever its aliases expand to."""
    lines: dict[tuple, int] = {}
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, tuple]] = [(root, ())] if root is not None else []
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    p = path + (k.value,)
                    lines.setdefault(p, k.start_mark.line + 1)
                    stack.append((v, p))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines.setdefault(path + (i,), v.start_mark.line + 1)
                stack.append((v, path + (i,)))
    return lines


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line number ({} when the text does not load)."""
    try:
        return load_yaml_text(text, "<spec>")[1]
    except MscError:
        return {}


def read_spec_text(path: Path) -> str:
    """The text of a spec file: bounded in size, UTF-8, no NUL bytes; MscError (one line) otherwise."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise MscError(f"{path}: cannot read the spec file: {e.strerror or e}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise MscError(f"{path}: the spec file is larger than {MAX_SPEC_BYTES >> 20} MiB; a model.yaml is a few "
                       "kilobytes of YAML text")
    if b"\0" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\0")) + 1
        raise MscError(f"{path}:{line}: the spec file holds a NUL byte: it looks like a binary file, not YAML text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise MscError(f"{path}:{line}: the spec file is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                       f"{e.start}); expected a YAML text file") from None


# ---------------------------------------------------------------------------------------------- validation
def _key_text(part: Any) -> str:
    """One part of a key path as printed: printable and short (a key may be any YAML scalar)."""
    text = str(part)
    if not text.isprintable() or len(text) > 40:
        text = _short(text, 40)[1:-1] if isinstance(part, str) else _short(part, 40)
    return text


def _describe(err: dict, model_cls: type[BaseModel]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        parent = _model_at(model_cls, err["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent is not None else "?"
        return f"unknown key (expected one of: {allowed})"
    if kind == "missing":
        return "required key is missing"
    got = err.get("input")
    return _one_line(f"{msg} (got {_short(got)})" if not isinstance(got, dict) else msg)


def _unwrap(ann: Any) -> Any:
    """The annotation without Optional[...]."""
    if get_origin(ann) in (Union, UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The spec model at key path `loc` (list indices step into a list's items), or None."""
    ann: Any = cls
    for part in loc:
        ann = _unwrap(ann)
        if isinstance(part, int) and get_origin(ann) is list:
            ann = get_args(ann)[0]
            continue
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)) or not isinstance(part, str):
            return None
        field = ann.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
    ann = _unwrap(ann)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def parse_spec(data: Any, source: str = "<spec>", text: str | None = None,
               lines: dict[tuple, int] | None = None) -> Spec:
    """Validate a spec given as a dict; raise MscError, one line naming each problem's key and line.

    `lines` (key path -> line number) places the problems; without it they are looked up in `text`."""
    if data is None:
        raise MscError(f"{source}: the spec is empty; it needs at least a 'model' key")
    if not isinstance(data, dict):
        raise MscError(f"{source}: the spec must be a mapping with at least a 'model' key, got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        where = lines if lines is not None else (_yaml_lines(text) if text else {})
        out = []
        errors = e.errors()
        for err in errors[:_MAX_PROBLEMS]:
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            key = ".".join(_key_text(p) for p in loc) or "(top level)"
            line = next((where[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in where), None)
            pos = f"{source}:{line}" if line else source
            out.append(f"{pos}: key '{key}': {_describe(err, Spec)}")
        if len(errors) > _MAX_PROBLEMS:
            out.append(f"and {len(errors) - _MAX_PROBLEMS} more problems")
        raise MscError("; ".join(out)) from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a `model.yaml` (safe YAML only; bounded in size, nesting and alias expansion)."""
    path = Path(path)
    if not path.is_file():
        raise MscError(f"spec file not found: {path}")
    text = read_spec_text(path)
    data, lines = load_yaml_text(text, str(path))
    spec = parse_spec(data, str(path), lines=lines)
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
    data, lines = load_yaml_text(DEFAULT_SPEC_YAML, "<default spec>")
    return parse_spec(data, "<default spec>", lines=lines)
