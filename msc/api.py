"""The Python API for custom models: mark a hand-written nn.Module MoE and compile it with `msc.compile`.

msc needs three things from a model to disaggregate it: where attention reads and writes its KV cache
(the runtime owns the cache), where the routing decision is made (it runs on the attention side), and
which weights the experts read (they move to the expert nodes). A transformers model tells msc these
through its family adapter (models/); a user's own module tells it with:

    msc.attention(q, k, v, layer=i)                    call it in the attention block instead of SDPA
    @msc.router                                        on the router module (optional: checks its output)
    @msc.experts(gate_up="gate_up", down="down")       on the experts module

    bundle = msc.compile(model, {"experts": {"nodes": 2}}, "out/")

The contract (what msc's runtime runs):
  model.forward(input_ids [1, T], position_ids [1, T]) -> logits [1, T, V]   (all sequences of a step
      packed along T; position_ids restart at 0 for each sequence)
  msc.attention(q [1, nh, T, d], k [1, nkv, T, d], v [1, nkv, T, dv], layer=l) -> [1, T, nh, dv]:
      causal per sequence over the cache; layers numbered 0..L-1, one call per layer
  router.forward(...) -> (weights [T, K] float32, index [T, K] int64)
  experts.forward(hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H], SiLU-gated:
      gate_up [E, 2I, H] (gate rows, then up rows), down [E, H, I]

Outside a compile, everything runs as the user wrote it: `msc.attention` falls back to plain causal
attention over the q/k/v it is given (no cache), and the experts module runs its own forward. Inside
`msc.compile` the model is traced with torch.export (non-strict, real weights, a dynamic T); while it is,
`msc.attention` emits `msc::attention` and each marked experts module's forward is swapped for
`msc::experts` over its named parameters. After capture, the back half is the same as for a spec
(msc.compiler.lower_and_write): the default pass pipeline, roles, bundle. The module's parameters are
saved as the bundle's checkpoint (`checkpoint/model.safetensors`, keys = parameter names); its buffers
(rotary tables) go to `constants.safetensors`.

For modules whose class cannot be decorated, `msc.mark_experts(module, ...)` and `msc.mark_router(module)`
mark one instance.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

import msc.ops  # noqa: F401  (registers torch.ops.msc.*)
from msc.errors import MscError

M = TypeVar("M", bound=type)

_EXPERTS_MARK = "__msc_experts__"
_ROUTER_MARK = "__msc_router__"
_DEFAULT_FORWARD = "__msc_default_forward__"

# NOTE: a context variable rather than a module attribute on the model: `msc.attention` is a plain
# function called deep inside user code, and only knows whether msc is tracing through this flag.
_capturing: contextvars.ContextVar[bool] = contextvars.ContextVar("msc_capturing", default=False)


# ============================================================================================ attention
def attention(q: Tensor, k: Tensor, v: Tensor, *, layer: int, scaling: float | None = None, sliding_window: int = -1) -> Tensor:
    """The marked attention: msc owns the KV cache. Call it where the model would call SDPA.

    q [B, nh, T, d], k [B, nkv, T, d], v [B, nkv, T, dv] (rotary already applied) -> [B, T, nh, dv]
    (note: heads after tokens, ready for `.reshape(B, T, nh * dv)`). `layer` numbers the attention
    layers 0..L-1 (one call each); `scaling` defaults to d ** -0.5; `sliding_window` -1 means none.

    Compiled (B = 1): `msc::attention`, causal per sequence over the runtime's cache. Eager, with no msc
    runtime installed: plain causal attention over the given q/k/v, as one sequence per batch row.
    """
    if scaling is None:
        scaling = q.shape[-1] ** -0.5
    if _capturing.get() or _runtime_installed():
        return torch.ops.msc.attention(q, k, v, int(layer), float(scaling), int(sliding_window))
    return _causal_attention(q, k, v, float(scaling), int(sliding_window))


def _runtime_installed() -> bool:
    from msc.runtime import context

    try:
        context.current()
    except RuntimeError:
        return False
    return True


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, scaling: float, sliding_window: int) -> Tensor:
    """Reference attention without a cache: q [B, nh, T, d], k/v [B, nkv, S, d] (S >= T, the queries are the
    last T positions) -> [B, T, nh, dv]."""
    t, s = q.shape[-2], k.shape[-2]
    q_pos = torch.arange(s - t, s, device=q.device)[:, None]  # [T, 1]
    k_pos = torch.arange(s, device=q.device)[None, :]  # [1, S]
    allowed = k_pos <= q_pos  # [T, S]
    if sliding_window > 0:
        allowed &= k_pos > q_pos - sliding_window
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=True)  # [B, nh, T, dv]
    return out.transpose(1, 2)  # [B, T, nh, dv]


# ============================================================================================ marks
@dataclass(frozen=True)
class ExpertsMark:
    """What `@msc.experts` records: the experts' weight attributes and where the layer number lives."""

    gate_up: str  # attribute holding [E, 2I, H]: gate rows, then up rows
    down: str  # attribute holding [E, H, I]
    layer_attr: str = "layer_idx"  # instance attribute with the MoE layer number (else: from the module path)
    layer: int | None = None  # an explicit layer number (msc.mark_experts)


