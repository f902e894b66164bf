"""shard_tensor_parallel: attention heads split over tp ranks (column-parallel q/k/v, row-parallel output
projection + all-reduce), run as tp real processes joined by a gloo group, against transformers.

Each rank runs the colocated program's share on the one engine (experts replicated, as in a colocated
tensor-parallel deployment): every rank must produce transformers' greedy tokens, with logits within
1e-4 of the model's own, and hold only its key/value heads in its KV cache.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from msc.errors import MscError
from msc.verify import reference_generate
from msc.passes.shard_tensor_parallel import check_tp, head_rows, model_heads, shard_attention
from tests.models.families import FAMILIES

PROMPTS = [[5, 17, 42, 8], [7, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
ARRIVALS = [0, 1, 3]
NEW = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, tp: int, port: int, bundle_dir: str, heads: tuple[int, int], out) -> None:
    """One tensor-parallel rank: join the group, shard the colocated program, generate."""
    os.environ["TRITON_INTERPRET"] = "0"
    from datetime import timedelta

    import torch.distributed as dist

    from msc.bundle import Bundle
    from msc.engine.build import build_engine
    from msc.engine.request import SamplingParams
    from msc.runtime import tensor_parallel
    from msc.passes.shard_tensor_parallel import with_sliced_parameters

    try:
        store = dist.TCPStore("127.0.0.1", port, tp, rank == 0, timeout=timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=tp, timeout=timedelta(seconds=60))
        tensor_parallel.join(dist.group.WORLD, rank, tp)
        bundle = Bundle.open(bundle_dir)
        gm = bundle.load_program(bundle.manifest["colocated"]["program"], "cpu")
        program, slices = shard_attention(gm, tp, rank, *heads)
        eng = build_engine(bundle.manifest, with_sliced_parameters(program, slices), "cpu", keep_logits=True)
        reqs = eng.generate(PROMPTS, SamplingParams(max_tokens=NEW), arrivals=ARRIVALS)
        out.put((rank, [r.output for r in reqs], [torch.stack(r.logits).tolist() for r in reqs], eng.runner.kv_shape()[0]))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 (reported to the test)
        out.put((rank, f"{type(e).__name__}: {e}", None, None))


def _run_tp(bundle_dir, tp: int, heads: tuple[int, int]) -> list:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, tp, port, str(bundle_dir), heads, out)) for r in range(tp)]
    for p in procs:
        p.start()
    try:
        results = sorted(out.get(timeout=240) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return results


@pytest.fixture(scope="module")
def compiled(family_bundle):
    return lambda name: family_bundle(name)[1:]


@pytest.mark.parametrize("name,tp", [("mixtral", 2), ("mixtral", 4), ("qwen3_moe", 2), ("gpt_oss", 2), ("gpt_oss", 4),
                                     ("deepseek_v3", 2), ("dbrx", 2)])
def test_tensor_parallel_ranks_generate_transformers_tokens(compiled, name, tp):
    bundle, hf = compiled(name)
    heads = model_heads(hf.config)
    refs = [reference_generate(hf, p, NEW) for p in PROMPTS]
    results = _run_tp(bundle.path, tp, heads)
    for rank, outputs, logits, kv_heads in results:
        assert not isinstance(outputs, str), f"rank {rank}: {outputs}"
        assert outputs == refs, f"rank {rank}"
        # its own key/value heads (one, replicated, when tp > nkv); MLA's one latent head on every rank
        assert kv_heads == (1 if getattr(hf.config, "kv_lora_rank", None) else max(1, heads[1] // tp))
        with torch.no_grad():
            for prompt, out, ours in zip(PROMPTS, outputs, logits):
                ref = hf(torch.tensor([prompt + out[:-1]])).logits[0, len(prompt) - 1:]  # [NEW, V]
                assert (ref - torch.tensor(ours)).abs().max().item() < 1e-4


def test_the_rank_slices_tile_every_projection():
    for heads, tp in ((8, 2), (8, 4), (2, 4), (4, 4)):
        rows = [head_rows(r, tp, heads, 16) for r in range(tp)]
        if heads % tp == 0:  # disjoint and covering
            assert rows[0][0] == 0 and rows[-1][1] == heads * 16 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
        else:  # replicated: each head on tp / heads consecutive ranks
            assert [r[0] // 16 for r in rows] == [r // (tp // heads) for r in range(tp)]


def test_a_tp_that_does_not_split_the_heads_is_refused():
    with pytest.raises(MscError, match="does not divide the model's 4 attention heads"):
        check_tp(3, 4, 2)
    with pytest.raises(MscError, match="neither divides the model's 6 key/value heads"):
        check_tp(4, 12, 6)


def test_mla_shares_its_latent_projection_and_splits_the_per_head_ones(compiled):
    bundle, _ = compiled("deepseek_v3")
    gm = bundle.load_program(bundle.manifest["colocated"]["program"], "cpu")
    cfg = FAMILIES["deepseek_v3"]
    _, slices = shard_attention(gm, 2, 1, cfg["num_attention_heads"], cfg["num_key_value_heads"])
    layer0 = {k.split("self_attn.")[1]: v for k, v in slices.items() if "layers.0.self_attn" in k}
    # q_b and kv_b are per head (rank 1: the second half of the heads); q_a and kv_a (the latents) stay whole
    assert set(layer0) == {"q_b_proj.weight", "kv_b_proj.weight", "o_proj.weight"}
    assert layer0["q_b_proj.weight"]["rows"][0] > 0 and layer0["o_proj.weight"]["cols"][0] > 0


def test_a_fused_qkv_projection_gives_each_rank_its_q_k_and_v_rows(compiled):
    bundle, _ = compiled("dbrx")
    gm = bundle.load_program(bundle.manifest["colocated"]["program"], "cpu")
    program, slices = shard_attention(gm, 2, 1, 4, 2)
    wqkv = next(v for k, v in slices.items() if "blocks.0" in k and "Wqkv" in k)
    # head_dim 16: q rows 64 (4 heads), k and v rows 32 each (2 heads); rank 1 of 2: q heads 2-3, kv head 1
    assert wqkv == {"cat_rows": [[32, 64], [64 + 16, 64 + 32], [96 + 16, 96 + 32]]}
    splits = [n.args[1] for n in program.graph.nodes if n.target is torch.ops.aten.split_with_sizes.default
              and n.args[2] == 2]
    assert splits and all(list(sz) == [32, 16, 16] for sz in splits)
