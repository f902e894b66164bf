"""State layers at capture: the token mixers that keep a per-sequence state instead of a KV cache.

transformers 5 writes the stateful core of its linear-attention and state-space layers as module-level
functions that a runtime managing the state itself may replace (`causal_conv1d_forward`, the gated delta
rule, ...; the modeling files say so). While a model is captured, `capturing(model)` puts msc ops in their
place in the model's modeling modules, so the layer's own code (projections, gates, norms) is traced as it
is and only the stateful core becomes one op per call:

    causal_conv1d_forward(conv1d, x, cache, layer_idx, activation, state_idx)  ->  msc::causal_conv1d
    torch_chunk_gated_delta_rule(q, k, v, g, beta, ...)                         ->  msc::gated_delta_rule
    mamba2_scan_forward(module, x, B, C, dt, cache)                             ->  msc::mamba2_scan
    mamba_scan_forward(module, x, dt, B, C, gate, cache)                        ->  msc::mamba_scan

The runtime (msc.runtime.sequence_state) keeps each sequence's conv and recurrent state beside its KV pages.

NOTE: only the mixer classes in KNOWN_MIXERS are accepted: a layer whose mixer is not attention and not
one of them (or that calls other ops than its entry lists) is refused at capture (capture.py), because a
state the replacement functions do not see would make the program decode wrongly.
"""
from __future__ import annotations

import contextlib
import re
import sys
import threading
from typing import Iterator

import torch
from torch import nn

from msc.errors import MscError

# mixer class -> the msc ops one call of it makes (op name -> count)
KNOWN_MIXERS: dict[str, dict[str, int]] = {
    "Qwen3NextGatedDeltaNet": {"causal_conv1d": 1, "gated_delta_rule": 1},
    "Qwen3_5MoeGatedDeltaNet": {"causal_conv1d": 1, "gated_delta_rule": 1},
    "LaraMiniGatedDeltaNet": {"causal_conv1d": 1, "gated_delta_rule": 1},
    "NemotronHMamba2Mixer": {"causal_conv1d": 1, "mamba2_scan": 1},
    "GraniteMoeHybridMambaLayer": {"causal_conv1d": 1, "mamba2_scan": 1},
    "JambaMambaMixer": {"causal_conv1d": 1, "mamba_scan": 1},
    "KimiLinearDeltaAttention": {"causal_conv1d": 1, "gated_delta_rule": 1},
    "MiniMaxLightningAttention": {"linear_attention": 1},
}

_local = threading.local()
# mixer classes named like state layers (MiniMax's lightning attention keeps a decayed key-value sum): refused
# unless known, whatever they hold (not "LinearAttention": Kimi-Linear names its softmax MLA attention so)
_STATEFUL_NAME = re.compile(r"Lightning|Mamba|DeltaNet|ShortConv|Retention|RWKV")


def _layer_now(what: str) -> int:
    layer = getattr(_local, "layer", None)
    if layer is None:
        raise MscError(f"{what} ran outside a known state mixer ({', '.join(KNOWN_MIXERS)}); msc cannot tell its layer")
    return layer


def _conv_forward(conv1d, hidden_states, cache, layer_idx, activation=None, state_idx=0, **kwargs):
    """msc's causal_conv1d_forward: x [B=1, C, T] -> [1, C, T] through msc::causal_conv1d."""
    if cache is not None or kwargs.get("seq_idx") is not None:
        raise MscError("causal_conv1d_forward was given a transformers cache or packed-sequence indices at capture; "
                       "msc keeps the conv state itself")
    if conv1d.weight.shape[1] != 1 or conv1d.groups != conv1d.in_channels or conv1d.padding_mode != "zeros":
        raise MscError(f"layer {layer_idx}'s convolution is not depthwise with zero padding (groups {conv1d.groups}, "
                       f"{conv1d.in_channels} channels); msc::causal_conv1d implements depthwise causal convolutions")
    weight = conv1d.weight[:, 0, :]  # [C, K]
    return torch.ops.msc.causal_conv1d(hidden_states, weight, conv1d.bias, int(layer_idx), int(state_idx), activation or "")


def _chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                            use_qk_l2norm_in_kernel=False, **kwargs):
    """msc's torch_chunk_gated_delta_rule: the whole sequence through msc::gated_delta_rule (the runtime holds the
    state, so there is neither an initial nor a final state here)."""
    if initial_state is not None or output_final_state or kwargs.get("cu_seqlens") is not None:
        raise MscError("the gated delta rule was given a state or packed sequences at capture; msc keeps the state itself")
    out = torch.ops.msc.gated_delta_rule(query, key, value, g, beta, _layer_now("the gated delta rule"),
                                         bool(use_qk_l2norm_in_kernel))
    return out, None


def _mamba2_scan_forward(module, hidden_states, B, C, dt, cache, **kwargs):
    """msc's mamba2_scan_forward: the mixer's scan (its A_log, D, dt_bias, time-step limit) through msc::mamba2_scan."""
    if cache is not None or kwargs.get("seq_idx") is not None:
        raise MscError("mamba2_scan_forward was given a transformers cache or packed sequences at capture")
    lo, hi = (float(v) for v in module.time_step_limit)
    return torch.ops.msc.mamba2_scan(hidden_states, B, C, dt, module.A_log, module.D, module.dt_bias,
                                     int(module.layer_idx), int(module.num_heads), int(module.n_groups), lo, hi)


def _mamba_scan_forward(module, hidden_states, time_step, B, C, gate, cache, **kwargs):
    """msc's mamba_scan_forward (Jamba): the mixer's selective scan through msc::mamba_scan."""
    if cache is not None:
        raise MscError("mamba_scan_forward was given a transformers cache at capture")
    return torch.ops.msc.mamba_scan(hidden_states, time_step, B, C, gate, module.A_log, module.D, module.dt_proj.bias,
                                    int(module.layer_idx))


