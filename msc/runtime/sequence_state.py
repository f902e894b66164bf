"""Per-sequence state of the state layers (issue 26), kept by the attention role beside the paged KV cache.

A state layer (Gated DeltaNet, Mamba, a short convolution) carries a fixed-size state from token to token
instead of keeping every token's keys and values: a convolution keeps its last K - 1 inputs, a recurrent
layer a matrix per head. `SequenceStates` preallocates one *slot* per sequence that can run at once (the
engine's batch limit) plus a scratch slot for padding rows; a sequence gets a zeroed slot when it enters
the cache and gives it back when it leaves, so continuous batching and preemption (a preempted sequence is
recomputed from its prompt) treat state like KV pages (PagedKVCache owns a SequenceStates and calls it).

The step functions below read and write the slots of one step's sequences, whose tokens are packed along T
as the attention op sees them (msc.runtime.paged_kv.StepMeta says where each sequence's tokens are):
- a decode step (one token per sequence) is one batched update, index ops only (CUDA-graph capturable);
- any other step runs each sequence's tokens in order from its slot's state (CPU reference; fresh
  sequences start from the zeroed slot).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from msc import env as msc_env
from msc.errors import MscError


class SequenceStates:
    """State tensors {key: [slots, *shape]} and the slot of each sequence. Keys name a layer's state, e.g.
    "3.conv0" (layer 3's first convolution) or "3.delta" (its recurrent matrix)."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], num_slots: int, device):
        if num_slots < 2:
            raise MscError(f"SequenceStates: {num_slots} slots; expected at least one sequence's and the scratch slot")
        self.device = torch.device(device)
        self.num_slots = num_slots
        self.buffers = {key: torch.zeros(num_slots, *shape, dtype=dtype, device=self.device)
                        for key, (shape, dtype) in shapes.items()}
        self.scratch = num_slots - 1  # NOTE: padding rows of a captured decode batch read and write this slot
        self._free = list(range(num_slots - 2, -1, -1))
        self._slot: dict[int, int] = {}

    @property
    def bytes_per_sequence(self) -> int:
        return sum(b[0].numel() * b.element_size() for b in self.buffers.values())

    def add(self, seq_id: int) -> int:
        """A zeroed slot for a sequence entering the cache."""
        if seq_id in self._slot:
            raise MscError(f"SequenceStates: sequence {seq_id} already has a state slot")
        if not self._free:
            raise MscError(f"SequenceStates: all {self.num_slots - 1} state slots are taken; the engine runs at most "
                           "that many sequences at once (the plan's batch_size)")
        slot = self._slot[seq_id] = self._free.pop()
        for b in self.buffers.values():
            b[slot].zero_()
        return slot

    def drop(self, seq_id: int) -> None:
        slot = self._slot.pop(seq_id, None)
        if slot is not None:
            self._free.append(slot)

    def slot(self, seq_id: int) -> int:
        try:
            return self._slot[seq_id]
        except KeyError:
            raise MscError(f"SequenceStates: sequence {seq_id} has no state slot") from None

    def buffer(self, key: str) -> Tensor:
        try:
            return self.buffers[key]
        except KeyError:
            raise MscError(f"SequenceStates: no state '{key}' (the cache was made for {sorted(self.buffers)})") from None


def state_key(layer: int, kind: str, index: int = 0) -> str:
    return f"{layer}.{kind}{index}"


# ------------------------------------------------------------------------------------------ one step
def _spans(meta) -> list[tuple[int, int]]:
    """(start along T, count) of each sequence of the step, in meta.state_slots' order."""
    return meta.prefill_spans or [(i, 1) for i in range(meta.state_slots.shape[0])]


def causal_conv1d(states: SequenceStates, meta, key: str, x: Tensor, weight: Tensor, bias: Tensor | None,
                  activation: str) -> Tensor:
    """x [1, C, T] -> [1, C, T]: each sequence's tokens convolved over its conv state (its last K - 1 inputs)
    and the step's inputs before them; the state then holds the last K - 1 inputs."""
    buf = states.buffer(key)  # [S, C, K - 1]
    k = weight.shape[-1]
    w = weight.to(x.dtype)
    if meta.decode:
        slots = meta.state_slots  # [B]
        window = torch.cat([buf[slots].to(x.dtype), x[0].transpose(0, 1).unsqueeze(-1)], dim=-1)  # [B, C, K]
        out = (window * w).sum(-1)  # [B, C]
        if bias is not None:
            out = out + bias.to(x.dtype)
        buf.index_copy_(0, slots, window[:, :, 1:].to(buf.dtype))
        return _act(out.transpose(0, 1).unsqueeze(0), activation)  # [1, C, B]
    out = torch.empty_like(x)  # [1, C, T]
    for (start, n), slot in zip(_spans(meta), meta.state_slots.tolist()):
        full = torch.cat([buf[slot].to(x.dtype), x[0, :, start:start + n]], dim=-1)  # [C, K - 1 + n]
        out[0, :, start:start + n] = F.conv1d(full.unsqueeze(0), w.unsqueeze(1), bias, groups=w.shape[0])[0]  # [C, n]
        if k > 1:
            buf[slot] = full[:, -(k - 1):].to(buf.dtype)
    return _act(out, activation)


def _act(x: Tensor, activation: str) -> Tensor:
    if not activation:
        return x
    from transformers.activations import ACT2FN

    return ACT2FN[activation](x)


def gated_delta_rule(states: SequenceStates, meta, key: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                     qk_l2norm: bool) -> Tensor:
    """msc::gated_delta_rule over the sequences' recurrent states [S, Hv, dk, dv] (float32): see msc.ops."""
    buf = states.buffer(key)
    if not meta.decode and _chunked_prefill(per_channel=g.dim() == 4):
        return _chunked_delta_rule(buf, meta, q, k, v, g, beta, qk_l2norm)
    hk, hv = q.shape[2], v.shape[2]
    qf, kf, vf = (t[0].float() for t in (q, k, v))  # [T, H, d]
    if hv != hk:  # grouped: each key head serves hv / hk consecutive value heads
        qf, kf = qf.repeat_interleave(hv // hk, dim=1), kf.repeat_interleave(hv // hk, dim=1)  # [T, Hv, dk]
    if qk_l2norm:
        qf, kf = _l2norm(qf), _l2norm(kf)
    qf = qf * qf.shape[-1] ** -0.5
    decay, bf = g[0].float().exp(), beta[0].float()  # [T, Hv] or [T, Hv, dk], [T, Hv]

    def step(st, i):  # st [B, Hv, dk, dv]; i: token rows [B]
        return delta_step(st, qf[i], kf[i], vf[i], decay[i], bf[i])

    return _scan(buf, meta, q.shape[1], step, q.device).to(q.dtype).unsqueeze(0)  # [1, T, Hv, dv]


CHUNK = 64  # tokens per chunk of the chunked prompt forms (matrix products inside a chunk, a recurrence across)


def _chunked_prefill(per_channel: bool) -> bool:
    """Whether a prompt step (any step that is not decode-only) runs a chunked form (matrix products inside
    CHUNK-token chunks, the state handed between chunks, from the slot's state) rather than msc's token-by-token
    recurrence (what decode steps run, and the reference the chunked forms are tested against).
    MSC_STATE_PREFILL=auto (the default) | chunked | loop.

    NOTE: auto takes the chunked form where one was faster on this project's CPU (`python
    benchmarks/state_prefill.py`, figures in docs/notes.md, session 15): per-head gated delta rules, Mamba-2's scan,
    lightning attention; Kimi's per-key-channel rule keeps the recurrence (transformers' chunked KDA was slower).
    Not measured on a GPU."""
    mode = msc_env.choice("MSC_STATE_PREFILL")
    return mode == "chunked" or (mode == "auto" and not per_channel)


def _chunked_delta_rule(buf: Tensor, meta, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                        qk_l2norm: bool) -> Tensor:
    """Each sequence's tokens of the step through transformers' chunked gated delta rule, started from its slot's
    state, the final state written back. q/k [1, T, Hk, dk], v [1, T, Hv, dv], g [1, T, Hv] (per head: Qwen3-Next's
    function) or [1, T, Hv, dk] (per key channel: Kimi's), beta [1, T, Hv] -> [1, T, Hv, dv]."""
    if g.dim() == 3:
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule as chunked
    else:
        from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention as chunked
    out = v.new_empty(1, q.shape[1], v.shape[2], v.shape[3], dtype=torch.float32)  # [1, T, Hv, dv]

    def run(part, state):  # state [1, Hv, dk, dv]
        o, final = chunked(q[:, part].float(), k[:, part].float(), v[:, part].float(), g[:, part].float(),
                           beta[:, part].float(), initial_state=state, output_final_state=True,
                           use_qk_l2norm_in_kernel=qk_l2norm)
        out[:, part] = o.float()
        return final

    _each_sequence(buf, meta, run)
    return out.to(q.dtype)


def _each_sequence(buf: Tensor, meta, run) -> None:
    """The chunked forms' driver: for each sequence of a prompt step, run(its token slice along T, its slot's state
    [1, ...] in float32) -> the final state [1, ...], written back to the slot."""
    for (start, n), slot in zip(_spans(meta), meta.state_slots.tolist()):
        buf[slot] = run(slice(start, start + n), buf[slot:slot + 1].float())[0].to(buf.dtype)


def delta_step(s: Tensor, q: Tensor, k: Tensor, v: Tensor, decay: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the gated delta rule for B rows: s [B, H, dk, dv], q/k [B, H, dk], v [B, H, dv], beta [B, H],
    decay [B, H] (per head) or [B, H, dk] (per key channel) -> (new state, output [B, H, dv]). The state first
    decays, then moves its prediction for k towards v by beta (the delta rule), then answers q."""
    s = s * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
    predicted = torch.einsum("bhkv,bhk->bhv", s, k)  # [B, H, dv]
    s = s + k.unsqueeze(-1) * ((v - predicted) * beta.unsqueeze(-1)).unsqueeze(-2)
    return s, torch.einsum("bhkv,bhk->bhv", s, q)


def _l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def mamba2_scan(states: SequenceStates, meta, key: str, x: Tensor, b: Tensor, c: Tensor, dt: Tensor, a_log: Tensor,
                d: Tensor, dt_bias: Tensor, heads: int, groups: int, dt_min: float, dt_max: float) -> Tensor:
    """msc::mamba2_scan over the sequences' states h [S, heads, P, N] (float32): see msc.ops."""
    buf = states.buffer(key)
    t = x.shape[1]
    p, n = x.shape[-1] // heads, b.shape[-1] // groups
    if not meta.decode and _chunked_prefill(per_channel=False):
        return _chunked_mamba2(buf, meta, x, b, c, dt, a_log, d, dt_bias, heads, groups, dt_min, dt_max)
    xf = x[0].float().reshape(t, heads, p)  # [T, H, P]
    rep = heads // groups
    bf = b[0].float().reshape(t, groups, n).repeat_interleave(rep, dim=1)  # [T, H, N]
    cf = c[0].float().reshape(t, groups, n).repeat_interleave(rep, dim=1)  # [T, H, N]
    dtf = torch.clamp(F.softplus(dt[0].float() + dt_bias.float()), dt_min, dt_max)  # [T, H]
    decay = torch.exp(dtf * -torch.exp(a_log.float()))  # [T, H]
    skip = d.float()[:, None] * xf  # [T, H, P]

    def step(h, i):  # h [B, H, P, N]; i: token rows [B]
        h = h * decay[i][..., None, None] + (dtf[i][..., None] * xf[i])[..., None] * bf[i][:, :, None, :]
        return h, torch.einsum("bhpn,bhn->bhp", h, cf[i])

    out = _scan(buf, meta, t, step, x.device)  # [T, H, P]
    return (out + skip).reshape(1, t, heads * p).to(x.dtype)


def _chunked_mamba2(buf: Tensor, meta, x: Tensor, b: Tensor, c: Tensor, dt: Tensor, a_log: Tensor, d: Tensor,
                    dt_bias: Tensor, heads: int, groups: int, dt_min: float, dt_max: float) -> Tensor:
    """Each sequence's tokens of the step through transformers' chunked Mamba-2 scan (SSD) from its slot's state,
    the final state written back; the D skip added here as the recurrence does. -> [1, T, H·P]."""
    from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan

    t = x.shape[1]
    p, n = x.shape[-1] // heads, b.shape[-1] // groups
    a = -torch.exp(a_log.float())  # [H]
    out = torch.empty(1, t, heads, p, dtype=torch.float32, device=x.device)  # [1, T, H, P]

    def run(part, state):  # state [1, H, P, N]
        m = part.stop - part.start
        y, final = mamba2_chunk_scan(
            x[:, part].float().reshape(1, m, heads, p), dt[:, part].float(), a,
            b[:, part].float().reshape(1, m, groups, n), c[:, part].float().reshape(1, m, groups, n),
            chunk_size=CHUNK, D=None, dt_bias=dt_bias.float(), initial_states=state,
            dt_softplus=True, dt_limit=(dt_min, dt_max), return_final_states=True)
        out[:, part] = y.float()
        return final

    _each_sequence(buf, meta, run)
    skip = d.float()[:, None] * x[0].float().reshape(t, heads, p)  # [T, H, P]
    return (out[0] + skip).reshape(1, t, heads * p).to(x.dtype)


def mamba_scan(states: SequenceStates, meta, key: str, x: Tensor, dt: Tensor, b: Tensor, c: Tensor, gate: Tensor,
               a_log: Tensor, d: Tensor, dt_bias: Tensor | None) -> Tensor:
    """msc::mamba_scan over the sequences' states h [S, I, N] (float32): see msc.ops."""
    buf = states.buffer(key)
    t = x.shape[-1]
    xf, dtf = x[0].float().transpose(0, 1), dt[0].float().transpose(0, 1)  # [T, I]
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    dtf = F.softplus(dtf)
    bf, cf = b[0].float(), c[0].float()  # [T, N]
    a = -torch.exp(a_log.float())  # [I, N]

    def step(h, i):  # h [B, I, N]
        h = torch.exp(dtf[i][..., None] * a) * h + (dtf[i] * xf[i])[..., None] * bf[i][:, None, :]
        return h, torch.einsum("bin,bn->bi", h, cf[i])

    y = _scan(buf, meta, t, step, x.device) + d.float() * xf  # [T, I]
    y = y * F.silu(gate[0].float().transpose(0, 1))
    return y.transpose(0, 1).unsqueeze(0).to(x.dtype)  # [1, I, T]


def linear_attention(states: SequenceStates, meta, key: str, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
    """msc::linear_attention over the sequences' states S [S, H, dk, dv] (float32): see msc.ops."""
    buf = states.buffer(key)
    t = q.shape[1]
    if not meta.decode and _chunked_prefill(per_channel=False):
        return _chunked_linear_attention(buf, meta, q, k, v, log_decay)
    qf, kf, vf = (x[0].float() for x in (q, k, v))  # [T, H, d]
    decay = torch.exp(log_decay.float())[:, None, None]  # [H, 1, 1]

    def step(s, i):  # s [B, H, dk, dv]
        s = s * decay + kf[i].unsqueeze(-1) * vf[i].unsqueeze(-2)
        return s, torch.einsum("bhkv,bhk->bhv", s, qf[i])

    return _scan(buf, meta, t, step, q.device).to(q.dtype).unsqueeze(0)  # [1, T, H, dv]


def _chunked_linear_attention(buf: Tensor, meta, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> Tensor:
    """The recurrence S_t = λ·S_{t-1} + k_tᵀv_t, y_t = q_t·S_t (λ = exp(log_decay) per head) over each sequence's
    tokens in chunks of CHUNK: inside a chunk, y_i = λ^(i+1)·q_i·S + Σ_{j≤i} λ^(i-j)·(q_i·k_j)·v_j (matrix products),
    and the chunk hands on S' = λ^C·S + Σ_j λ^(C-1-j)·k_jᵀv_j. q/k [1, T, H, dk], v [1, T, H, dv] -> [1, T, H, dv]."""
    t = q.shape[1]
    ld = log_decay.float()  # [H]
    out = torch.empty(t, v.shape[2], v.shape[3], dtype=torch.float32, device=q.device)  # [T, H, dv]

    def run(part, state):  # state [1, H, dk, dv]
        s = state[0]  # [H, dk, dv]
        for a in range(part.start, part.stop, CHUNK):
            c = min(CHUNK, part.stop - a)
            qc, kc, vc = (x[0, a:a + c].float().transpose(0, 1) for x in (q, k, v))  # [H, c, d]
            pos = torch.arange(c, device=q.device, dtype=torch.float32)
            gap = pos[:, None] - pos[None, :]  # [c, c]: i - j
            within = torch.exp(ld[:, None, None] * gap.clamp(min=0)) * (gap >= 0)  # [H, c, c]: λ^(i-j), j <= i
            y = ((qc @ kc.transpose(1, 2)) * within) @ vc  # [H, c, dv]
            y = y + torch.exp(ld[:, None, None] * (pos + 1)[None, :, None]) * (qc @ s)  # the carried state's part
            out[a:a + c] = y.transpose(0, 1)
            tail = torch.exp(ld[:, None] * (c - 1 - pos)[None, :])  # [H, c]: λ^(c-1-j)
            s = torch.exp(ld * c)[:, None, None] * s + (kc * tail[..., None]).transpose(1, 2) @ vc  # [H, dk, dv]
        return s.unsqueeze(0)

    _each_sequence(buf, meta, run)
    return out.to(q.dtype).unsqueeze(0)  # [1, T, H, dv]


def _scan(buf: Tensor, meta, t: int, step, device) -> Tensor:
    """Run a recurrence over a step's tokens: step(h [B, ...], token rows [B]) -> (h, y [B, ...]); a decode step
    is one batched call over every sequence's slot, any other step each sequence's tokens in order. -> y [T, ...]"""
    if meta.decode:
        slots = meta.state_slots  # [B]
        h, y = step(buf[slots], torch.arange(t, device=device))
        buf.index_copy_(0, slots, h.to(buf.dtype))
        return y
    ys = [None] * t
    for (start, n), slot in zip(_spans(meta), meta.state_slots.tolist()):
        h = buf[slot].unsqueeze(0).float()
        for i in range(start, start + n):
            h, y = step(h, torch.tensor([i], device=device))
            ys[i] = y[0]
        buf[slot] = h[0].to(buf.dtype)
    return torch.stack(ys)
