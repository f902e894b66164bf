"""msc: a compiler for disaggregated Mixture-of-Experts inference.

The Python API for custom models (see msc/api.py): `msc.attention`, `@msc.router`, `@msc.experts`,
`msc.mark_router`, `msc.mark_experts` and `msc.compile(model, spec_or_plan, out_dir)`; offline generation
over a bundle (msc/llm.py): `msc.LLM(bundle_dir).generate(prompts, msc.SamplingParams(...))`.
"""
__version__ = "0.1.0"

# NOTE: the API is exported lazily (PEP 562): `import msc` stays cheap for the role workers and the CLI,
# and msc.api (which pulls in the compiler on use) loads only when one of these names is touched.
_API = ("attention", "experts", "router", "mark_experts", "mark_router", "compile", "ExpertsMark")
_LLM = ("LLM", "SamplingParams")
__all__ = ["__version__", *_API, *_LLM]


def __getattr__(name: str):
    if name in _API:
        from msc import api

        return getattr(api, name)
    if name in _LLM:
        from msc import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'msc' has no attribute {name!r}")
