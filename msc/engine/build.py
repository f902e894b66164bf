"""An engine for a bundle's program: the sizes the spec and the device decide (batch, sequence length, KV pool)."""
from __future__ import annotations

import torch
import torch.fx as fx

from msc import env as msc_env
from msc.engine.engine import Engine
from msc.engine.runner import ModelRunner
from msc.errors import MscError
from msc.runtime.trace import Trace

DEFAULT_MAX_SEQ_LEN = 4096
CPU_KV_BYTES = 1 << 30  # the default KV pool's cap on the CPU
GPU_KV_FRACTION = 0.25  # ... and on a GPU, of its memory (roles of one GPU share it)


def max_seq_len_of(manifest: dict) -> int:
    """The longest sequence (prompt + generated tokens) an engine of this bundle holds."""
    longest = manifest["model"].get("max_position_embeddings") or DEFAULT_MAX_SEQ_LEN
    return manifest["spec"]["runtime"].get("max_seq_len") or min(longest, DEFAULT_MAX_SEQ_LEN)


def engine_sizes(manifest: dict, runner: ModelRunner) -> dict:
    """max_batch, max_seq_len, max_step_tokens and kv_tokens of an engine for this bundle on runner's device."""
    rt = manifest["spec"]["runtime"]
    max_batch = manifest["plan"]["batch_size"]
    max_seq_len = max_seq_len_of(manifest)
    kv_tokens = rt.get("kv_cache_tokens")
    if kv_tokens is None:
        per_token = runner.kv_bytes_per_token()
        dev = runner.device
        cap = (torch.cuda.get_device_properties(dev).total_memory * GPU_KV_FRACTION if dev.type == "cuda"
               else CPU_KV_BYTES)
        # NOTE: state layers keep a fixed state per sequence slot (msc.runtime.sequence_state), allocated for the
        # whole batch beside the pages: it comes out of the same budget
        states = runner.state_bytes_per_sequence() * (max_batch + 1)
        kv_tokens = int(min(max_batch * max_seq_len, max(cap - states, 0) // per_token))
        if kv_tokens < max_seq_len:
            if states:
                raise MscError(f"the state layers' {states:,} bytes for {max_batch} sequences leave the KV cache "
                               f"{kv_tokens} tokens, less than one sequence of max_seq_len={max_seq_len}; lower "
                               "plan.batch_size or set runtime.kv_cache_tokens")
            raise MscError(f"the KV cache's default size ({kv_tokens} tokens at {per_token} bytes a token) cannot hold "
                           f"one sequence of max_seq_len={max_seq_len}; set runtime.kv_cache_tokens or runtime.max_seq_len")
    return {"max_batch": max_batch, "max_seq_len": max_seq_len, "max_step_tokens": rt.get("max_step_tokens", 8192),
            "kv_tokens": kv_tokens}


def prefix_caching_of(manifest: dict, overrides: dict | None = None) -> bool | None:
    """Prefix caching as this bundle's engines will have it: MSC_PREFIX_CACHE (overrides: the variables given to
    role processes), else the spec's runtime.prefix_caching; None leaves it to the engine (on unless the model
    has state layers)."""
    env = msc_env.switch("MSC_PREFIX_CACHE", overrides)
    return env if env is not None else manifest["spec"]["runtime"].get("prefix_caching")


def build_engine(manifest: dict, program: fx.GraphModule, device, *, exchange=None, microbatches: int = 1,
                 trace: Trace | None = None, delay_s: float = 0.0, keep_logits: bool = False,
                 cuda_graphs: bool = True, overlap: bool | None = None, prefix_caching: bool | None = None) -> Engine:
    """The engine of one attention replica (exchange given: the experts are remote) or of a colocated program."""
    model = manifest["model"]
    runner = ModelRunner(program, model["num_hidden_layers"], device, exchange=exchange, microbatches=microbatches,
                         cuda_graphs=cuda_graphs, max_batch=manifest["plan"]["batch_size"], trace=trace, delay_s=delay_s)
    eos = model["eos_token_id"]
    if prefix_caching is None:
        prefix_caching = prefix_caching_of(manifest)
    return Engine(runner, eos if isinstance(eos, (list, tuple)) else [eos], keep_logits=keep_logits, overlap=overlap,
                  prefix_caching=prefix_caching, vocab_size=model["vocab_size"], **engine_sizes(manifest, runner))
