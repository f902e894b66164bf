"""A decoder-only MoE language model written from scratch, marked for msc and compiled with `msc.compile`.

Nothing here comes from transformers. What makes the model compilable:
  - attention calls `msc.attention(q, k, v, layer=i)` where it would call SDPA (msc owns the KV cache;
    outside msc it is plain causal attention, so the eager model below is its own reference);
  - the router class is decorated with `@msc.router` (returns float32 weights and int64 indices);
  - the experts class is decorated with `@msc.experts(gate_up=..., down=...)`: compiled, its forward
    becomes msc::experts on the expert nodes; eager, it runs the loop written here.
  - forward(input_ids [1, T], position_ids [1, T]) -> logits [1, T, V].

Run it: `python examples/custom_moe.py` compiles to a temporary directory with 2 expert nodes, generates
8 tokens for three prompts with msc's runtime (1 attention + 2 expert processes) and prints them next to
the eager model's own greedy tokens.
"""
from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import msc


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position encoding (rotate-half form): x [1, n, T, d], cos/sin [1, 1, T, d]."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention; the attention itself is msc's (its cache, its causal mask per sequence)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, layer: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.layer = heads, kv_heads, hidden // heads, layer
        self.q = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # x [1, T, H]
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [1, nh, T, d]
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # [1, nkv, T, d]
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # [1, nkv, T, d]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = msc.attention(q, k, v, layer=self.layer)  # [1, T, nh, d]
        return self.o(out.reshape(b, t, self.heads * self.head_dim))  # [1, T, H]


@msc.router
class TopKRouter(nn.Module):
    """Softmax over experts, keep the top k, renormalise."""

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(num_experts, hidden) * hidden**-0.5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # x [T, H]
        probs = torch.softmax(F.linear(x, self.weight).float(), dim=-1)  # [T, E]
        weights, index = probs.topk(self.top_k, dim=-1)  # [T, K] each
        return weights / weights.sum(-1, keepdim=True), index


@msc.experts(gate_up="gate_up", down="down")
class Experts(nn.Module):
    """SiLU-gated experts stacked per layer: gate_up [E, 2I, H] (gate rows, then up rows), down [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, inter: int, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # the MoE layer number msc uses (read from this attribute)
        self.gate_up = nn.Parameter(torch.randn(num_experts, 2 * inter, hidden) * hidden**-0.5)
        self.down = nn.Parameter(torch.randn(num_experts, hidden, inter) * inter**-0.5)

    def forward(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        # Eager only (msc::experts replaces it when compiled): every expert on every token, weighted by
        # its routing weight (0 for tokens that did not pick it). Dense, so no data-dependent shapes.
        out = torch.zeros_like(hidden)  # [T, H]
        for e in range(self.gate_up.shape[0]):
            w = (top_k_weights * (top_k_index == e)).sum(-1, keepdim=True).to(hidden.dtype)  # [T, 1]
            gate, up = F.linear(hidden, self.gate_up[e]).chunk(2, dim=-1)  # [T, I] each
            out = out + w * F.linear(F.silu(gate) * up, self.down[e])  # [T, H]
        return out


class MoEBlock(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, inter: int, layer: int):
        super().__init__()
        self.router = TopKRouter(hidden, num_experts, top_k)
        self.experts = Experts(num_experts, hidden, inter, layer)

    def forward(self, x: Tensor) -> Tensor:  # x [1, T, H]
        h = x.reshape(-1, x.shape[-1])  # [T, H]
        weights, index = self.router(h)  # [T, K] each
        return self.experts(h, index, weights).reshape(x.shape)  # [1, T, H]


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, num_experts: int, top_k: int, inter: int, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(hidden)
        self.attn = Attention(hidden, heads, kv_heads, layer)
        self.moe_norm = RMSNorm(hidden)
        self.moe = MoEBlock(hidden, num_experts, top_k, inter, layer)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # x [1, T, H]
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.moe(self.moe_norm(x))


class TinyMoELM(nn.Module):
    """Embedding -> L x (norm, attention, norm, top-k MoE, residuals) -> norm -> LM head."""

    def __init__(self, vocab: int = 128, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 num_experts: int = 4, top_k: int = 2, inter: int = 48, max_positions: int = 512, rope_base: float = 10000.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden, heads, kv_heads, num_experts, top_k, inter, i) for i in range(layers)
        )
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        head_dim = hidden // heads
        inv_freq = rope_base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [d/2]
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None]  # [P, d/2]
        angles = torch.cat([angles, angles], dim=-1)  # [P, d]
        # NOTE: rotary tables are buffers, not parameters: msc stores them as bundle constants.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:  # [1, T] each -> logits [1, T, V]
        x = self.embed(input_ids)  # [1, T, H]
        cos = self.cos[position_ids][:, None]  # [1, 1, T, d]
        sin = self.sin[position_ids][:, None]  # [1, 1, T, d]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))  # [1, T, V]


def build_model(seed: int = 0, **sizes) -> TinyMoELM:
    """The example model with weights drawn from `seed` (the caller's RNG state is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyMoELM(**sizes).eval()


@torch.no_grad()
def greedy(model: nn.Module, prompt: list[int], steps: int) -> tuple[list[int], Tensor]:
    """The eager reference: recompute the whole sequence each step (no cache); new tokens and logits [steps, V]."""
    seq, rows = list(prompt), []
    for _ in range(steps):
        ids = torch.tensor([seq])  # [1, S]
        logits = model(ids, torch.arange(len(seq))[None])[0, -1]  # [V]
        rows.append(logits.float())
        seq.append(int(logits.argmax()))
    return seq[len(prompt):], torch.stack(rows)


PROMPTS = [[5, 17, 42, 100, 3], [7, 7], [1, 2, 3, 4, 5, 6, 90, 9]]


def main() -> None:
    from msc.runtime.launcher import run_bundle

    model = build_model(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = msc.compile(model, {"experts": {"nodes": 2}}, f"{tmp}/bundle", progress=lambda m: print(f"  {m}"))
        print(f"compiled {bundle.manifest['model']['model_type']} into roles {[r['name'] for r in bundle.roles]}")
        res = run_bundle(bundle.path, PROMPTS, 8, dump_logits=True)
    for prompt, ours, logits in zip(PROMPTS, res["outputs"], res["logits"]):
        ref, ref_logits = greedy(model, prompt, 8)
        err = (ref_logits - logits).abs().max().item()
        print(f"prompt {prompt}\n  msc   {ours}\n  eager {ref}   {'match' if ours == ref else 'DIFFER'}, max |logit diff| {err:.2e}")


if __name__ == "__main__":
    main()