def experts(cls: M | None = None, *, gate_up: str = "gate_up", down: str = "down", layer_attr: str = "layer_idx"):
    """Class decorator for a user's experts module: `@msc.experts` or `@msc.experts(gate_up=..., down=...)`.

    The module's forward(hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H] runs as
    written outside a compile; under `msc.compile` it becomes `msc::experts` over the parameters named by
    `gate_up` ([E, 2I, H], gate rows then up rows) and `down` ([E, H, I]), SiLU-gated. msc checks at
    compile time that both compute the same thing. A class without a forward gets msc::experts itself.
    The MoE layer number is the instance attribute `layer_attr` if set, else the last number in the
    module's path (`layers.3.moe.experts` -> 3), else the module's position among the marked ones.
    """
    mark = ExpertsMark(gate_up=gate_up, down=down, layer_attr=layer_attr)

    def decorate(c: M) -> M:
        _check_module_class(c, "@msc.experts")
        setattr(c, _EXPERTS_MARK, mark)
        if c.forward is nn.Module.forward:  # no forward of its own: msc's implementation is the eager one too
            def forward(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
                m = getattr(self, _EXPERTS_MARK)
                return torch.ops.msc.experts(hidden, top_k_index, top_k_weights, getattr(self, m.gate_up),
                                             getattr(self, m.down), 0, 0)  # [T, H]

            setattr(forward, _DEFAULT_FORWARD, True)
            c.forward = forward
        return c

    return decorate(cls) if cls is not None else decorate


def router(cls: M) -> M:
    """Class decorator for a user's router module: its forward must return (weights [T, K] float32,
    index [T, K] int64). It is captured inline (it runs on the attention side); the mark adds a check
    of that contract on every call, eager or traced, so a wrong dtype is an error naming the module."""
    _check_module_class(cls, "@msc.router")
    setattr(cls, _ROUTER_MARK, True)
    cls.forward = _checked_router_forward(cls.forward, cls.__name__)
    return cls


def mark_experts(module: nn.Module, *, gate_up: str = "gate_up", down: str = "down", layer: int | None = None) -> nn.Module:
    """Mark one experts module instance (the registration form of `@msc.experts`); returns it."""
    if not isinstance(module, nn.Module):
        raise MscError(f"msc.mark_experts expects an nn.Module, got {type(module).__name__}")
    object.__setattr__(module, _EXPERTS_MARK, ExpertsMark(gate_up=gate_up, down=down, layer=layer))
    return module


def mark_router(module: nn.Module) -> nn.Module:
    """Mark one router module instance (the registration form of `@msc.router`); returns it."""
    if not isinstance(module, nn.Module):
        raise MscError(f"msc.mark_router expects an nn.Module, got {type(module).__name__}")
    if not getattr(module, _ROUTER_MARK, False):
        object.__setattr__(module, _ROUTER_MARK, True)
        bound, cls_name = module.forward, type(module).__name__

        def forward(*args, **kwargs):
            out = bound(*args, **kwargs)
            _check_router_output(out, cls_name)
            return out

        module.forward = forward
    return module


def _check_module_class(cls: Any, what: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise MscError(f"{what} decorates nn.Module classes, got {cls!r}")


def _checked_router_forward(fwd: Callable, cls_name: str) -> Callable:
    @functools.wraps(fwd)
    def forward(self, *args, **kwargs):
        out = fwd(self, *args, **kwargs)
        _check_router_output(out, cls_name)
        return out

    return forward


def _check_router_output(out: Any, cls_name: str) -> None:
    want = "must return (weights [T, K] float32, index [T, K] int64)"
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
        raise MscError(f"router {cls_name} {want}, got {type(out).__name__}")
    w, i = out
    if w.dtype != torch.float32 or i.dtype != torch.int64:
        raise MscError(f"router {cls_name} {want}, got weights {w.dtype} and index {i.dtype}")
    if w.dim() != 2 or i.dim() != 2 or w.shape[1] != i.shape[1]:
        raise MscError(f"router {cls_name} {want}, got shapes {tuple(w.shape)} and {tuple(i.shape)}")


# ============================================================================================ compile
@dataclass
class _MarkedExperts:
    path: str
    module: nn.Module
    mark: ExpertsMark
    layer: int


def compile(
    model: nn.Module,
    spec_or_plan: Any = None,
    out_dir: str | Path | None = None,
    *,
    example_tokens: int = 5,
    eos_token_id: int | list[int] | None = None,
    progress: Callable[[str], None] | None = None,
):
    """Compile a marked custom MoE module into a launch bundle at `out_dir` (atomic); returns the `Bundle`.

    spec_or_plan: None (default plan), a plan dict (`{"experts": {"nodes": 2}, "microbatches": 2}`), a spec
    dict without `model:` (`{"plan": ..., "runtime": {...}, "passes": [...]}`), or an `msc.spec.Spec`
    (its `model:` section is replaced by this module). example_tokens: the T of the example input that
    torch.export traces with (T itself stays dynamic). eos_token_id: stops generation (default: the
    model's `eos_token_id` attribute, if any).
    """
    from msc.capture import Captured
    from msc.checkpoint import CheckpointReader
    from msc.compiler import Lowering, check_out_dir, lower_and_write, staged_output
    from msc.bundle import Bundle
    from msc.plan import resolve_plan

    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise MscError(f"msc.compile expects an nn.Module, got {type(model).__name__}")
    if out_dir is None:
        raise MscError("msc.compile needs out_dir, the directory to write the bundle to")
    if not isinstance(example_tokens, int) or example_tokens < 2:
        raise MscError(f"example_tokens must be an integer >= 2, got {example_tokens!r}")
    cls_name = type(model).__name__
    _check_forward_signature(model)
    dtype = _model_dtype(model)
    spec = _custom_spec(spec_or_plan, cls_name, dtype)
    if spec.device == "meta":
        raise MscError("device: meta cannot be used with msc.compile: the module's own weights are the checkpoint")
    marked = _find_experts(model)
    moe_params = _experts_shape(marked)
    for e in marked:
        _check_experts_math(e)
    plan = resolve_plan(spec.plan, moe_params["num_experts"])
    out_dir = check_out_dir(out_dir)

    with staged_output(out_dir) as stage:
        say("saving the module's parameters as the checkpoint")
        aliases = _save_parameters(model, stage / "checkpoint")
        say("capturing with torch.export (the module's own weights)")
        t_cap = time.perf_counter()
        gm, constants = _export(model, marked, example_tokens)
        facts = _graph_facts(gm, cls_name, marked)
        if facts["num_experts"] != moe_params["num_experts"] or facts["hidden_size"] != moe_params["hidden_size"]:
            raise MscError(f"{cls_name}: the traced experts calls read weights of another shape than the marked "
                           f"modules hold ({facts} vs {moe_params})")
        moe = {k: facts[k] for k in ("num_experts", "top_k", "hidden_size", "intermediate_size")}
        from msc.ir import graph_meta

        graph_meta(gm)["capture"] = {"model_class": cls_name, "num_moe_layers": facts["num_moe_layers"]}
        captured = Captured(gm, constants, facts["num_moe_layers"], time.perf_counter() - t_cap)
        eos = eos_token_id if eos_token_id is not None else getattr(model, "eos_token_id", None)
        model_entry = {
            "model_type": f"custom:{cls_name}",
            "dtype": dtype,
            "checkpoint": "checkpoint",
            "num_hidden_layers": facts["num_hidden_layers"],
            "num_moe_layers": facts["num_moe_layers"],
            "vocab_size": facts["vocab_size"],
            "eos_token_id": eos,
            "tokenizer": None,  # a user's module brings no tokenizer: token ids only
            **moe,
            "python_class": f"{type(model).__module__}.{type(model).__qualname__}",
        }
        job = Lowering(spec=spec, plan=plan, moe=moe, model=model_entry, captured=captured,
                       adapter=_ParameterSource(aliases), checkpoint=CheckpointReader(stage / "checkpoint"))
        lower_and_write(stage, job, say, t0)
    return Bundle.open(out_dir)


# -------------------------------------------------------------------------------------------- checks
def _check_forward_signature(model: nn.Module) -> None:
    cls_name = type(model).__name__
    want = (f"{cls_name}.forward must take (input_ids [1, T], position_ids [1, T]) and return logits [1, T, V] "
            "(msc packs every sequence of a step along T)")
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        raise MscError(f"{want}; its signature cannot be read") from None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in positional[:2]]
    required_rest = [p.name for p in params[2:] if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if names != ["input_ids", "position_ids"] or params[:2] != positional[:2] or required_rest:
        sig = "(" + ", ".join(p.name for p in params) + ")"
        raise MscError(f"{want}; it takes {sig}")


def _model_dtype(model: nn.Module) -> str:
    from msc.capture import DTYPES

    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(floats) != 1:
        found = ", ".join(sorted(str(d).removeprefix("torch.") for d in floats)) or "none"
        raise MscError(f"{type(model).__name__}: msc needs every floating-point parameter in one dtype, found: {found}")
    name = str(floats.pop()).removeprefix("torch.")
    if name not in DTYPES:
        raise MscError(f"{type(model).__name__}: parameters are {name}; msc supports {', '.join(DTYPES)}")
    return name


_SPEC_KEYS = ("model", "device", "plan", "passes", "runtime")


def _custom_spec(spec_or_plan: Any, cls_name: str, dtype: str):
    """A validated Spec whose model section names the custom class (its `config` carries only the model_type)."""
    from msc.spec import ModelSpec, Spec, parse_spec

    model = {"config": {"model_type": f"custom:{cls_name}"}, "dtype": dtype}
    if spec_or_plan is None:
        return parse_spec({"model": model}, "msc.compile")
    if isinstance(spec_or_plan, Spec):
        # NOTE: a Spec object always has a model section (pydantic requires one); the module is the model here.
        return spec_or_plan.model_copy(update={"model": ModelSpec.model_validate(model)})
    if not isinstance(spec_or_plan, dict):
        raise MscError(f"msc.compile: spec_or_plan must be a plan dict, a spec dict or an msc.spec.Spec, "
                       f"got {type(spec_or_plan).__name__}")
    if "model" in spec_or_plan:
        raise MscError("msc.compile: leave the spec's 'model' key out; the model is the nn.Module you pass")
    if any(k in _SPEC_KEYS for k in spec_or_plan):
        return parse_spec({"model": model, **spec_or_plan}, "msc.compile spec")
    return parse_spec({"model": model, "plan": spec_or_plan}, "msc.compile plan")


def _find_experts(model: nn.Module) -> list[_MarkedExperts]:
    """The marked experts modules with their layer numbers; MscError when there are none or numbers clash."""
    cls_name = type(model).__name__
    found = [(path, mod, getattr(mod, _EXPERTS_MARK)) for path, mod in model.named_modules()
             if isinstance(getattr(mod, _EXPERTS_MARK, None), ExpertsMark)]
    if not found:
        raise MscError(
            f"model {cls_name} marks no experts: decorate its experts module class with "
            "@msc.experts(gate_up=..., down=...) (or call msc.mark_experts(module, ...)) so msc knows which "
            "weights run on the expert nodes"
        )
    out = []
    for pos, (path, mod, mark) in enumerate(found):
        layer = mark.layer
        if layer is None:
            attr = getattr(mod, mark.layer_attr, None)
            layer = attr if isinstance(attr, int) and not isinstance(attr, bool) else None
        if layer is None:
            numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", path)
            layer = int(numbers[-1]) if numbers else pos
        if layer < 0:
            raise MscError(f"experts module '{path}' has layer number {layer}; MoE layer numbers must be >= 0")
        out.append(_MarkedExperts(path or "(the model)", mod, mark, int(layer)))
    seen: dict[int, str] = {}
    for e in out:
        if e.layer in seen:
            raise MscError(f"experts modules '{seen[e.layer]}' and '{e.path}' both have MoE layer number {e.layer}; "
                           f"give each its own (attribute '{e.mark.layer_attr}' or msc.mark_experts(..., layer=N))")
        seen[e.layer] = e.path
    return out


def _experts_weights(e: _MarkedExperts) -> tuple[Tensor, Tensor]:
    cls = type(e.module).__name__
    tensors = []
    for role, name in (("gate_up", e.mark.gate_up), ("down", e.mark.down)):
        t = getattr(e.module, name, None)
        if not isinstance(t, nn.Parameter):
            raise MscError(f"experts module '{e.path}' ({cls}) has no parameter '{name}' (the {role} weights named "
                           "in @msc.experts)")
        tensors.append(t)
    gate_up, down = tensors
    ok = gate_up.dim() == 3 and down.dim() == 3 and gate_up.shape[0] == down.shape[0] \
        and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]
    if not ok:
        raise MscError(f"experts module '{e.path}' ({cls}): '{e.mark.gate_up}' must be [E, 2I, H] and '{e.mark.down}' "
                       f"[E, H, I], got {list(gate_up.shape)} and {list(down.shape)}")
    return gate_up, down


def _experts_shape(marked: list[_MarkedExperts]) -> dict[str, int]:
    shapes = {}
    for e in marked:
        gate_up, down = _experts_weights(e)
        shapes[e.path] = {"num_experts": gate_up.shape[0], "hidden_size": gate_up.shape[2], "intermediate_size": down.shape[2]}
    first = next(iter(shapes.values()))
    for path, s in shapes.items():
        if s != first:
            raise MscError(f"experts modules differ in shape ('{marked[0].path}': {first}, '{path}': {s}); "
                           "msc needs every MoE layer to have the same experts shape")
    return first


def _check_experts_math(e: _MarkedExperts) -> None:
    """Run the module's own forward and msc::experts on the same tokens (every expert used); MscError if
    they disagree, so a compile never silently swaps in different math."""
    if getattr(type(e.module).forward, _DEFAULT_FORWARD, False) and "forward" not in vars(e.module):
        return  # its forward is msc::experts already
    gate_up, down = _experts_weights(e)
    n_exp, _, hidden_size = gate_up.shape
    top_k, tokens = min(2, n_exp), max(n_exp, 4)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(gate_up.dtype).to(gate_up.device)  # [T, H]
    index = ((torch.arange(tokens)[:, None] + torch.arange(top_k)[None, :]) % n_exp).to(gate_up.device)  # [T, K]
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=-1).to(gate_up.device)  # [T, K] f32
    cls = type(e.module).__name__
    with torch.no_grad():
        try:
            theirs = e.module(hidden, index, weights)
        except Exception as err:  # the user's code; report what it said
            raise MscError(f"experts module '{e.path}' ({cls}): forward(hidden [T, H], top_k_index [T, K], "
                           f"top_k_weights [T, K]) failed: {type(err).__name__}: {err}") from err
        ours = torch.ops.msc.experts(hidden, index, weights, gate_up, down, 0, 0)  # [T, H]
    if not isinstance(theirs, Tensor) or theirs.shape != ours.shape:
        got = list(theirs.shape) if isinstance(theirs, Tensor) else type(theirs).__name__
        raise MscError(f"experts module '{e.path}' ({cls}): forward must return [T, H] = {list(ours.shape)}, got {got}")
    err = (theirs.float() - ours.float()).abs().max().item()
    tol = (1e-4 if gate_up.dtype == torch.float32 else 3e-2) * max(1.0, ours.float().abs().max().item())
    if not err <= tol:
        raise MscError(
            f"experts module '{e.path}' ({cls}): its forward does not compute what msc::experts computes "
            f"(max difference {err:.3g}): msc expects SiLU-gated experts, '{e.mark.gate_up}' [E, 2I, H] with the "
            f"gate rows first, then the up rows, and '{e.mark.down}' [E, H, I]"
        )


