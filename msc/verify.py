"""Check a bundle against the original Hugging Face model: same greedy tokens, logits within tolerance."""
from __future__ import annotations

import torch

from msc.bundle import Bundle
from msc.runtime.launcher import run_bundle


def default_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Three prompts of different lengths (5, 3 and 8 tokens), reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (5, 3, 8)]


def reference_generate(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id,
    )
    return out[0, len(prompt):].tolist()


def max_logit_error(model, prompts: list[list[int]], outputs: list[list[int]], logits: list[torch.Tensor]) -> float:
    """Largest |logit difference| between msc's per-step logits and the model's own forward over the
    same tokens (teacher forcing on msc's outputs)."""
    max_err = 0.0
    with torch.no_grad():
        for prompt, out, ours in zip(prompts, outputs, logits):
            if not out:
                continue
            seq = torch.tensor([prompt + out[:-1]])
            ref_logits = model(seq).logits[0, len(prompt) - 1 :].float()  # [steps, V]
            max_err = max(max_err, (ref_logits - ours).abs().max().item())
    return max_err


def verify_bundle(bundle_dir, prompts: list[list[int]] | None = None, max_new_tokens: int = 8) -> dict:
    from transformers import AutoModelForCausalLM

    bundle = Bundle.open(bundle_dir)
    model_type = bundle.manifest["model"]["model_type"]
    if model_type.startswith("custom:"):
        from msc.errors import MscError

        raise MscError(f"bundle {bundle.path} was compiled from a custom module ({model_type[7:]}), not a transformers "
                       "model, so there is no reference to verify it against here; run it with `msc run` and compare "
                       "with your module's own forward (see examples/custom_moe.py)")
    prompts = prompts or default_prompts(bundle.manifest["model"]["vocab_size"])
    ours = run_bundle(bundle.path, prompts, max_new_tokens, dump_logits=True)
    dtype = getattr(torch, bundle.manifest["model"]["dtype"])
    model = AutoModelForCausalLM.from_pretrained(str(bundle.checkpoint_dir()), dtype=dtype).eval()
    refs = [reference_generate(model, prompt, max_new_tokens) for prompt in prompts]
    max_err = max_logit_error(model, prompts, ours["outputs"], ours["logits"])
    return {
        "max_abs_logit_err": max_err,
        "tokens_match": refs == ours["outputs"],
        "prompts": prompts,
        "outputs": ours["outputs"],
        "reference_outputs": refs,
    }
