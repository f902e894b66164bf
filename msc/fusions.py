"""Fusions applied to a program when it is loaded (msc.bundle.Bundle.program_graph), each one op with one
Triton kernel on a GPU:

- RMSNorm, and the residual add before it (msc::rms_norm / msc::add_rms_norm). transformers' RMSNorm is
  captured as

      x32 = to(x, float32); ms = mean(pow(x32, 2), [-1], keepdim=True); r = rsqrt(add(ms, eps))
      out = mul(weight, to(mul(x32, r), dtype))

  and a decoder layer's `x = residual + h` usually feeds it. The rewrite matches exactly that chain (either
  operand order of each mul) and nothing looser: a norm written another way (Gemma's 1 + weight, a norm
  without the float32 cast) stays as it was.
- Rotary position embedding of q and of k (msc::rotary): `x * cos + cat(-x[h:], x[:h]) * sin`, transformers'
  rotate_half form. Interleaved (DeepSeek), complex (DeepSeek-V2) and GPT-OSS's own forms are other chains.

NOTE: the fused ops run the same aten ops on a CPU and wherever a kernel does not cover a call (shapes,
dtypes), so fusing never changes a CPU result. On a GPU the norm kernel (backends/compute/triton_norm.py;
MSC_NORM_KERNEL=0 turns it off) may change a value's last bit (float32 reduction order); the rotary kernel
rounds as the unfused ops do and gives their values. Done at load time, not as a compile pass, so that
bundles stay as captured (the colocated program and every role program alike) and `MSC_FUSE=0` compares with
and without on the same bundle.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from msc import env as msc_env
from msc.ir import fetch_attr
from msc.runtime.staged import STAGE_KEY

aten = torch.ops.aten


def _call(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _other(node: fx.Node, one) -> object | None:
    """The other operand of a binary mul/add node whose one operand is `one` (None: `one` is not an operand)."""
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


def _after(a: fx.Node, b: fx.Node) -> bool:
    """Whether node a comes after node b in their graph."""
    n = b.next
    while n is not b.graph._root:
        if n is a:
            return True
        n = n.next
    return False


def _node_maker(graph: fx.Graph):
    """make(target, args, base, op="call_function") -> a new node named base_N.

    NOTE: names chosen here: a graph rebuilt from a bundle's JSON names its nodes itself, so fx's own
    namespace does not know them and could hand out a name twice."""
    taken = {n.name for n in graph.nodes}

    def make(target, args, base, op="call_function"):
        i = 0
        while f"{base}_{i}" in taken:
            i += 1
        taken.add(f"{base}_{i}")
        return graph.create_node(op, target, args, name=f"{base}_{i}")

    return make


def fuse_program(gm_or_graph) -> dict[str, int]:
    """Every load-time fusion of the graph alone, in place: {"rms_norm": n, "add_rms_norm": m, "rotary": r};
    nothing with MSC_FUSE=0."""
    counts = fuse_rms_norms(gm_or_graph)
    counts.update(fuse_rotary(gm_or_graph))
    return counts


def fuse_weights(gm: fx.GraphModule, device) -> dict[str, int]:
    """The load-time fusions that rewrite weights too, once a program holds its tensors: sibling linears on a
    GPU (MSC_FUSE_LINEARS=1 applies it on a CPU as well, =0 nowhere; MSC_FUSE=0 turns every fusion off)."""
    flag = msc_env.switch("MSC_FUSE_LINEARS")
    if flag is False or (flag is None and torch.device(device).type != "cuda"):
        return {}
    return fuse_sibling_linears(gm)


def _match_rms_norm(out: fx.Node):
    """(x, weight, eps, dtype, nodes to drop) when `out` ends an RMSNorm chain, else None."""
    if not _call(out, aten.mul.Tensor) or len(out.args) != 2 or out.kwargs:
        return None
    for cast, weight in ((out.args[1], out.args[0]), (out.args[0], out.args[1])):
        if not (_call(cast, aten.to.dtype) and len(cast.args) == 2 and not cast.kwargs and len(cast.users) == 1):
            continue
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        scaled = cast.args[0]
        if not (_call(scaled, aten.mul.Tensor) and len(scaled.args) == 2 and len(scaled.users) == 1):
            continue
        for x32, r in ((scaled.args[0], scaled.args[1]), (scaled.args[1], scaled.args[0])):
            if not (_call(r, aten.rsqrt.default) and len(r.users) == 1 and _call(x32, aten.to.dtype)):
                continue
            if x32.args[1:] != (torch.float32,) or x32.kwargs:
                continue
            add = r.args[0]
            if not (_call(add, aten.add.Tensor) and len(add.args) == 2 and not add.kwargs and len(add.users) == 1
                    and isinstance(add.args[1], float)):
                continue
            mean = add.args[0]
            if not (_call(mean, aten.mean.dim) and list(mean.args[1:]) == [[-1], True] and not mean.kwargs
                    and len(mean.users) == 1):
                continue
            sq = mean.args[0]
            if not (_call(sq, aten.pow.Tensor_Scalar) and sq.args[0] is x32 and sq.args[1] == 2 and len(sq.users) == 1):
                continue
            return x32.args[0], weight, add.args[1], cast.args[1], [out, cast, scaled, r, add, mean, sq, x32]
    return None


def fuse_rms_norms(gm_or_graph) -> dict[str, int]:
    """Rewrite every matched RMSNorm (and the residual add feeding it) in place; {"rms_norm": n, "add_rms_norm": m}."""
    graph = gm_or_graph.graph if isinstance(gm_or_graph, fx.GraphModule) else gm_or_graph
    counts = {"rms_norm": 0, "add_rms_norm": 0}
    if not msc_env.switch("MSC_FUSE"):
        return counts
    import msc.ops  # noqa: F401  (registers the msc ops)

    make = _node_maker(graph)

    for out in list(graph.nodes):
        if out.graph is not graph:  # erased by an earlier rewrite
            continue
        m = _match_rms_norm(out)
        if m is None:
            continue
        x, weight, eps, dtype, chain = m
        meta = out.meta.get("msc", {})
        # NOTE: the add joins only when the pipeline schedules it with the norm (same stage, if staged)
        fuse_add = (_call(x, aten.add.Tensor) and len(x.args) == 2 and not x.kwargs
                    and all(isinstance(a, fx.Node) for a in x.args)
                    and x.meta.get("msc", {}).get(STAGE_KEY) == meta.get(STAGE_KEY))
        # NOTE: placed where the chain starts (right after the add, when fused), not at the norm's end: the
        # kept float32 cast and the sum's other users may come before the end and must see the new values
        with graph.inserting_before(x.next if fuse_add else chain[-1]):  # (inserting_after would reverse them)
            if fuse_add:
                pair = make(torch.ops.msc.add_rms_norm.default, (x.args[0], x.args[1], weight, eps, dtype), "add_rms_norm")
                normed = make(operator.getitem, (pair, 0), "add_rms_norm_out")
                total = make(operator.getitem, (pair, 1), "add_rms_norm_sum")
                new_nodes = (pair, normed, total)
            else:
                normed = make(torch.ops.msc.rms_norm.default, (x, weight, eps, dtype), "rms_norm")
                new_nodes = (normed,)
        for node in new_nodes:  # the norm's place in the schedule (pipeline stage, layer)
            node.meta["msc"] = dict(meta)
        if _after(weight, new_nodes[0]):  # a role program fetches each weight right before its first use
            new_nodes[0].prepend(weight)
        out.replace_all_uses_with(normed)
        for node in chain:  # the chain's nodes, last first: each has no users left once its consumer is gone
            if not node.users:  # NOTE: x32 may have other users (in a float32 graph the residual reads the no-op
                graph.erase_node(node)  # cast): it then stays, reading x (or the fused sum, below)
        if fuse_add:
            x.replace_all_uses_with(total)  # the sum's other users (the next residual) read the fused op's sum
            graph.erase_node(x)
            counts["add_rms_norm"] += 1
        else:
            counts["rms_norm"] += 1
    if isinstance(gm_or_graph, fx.GraphModule):
        gm_or_graph.recompile()
    return counts


# ---------------------------------------------------------------------------------------------- rotary
_SLICE_END = 2 ** 62  # an open-ended slice's end as torch.export writes it (sys.maxsize)


def _slice_of(node, x=None):
    """(source, dim, start, end) of a unit-step aten.slice node (end None when open-ended), else None."""
    if not (_call(node, aten.slice.Tensor) and not node.kwargs and len(node.args) in (4, 5) and len(node.users) == 1):
        return None
    src, dim, start, end = node.args[:4]
    if (len(node.args) == 5 and node.args[4] != 1) or (x is not None and src is not x):
        return None
    if not all(isinstance(v, int) for v in (dim, start)) or not (end is None or isinstance(end, int)):
        return None
    return src, dim, start, (None if end is None or end >= _SLICE_END else end)


def _match_rotary(out: fx.Node):
    """(x, cos, sin, dim, half, cat_dim, nodes to drop) when `out` is x * cos + cat(-x[half:], x[:half]) * sin
    (the slices along dim, the cat along cat_dim: the same dimension when both name the last), else None."""
    if not (_call(out, aten.add.Tensor) and len(out.args) == 2 and not out.kwargs):
        return None
    for plain, turned in ((out.args[0], out.args[1]), (out.args[1], out.args[0])):
        if not (_call(plain, aten.mul.Tensor) and _call(turned, aten.mul.Tensor) and len(plain.users) == 1
                and len(turned.users) == 1 and not plain.kwargs and not turned.kwargs and plain is not turned):
            continue
        for cat, sin in ((turned.args[0], turned.args[1]), (turned.args[1], turned.args[0])):
            if not (_call(cat, aten.cat.default) and len(cat.users) == 1 and not cat.kwargs
                    and isinstance(sin, fx.Node) and len(cat.args[0]) == 2):
                continue
            dim = cat.args[1] if len(cat.args) > 1 else 0
            neg, low = cat.args[0]
            if not (_call(neg, aten.neg.default) and len(neg.users) == 1):
                continue
            hi = _slice_of(neg.args[0])
            lo = _slice_of(low, hi[0]) if hi else None
            if not (isinstance(dim, int) and hi and lo and hi[1] == lo[1] and lo[2] == 0 and lo[3] == hi[2] and hi[3] is None and hi[2] > 0):
                continue
            x = hi[0]
            cos = _other(plain, x)
            if not isinstance(cos, fx.Node) or cos is x:
                continue
            return x, cos, sin, hi[1], hi[2], dim, [out, plain, turned, cat, neg, neg.args[0], low]
    return None


def fuse_rotary(gm_or_graph) -> dict[str, int]:
    """Rewrite every matched rotary embedding (transformers' rotate_half form) in place; {"rotary": n}.

    NOTE: other forms (DeepSeek's interleaved pairs, complex multiplication, a partial rotary's pass-through
    part) are different chains and stay as they are."""
    graph = gm_or_graph.graph if isinstance(gm_or_graph, fx.GraphModule) else gm_or_graph
    counts = {"rotary": 0}
    if not msc_env.switch("MSC_FUSE"):
        return counts
    import msc.ops  # noqa: F401  (registers the msc ops)

    make = _node_maker(graph)
    for out in list(graph.nodes):
        if out.graph is not graph:
            continue
        m = _match_rotary(out)
        if m is None:
            continue
        x, cos, sin, dim, half, cat_dim, chain = m
        with graph.inserting_before(out):  # every input is defined before the chain's products
            node = make(torch.ops.msc.rotary.default, (x, cos, sin, dim, half, cat_dim), "rotary")
        node.meta["msc"] = dict(out.meta.get("msc", {}))
        out.replace_all_uses_with(node)
        for n in chain:  # last first: each has no users left once its consumer is gone
            graph.erase_node(n)
        counts["rotary"] += 1
    if isinstance(gm_or_graph, fx.GraphModule):
        gm_or_graph.recompile()
    return counts


# ---------------------------------------------------------------------------------------------- sibling linears
def _delete_attr(gm: fx.GraphModule, target: str) -> None:
    owner, _, leaf = target.rpartition(".")
    delattr(gm.get_submodule(owner) if owner else gm, leaf)


def fuse_sibling_linears(gm: fx.GraphModule) -> dict[str, int]:
    """Linears that read the same input (q, k and v; a shared expert's gate and up) become one linear over
    their weights concatenated, split after it; in place, weights included: {"linear_groups": n, "linears": m}.

    A group takes linears whose weights (and biases, all or none) no other node reads, of one dtype, device
    and input width, in one pipeline stage. The originals' tensors are dropped, so memory stays as it was.
    NOTE: for a GPU (msc.bundle calls it for CUDA programs): one GEMM instead of three at decode sizes, where
    k's and v's are too small to fill the GPU; on a CPU the separate products are kept, so that a CPU
    result stays the stored program's bit for bit. The split outputs are views of the fused product with
    its row stride: a `view` reading one directly becomes a `reshape` (the same values; a copy where the
    strides cannot be viewed)."""
    graph = gm.graph
    counts = {"linear_groups": 0, "linears": 0}
    if not msc_env.switch("MSC_FUSE"):
        return counts
    readers: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            readers[n.target] = readers.get(n.target, 0) + 1

    def own_attr(node) -> bool:  # a get_attr node whose tensor nothing else reads
        return isinstance(node, fx.Node) and node.op == "get_attr" and len(node.users) == 1 and readers[node.target] == 1

    groups: dict[tuple, list[fx.Node]] = {}
    for n in graph.nodes:
        if not (_call(n, aten.linear.default) and not n.kwargs and len(n.args) in (2, 3)):
            continue
        bias = n.args[2] if len(n.args) == 3 else None
        if not own_attr(n.args[1]) or not (bias is None or own_attr(bias)):
            continue
        groups.setdefault((n.args[0], bias is not None, n.meta.get("msc", {}).get(STAGE_KEY)), []).append(n)
    make = _node_maker(graph)
    for (x, has_bias, _), lins in groups.items():
        if len(lins) < 2:
            continue
        ws = [fetch_attr(gm, lin.args[1].target) for lin in lins]
        bs = [fetch_attr(gm, lin.args[2].target) for lin in lins] if has_bias else []
        w0 = ws[0]
        if not all(w.dim() == 2 and w.shape[1] == w0.shape[1] and w.dtype == w0.dtype and w.device == w0.device
                   for w in ws) or not all(b.dim() == 1 and b.dtype == bs[0].dtype for b in bs):
            continue
        sizes = [w.shape[0] for w in ws]
        first = lins[0]  # graph order: the input is defined before every linear of the group
        base = "msc_fused_" + first.args[1].target.rpartition(".")[0].replace(".", "_")
        attrs = [(base + "_weight", torch.cat(ws))] + ([(base + "_bias", torch.cat(bs))] if has_bias else [])
        for lin in lins:  # the originals' tensors go: the fused copy takes their place in memory
            for arg in lin.args[1:]:
                _delete_attr(gm, arg.target)
        del ws, bs, w0
        with graph.inserting_before(first):
            new_attrs = []
            for name, tensor in attrs:
                gm.register_buffer(name, tensor)
                new_attrs.append(make(name, (), name, op="get_attr"))
            fused = make(aten.linear.default, (x, *new_attrs), "linear_fused")
            split = make(aten.split_with_sizes.default, (fused, sizes, -1), "linear_split")
            parts = [make(operator.getitem, (split, i), "linear_part") for i in range(len(lins))]
        meta = first.meta.get("msc", {})
        for node in (*new_attrs, fused, split, *parts):
            node.meta["msc"] = dict(meta)
        for lin, part in zip(lins, parts):
            lin.replace_all_uses_with(part)
            for user in part.users:
                if _call(user, aten.view.default):
                    user.target = aten.reshape.default
            old = lin.args[1:]
            graph.erase_node(lin)
            for arg in old:
                graph.erase_node(arg)
        counts["linear_groups"] += 1
        counts["linears"] += len(lins)
    gm.recompile()
    return counts