# -------------------------------------------------------------------------------------------- capture
class _Program(nn.Module):
    """The traced wrapper: (input_ids, position_ids) -> logits. NOTE: the attribute is `m` because
    msc.capture._unlift strips the `m.` prefix to name parameters by their path in the user's module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        out = self.m(input_ids, position_ids)
        if isinstance(out, Tensor):
            return out
        if hasattr(out, "logits"):
            return out.logits
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            return out[0]
        raise MscError(f"{type(self.m).__name__}.forward must return logits [1, T, V], got {type(out).__name__}")


def _capture_forward(e: _MarkedExperts) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The experts module's forward while tracing: one msc::experts call over its named weights."""
    module, mark, layer, where = e.module, e.mark, e.layer, f"experts module '{e.path}'"

    def forward(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if top_k_weights.dtype != torch.float32 or top_k_index.dtype != torch.int64:
            raise MscError(f"{where} got top_k_weights {top_k_weights.dtype} and top_k_index {top_k_index.dtype}; "
                           "msc::experts needs float32 weights and int64 indices (the router's output)")
        h = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
        k = top_k_index.shape[-1]
        # NOTE: the weights are looked up at call time: export swaps the module's parameters for its own
        # tensors while tracing, and a reference taken earlier would bake the real tensor into the graph.
        out = torch.ops.msc.experts(h, top_k_index.reshape(-1, k), top_k_weights.reshape(-1, k),
                                    getattr(module, mark.gate_up), getattr(module, mark.down), layer, 0)  # [T, H]
        return out.reshape(hidden.shape)

    return forward


@contextlib.contextmanager
def _tracing(model: nn.Module, marked: list[_MarkedExperts]) -> Iterator[None]:
    """While tracing: msc.attention emits msc::attention, marked experts call msc::experts, eval mode."""
    was_training = model.training
    saved = {id(e.module): e.module.__dict__.get("forward") for e in marked}
    token = _capturing.set(True)
    try:
        model.eval()
        for e in marked:
            e.module.forward = _capture_forward(e)
        yield
    finally:
        _capturing.reset(token)
        for e in marked:
            old = saved[id(e.module)]
            if old is None:
                del e.module.forward
            else:
                e.module.forward = old
        model.train(was_training)


def _export(model: nn.Module, marked: list[_MarkedExperts], example_tokens: int) -> tuple[fx.GraphModule, dict[str, Tensor]]:
    """torch.export (non-strict, dynamic T) of the marked model -> (GraphModule with get_attr weights, constants)."""
    from msc.capture import _LAYER_ARG, _unlift
    from msc.ir import node_meta
    from msc.ops import MSC_OPS

    cls_name = type(model).__name__
    device = next(model.parameters()).device
    ids = torch.zeros(1, example_tokens, dtype=torch.long, device=device)  # [1, T]
    positions = torch.arange(example_tokens, device=device)[None]  # [1, T]
    tokens = torch.export.Dim("T", min=2, max=1 << 20)
    with _tracing(model, marked):
        try:
            ep = torch.export.export(_Program(model), (ids, positions), dynamic_shapes=({1: tokens}, {1: tokens}), strict=False)
        except MscError:
            raise
        except Exception as e:  # export errors are long; keep the first line and name the model
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MscError(f"torch.export could not capture {cls_name}: {first}") from e
    try:
        gm = _unlift(ep)
    except MscError as e:
        raise MscError(f"{cls_name}: {e} (register tensors the forward reads as buffers or parameters)") from None
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    # NOTE: every buffer the graph reads (rotary tables, persistent or not) is a constant of the bundle;
    # the checkpoint holds parameters only.
    constants = {name: b.detach().cpu().clone() for name, b in model.named_buffers() if name in used}
    for n in gm.graph.nodes:
        for name, op in MSC_OPS.items():
            if n.op == "call_function" and n.target is op and name in _LAYER_ARG:
                node_meta(n)["layer"] = int(n.args[_LAYER_ARG[name]])
    return gm, constants


def _graph_facts(gm: fx.GraphModule, cls_name: str, marked: list[_MarkedExperts]) -> dict[str, int]:
    """Layers, vocabulary and MoE shape read off the captured graph, with the checks the runtime relies on."""
    from msc.ir import fetch_attr
    from msc.ops import is_op

    att_layers = [n.args[3] for n in gm.graph.nodes if is_op(n, "attention")]
    if not att_layers:
        raise MscError(f"model {cls_name} calls msc.attention nowhere: its attention must go through "
                       "msc.attention(q, k, v, layer=i), so that msc's runtime can own the KV cache")
    if sorted(att_layers) != list(range(len(att_layers))):
        raise MscError(f"model {cls_name}: msc.attention layers must be 0..L-1, one call each; the forward calls "
                       f"layers {att_layers}")
    calls = [n for n in gm.graph.nodes if is_op(n, "experts")]
    if not calls:
        paths = ", ".join(e.path for e in marked)
        raise MscError(f"model {cls_name} marks experts ({paths}) but its forward never calls them")
    layers = [n.args[5] for n in calls]
    if len(set(layers)) != len(layers):
        raise MscError(f"model {cls_name} calls the experts of one MoE layer more than once (layers {layers}); "
                       "each marked experts module may run once per forward")
    top_ks = {n.args[1].meta["val"].shape[-1] for n in calls}
    if len(top_ks) != 1 or not isinstance(next(iter(top_ks)), int):
        raise MscError(f"model {cls_name}: every MoE layer must route each token to the same fixed number of "
                       f"experts, found top-k {sorted(map(str, top_ks))}")
    gate_up = fetch_attr(gm, calls[0].args[3].target)  # [E, 2I, H]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    logits = (out[0] if isinstance(out, (tuple, list)) else out).meta["val"]  # [1, T, V]
    if logits.dim() != 3 or not isinstance(logits.shape[-1], int):
        raise MscError(f"{cls_name}.forward must return logits [1, T, V], got shape {list(logits.shape)}")
    return {
        "num_hidden_layers": len(att_layers),
        "vocab_size": logits.shape[-1],
        "num_moe_layers": len(calls),
        "num_experts": gate_up.shape[0],
        "top_k": top_ks.pop(),
        "hidden_size": gate_up.shape[2],
        "intermediate_size": gate_up.shape[1] // 2,
    }


# -------------------------------------------------------------------------------------------- weights
def _save_parameters(model: nn.Module, out: Path) -> dict[str, str]:
    """Save the module's parameters as `out/model.safetensors` (keys = parameter names; a tied parameter
    once, under its first name); return alias -> saved name for every name a parameter is known by."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    saved: dict[int, str] = {}
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = saved.setdefault(id(p), name)
        aliases[name] = key
        if key == name:
            tensors[name] = p.detach().cpu().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return aliases


class _ParameterSource:
    """The weight-source adapter for a custom module: a graph parameter is the checkpoint tensor of the
    same name (rows [a, b) of it on an expert node). Same interface as FamilyAdapter.checkpoint_source."""

    def __init__(self, aliases: dict[str, str]):
        self.aliases = aliases

    def checkpoint_source(self, param: str, keys: set[str] | None, config: Any, expert_rows: tuple[int, int] | None) -> dict:
        key = self.aliases.get(param, param)
        if keys is not None and key not in keys:
            raise MscError(f"the saved parameters have no tensor for graph parameter '{param}'")
        src: dict[str, Any] = {"key": key}
        if expert_rows is not None:
            src["rows"] = list(expert_rows)
        return src
