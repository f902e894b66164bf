"""The call targets a stored program may name: the allow-list `msc.ir` checks before a program is built.

A bundle's programs are data. Loading one must never import a module, open a library or read a file, so
a node's target is accepted only when it is
  - one of msc's own ops (`torch.ops.msc.NAME.OVERLOAD`, registered by msc.ops),
  - an aten op whose exact name `torch.ops.aten.NAME.OVERLOAD` is in ATEN_TARGETS below, or
  - one of the `operator` builtins in msc.ir's table.

ATEN_TARGETS holds two groups:
  EMITTED: every aten op found in the programs of every tested family (tests/models/families.py, named
    and generic families, the custom-model example) compiled by the default pass pipeline with plans
    covering tensor parallelism, replicas and micro-batches. tests/test_program_safety.py recompiles the
    tested families and fails if one of their targets is missing here.
  COMMON: a few more pure tensor computations that torch.export commonly produces for transformer models,
    so a model close to the tested ones does not fail to compile for an op that is as harmless.

NOTE: adding an op here is a reviewed change. Only ops that compute on their tensor arguments belong here:
never ones that read or write files or shared memory (aten.from_file, aten.save), load code, or change
global state (random seeds, thread counts, allocator settings).
"""
from __future__ import annotations

EMITTED: frozenset[str] = frozenset(f"torch.ops.aten.{n}" for n in (
    "abs.default", "add.Tensor", "alias.default", "arange.start_step", "bitwise_not.default", "cat.default",
    "chunk.default", "clamp.Tensor", "clamp.default", "concat.default", "copy_.default", "cos.default",
    "div.Tensor", "div_.Tensor", "dropout.default", "embedding.default", "expand.default", "flatten.using_ints",
    "gather.default", "ge.Scalar", "gt.Scalar", "index.Tensor", "layer_norm.default", "linalg_vector_norm.default",
    "linear.default", "logical_or.default", "lt.Scalar", "masked_fill.Scalar", "max.dim", "mean.dim", "mul.Tensor",
    "neg.default", "new_empty.default", "pow.Scalar", "pow.Tensor_Scalar", "reciprocal.default",
    "repeat_interleave.self_int", "reshape.default", "rsqrt.default", "scatter.value", "scatter_.value",
    "sigmoid.default", "silu.default", "sin.default", "slice.Tensor", "softmax.int", "split_with_sizes.default",
    "squeeze.default", "stack.default", "sub.Tensor", "sum.dim_IntList", "sym_size.int", "to.device", "to.dtype", "to.dtype_layout",
    "topk.default", "transpose.int", "type_as.default", "unsqueeze.default", "view.default", "zeros_like.default",
))

COMMON: frozenset[str] = frozenset(f"torch.ops.aten.{n}" for n in (
    # matrix products
    "mm.default", "bmm.default", "matmul.default", "addmm.default", "baddbmm.default",
    # elementwise math and activations
    "exp.default", "log.default", "tanh.default", "relu.default", "gelu.default", "sqrt.default", "erf.default",
    "square.default",
    "softplus.default", "clamp_min.default", "clamp_max.default", "minimum.default", "maximum.default",
    "mul.Scalar", "add.Scalar", "sub.Scalar", "div.Scalar", "rsub.Scalar", "floor_divide.default",
    # comparisons and masks
    "where.self", "eq.Scalar", "eq.Tensor", "ne.Scalar", "lt.Tensor", "le.Scalar", "gt.Tensor", "logical_and.default",
    "logical_not.default", "bitwise_and.Tensor", "bitwise_or.Tensor", "masked_fill.Tensor", "triu.default",
    "tril.default",
    # reductions, normalisation, selection
    "mean.default", "sum.default", "amax.default", "argmax.default", "sort.default", "cumsum.default",
    "_softmax.default", "log_softmax.int", "rms_norm.default", "one_hot.default", "scatter_add.default",
    "index_select.default", "select.int",
    # shapes, views and copies
    "permute.default", "clone.default", "contiguous.default", "_unsafe_view.default", "_to_copy.default",
    "split.Tensor", "narrow.default", "unbind.int", "repeat.default", "expand_as.default", "squeeze.dim",
    "unflatten.int", "tensor_split.indices",
    # complex numbers (DeepSeek-V2's rotary embedding multiplies by e^{iθ})
    "polar.default", "view_as_complex.default", "view_as_real.default",
    # new tensors (shapes from their arguments)
    "full.default", "zeros.default", "ones.default", "arange.default", "arange.start", "new_zeros.default",
    "full_like.default", "ones_like.default",
))

ATEN_TARGETS: frozenset[str] = EMITTED | COMMON