def _recurrent_unreachable(*args, **kwargs):
    raise MscError("a state layer took its cached-decode path at capture; msc captures the no-cache path only")


def _lightning_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """MiniMax's lightning attention with its decayed key-value sum through msc::linear_attention. NOTE: its own
    forward has no replaceable function (the blockwise scan is written inline), so msc gives the module this
    forward while capturing: the projections, activation, norm and output gate are the module's own, in its
    order; the scan is o_i = Σ_{j<=i} exp(-slope·(i-j)) (q_i·k_j) v_j, what its blocks compute."""
    if cache is not None:
        raise MscError("MiniMax's lightning attention was given a transformers cache at capture")
    b, t, _ = hidden_states.shape
    qkv = self.act_fn(self.qkv_proj(hidden_states))
    if attention_mask is not None:  # transformers multiplies a 2-D padding mask in; msc packs without padding
        raise MscError("MiniMax's lightning attention was given an attention mask at capture; msc passes none")
    q, k, v = torch.split(qkv.reshape(b, t, self.num_attention_heads, 3 * self.head_dim), self.head_dim, dim=3)
    out = torch.ops.msc.linear_attention(q, k, v, -self.slope_rate.reshape(-1), int(self.layer_idx))  # [1, T, H, d]
    out = self.norm(out.reshape(b, t, self.num_attention_heads * self.head_dim))
    out = torch.sigmoid(self.output_gate(hidden_states)) * out
    return self.out_proj(out), None


# mixer class -> msc's forward for it (mixers whose state lives in code with no replaceable function)
FORWARDS = {"MiniMaxLightningAttention": _lightning_forward}

# name in a modeling module -> msc's replacement
REPLACEMENTS = {
    "causal_conv1d_forward": _conv_forward,
    "torch_chunk_gated_delta_rule": _chunk_gated_delta_rule,
    "torch_recurrent_gated_delta_rule": _recurrent_unreachable,
    "chunk_kimi_delta_attention": _chunk_gated_delta_rule,  # Kimi delta attention: a per-channel decay
    "recurrent_kimi_delta_attention": _recurrent_unreachable,
    "mamba2_scan_forward": _mamba2_scan_forward,
    "mamba_scan_forward": _mamba_scan_forward,
}


def state_mixers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module of a known state-mixer class."""
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in KNOWN_MIXERS]


def unknown_state_layers(model: nn.Module) -> list[tuple[str, str, str]]:
    """(path, class, why) of modules that look like state layers msc does not implement: a depthwise convolution
    (a short convolution keeps its last inputs) or a state-space decay `A_log`, outside the known mixers; then
    modules named like state layers (_STATEFUL_NAME) that hold neither."""
    known = [name for name, _ in state_mixers(model)]

    def skip(name: str) -> bool:  # a known mixer, a part of one or a module holding one (a decoder layer)
        return any(name == k or name.startswith(k + ".") or not name or k.startswith(name + ".") for k in known)

    found: dict[str, tuple[str, str]] = {}
    for name, m in model.named_modules():
        if skip(name):
            continue
        if isinstance(m, nn.Conv1d) and m.groups == m.in_channels and m.in_channels > 1:
            parent = name.rpartition(".")[0]
            found.setdefault(parent, (type(model.get_submodule(parent)).__name__, f"a depthwise convolution ({name})"))
        elif isinstance(getattr(m, "A_log", None), nn.Parameter):
            found.setdefault(name, (type(m).__name__, "a state-space decay (A_log)"))
    for name, m in model.named_modules():
        if not skip(name) and name not in found and _STATEFUL_NAME.search(type(m).__name__) and \
                not any(f.startswith(name + ".") for f in found):
            found[name] = (type(m).__name__, "a linear-attention or recurrent state (its class is named like one)")
    return [(path, cls, why) for path, (cls, why) in found.items()]


def check_known(model: nn.Module) -> None:
    """Refuse, before capture, a model with a state layer msc does not implement (see unknown_state_layers)."""
    unknown = unknown_state_layers(model)
    if unknown:
        path, cls, why = unknown[0]
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise MscError(f"{path} ({cls}) holds {why}: a per-sequence state layer msc does not implement{more}; msc "
                       f"implements {', '.join(KNOWN_MIXERS)}, and refuses the model rather than compile one that "
                       "decodes wrongly")


@contextlib.contextmanager
def capturing(model: nn.Module) -> Iterator[None]:
    """msc ops in place of the stateful functions of the model's modeling modules, and each known mixer's layer
    known while it runs, for the duration of a capture; everything restored after."""
    check_known(model)
    modules = {sys.modules[type(m).__module__] for _, m in model.named_modules()}
    saved = [(mod, name, getattr(mod, name)) for mod in modules for name in REPLACEMENTS if hasattr(mod, name)]
    handles, forwards = [], []
    for _, mixer in state_mixers(model):
        if type(mixer).__name__ in FORWARDS:
            forwards.append(mixer)
            mixer.forward = FORWARDS[type(mixer).__name__].__get__(mixer)
        layer = getattr(mixer, "layer_idx", None)
        if not isinstance(layer, int):
            raise MscError(f"{type(mixer).__name__} has no layer_idx; msc cannot give its state a layer")
        handles.append(mixer.register_forward_pre_hook(lambda m, a, layer=layer: setattr(_local, "layer", layer)))
        handles.append(mixer.register_forward_hook(lambda m, a, o: setattr(_local, "layer", None)))
    try:
        for mod, name, _ in saved:
            setattr(mod, name, REPLACEMENTS[name])
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        for h in handles:
            h.remove()
        for mixer in forwards:
            del mixer.forward
        _local.layer = None
