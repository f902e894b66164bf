"""DeepSeek sparse attention (DSA, issue 26): DeepSeek-V3.2's indexer keeps 4 positions a query in the tiny
config, so its prompts and decode steps attend to a strict subset of their past. msc's tokens equal transformers'
as role processes and on the colocated engine (chunked prompts, mixed steps), the selection matters (the same
weights attending densely give other logits), and an indexer msc does not know is refused by name."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from msc.compiler import compile_spec
from msc.engine.engine import Engine
from msc.engine.request import SamplingParams
from msc.engine.runner import ModelRunner
from msc.errors import MscError
from msc.spec import parse_spec
from msc.verify import reference_generate, verify_bundle
from tests.models.families import SPARSE_FAMILIES

PROMPTS = [[5, 17, 42], [7, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [200, 100, 50, 25, 3, 1, 4, 1, 5]]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    spec = parse_spec({"model": {"config": SPARSE_FAMILIES["deepseek_v32"], "seed": 0, "dtype": "float32"},
                       "device": "cpu", "plan": {"experts": {"nodes": 2}}})
    return compile_spec(spec, tmp_path_factory.mktemp("dsa") / "b")


def _incremental_logits(hf, prompt: list[int], out: list[int]) -> torch.Tensor:
    """transformers' logits of each generated step computed as generate does (prompt, then one token a step
    over its cache) -> [steps, V]."""
    with torch.no_grad():
        o = hf(torch.tensor([prompt]), use_cache=True)
        cache, rows = o.past_key_values, [o.logits[0, -1]]
        for t in out[:-1]:
            o = hf(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            rows.append(o.logits[0, -1])
    return torch.stack(rows)


def test_role_processes_match_transformers(bundle):
    from transformers import AutoModelForCausalLM

    from msc.runtime.launcher import run_bundle

    code = (bundle.path / "programs" / "attention.py").read_text()
    assert code.count("msc.dsa_index.default(") == SPARSE_FAMILIES["deepseek_v32"]["num_hidden_layers"]
    hf = AutoModelForCausalLM.from_pretrained(str(bundle.checkpoint_dir())).eval()
    res = run_bundle(bundle.path, PROMPTS, 8, dump_logits=True)
    assert res["outputs"] == [reference_generate(hf, p, 8) for p in PROMPTS]
    for prompt, out, ours in zip(PROMPTS, res["outputs"], res["logits"]):
        assert (_incremental_logits(hf, prompt, out) - ours).abs().max() < 1e-4


def test_transformers_full_forward_is_not_causal_here(bundle):
    """Why the logits above are compared with transformers' step-by-step forward, not its one-pass forward over
    prompt and output (verify_bundle's check): in transformers 5.25 DeepSeek-V3.2's one-pass forward lets later
    tokens change earlier positions' logits (its cached steps do not). If this starts failing, transformers
    fixed it and verify_bundle's check applies again."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(bundle.checkpoint_dir())).eval()
    prompt = PROMPTS[2]
    with torch.no_grad():
        alone = hf(torch.tensor([prompt])).logits[0, -1]
        followed = hf(torch.tensor([prompt + [5, 6, 7]])).logits[0, len(prompt) - 1]
    assert (alone - followed).abs().max() > 1e-3


def test_colocated_engine_with_chunked_prompts_matches_transformers(bundle, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hf = AutoModelForCausalLM.from_pretrained(str(bundle.checkpoint_dir())).eval()
    gm = bundle.load_program(bundle.manifest["colocated"]["program"], "cpu")
    eng = Engine(ModelRunner(gm, bundle.manifest["model"]["num_hidden_layers"], "cpu", max_batch=4), [-1],
                 vocab_size=256, max_batch=4, max_step_tokens=6, max_seq_len=64)
    reqs = eng.generate(PROMPTS, SamplingParams(max_tokens=10), arrivals=[0, 0, 1, 2])
    assert [r.output for r in reqs] == [reference_generate(hf, p, 10) for p in PROMPTS]
    assert eng.scheduler.cache.index_k is not None
    assert not eng.runner.graph_safe  # the indexer reads lengths on the host: no CUDA graphs


def test_the_selection_matters(bundle):
    """The same weights with an indexer that keeps every position give other logits: the sparse path is tested."""
    from transformers import AutoModelForCausalLM

    sparse = AutoModelForCausalLM.from_pretrained(str(bundle.checkpoint_dir())).eval()
    dense = AutoModelForCausalLM.from_pretrained(str(bundle.checkpoint_dir()), index_topk=1 << 20).eval()
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        gap = (sparse(ids).logits - dense(ids).logits).abs().max()
    assert gap > 1e-3


def test_an_unknown_indexer_is_refused_naming_it():
    from msc.models.sparse_attention import prepare_indexers

    class ToyIndexer(nn.Module):
        pass

    class ToyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.indexer = ToyIndexer()

    model = nn.Sequential(ToyAttention())
    with pytest.raises(MscError, match=r"0\.indexer \(ToyIndexer\) selects the tokens its attention sees"):
        prepare_indexers(model)
