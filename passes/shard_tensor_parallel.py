"""shard_tensor_parallel: each tensor-parallel rank's share of the attention and expert programs.

Before (each layer, one rank holds every head):
    q = linear(x, Wq, bq) ─┐
    k = linear(x, Wk, bk) ─┼─▶ (views, norms, rotary) ─▶ msc::attention(q, k, v, ..., sinks) ─▶ (views)
    v = linear(x, Wv, bv) ─┘                                                                     │
    y = linear(a, Wo, bo) ◀──────────────────────────────────────────────────────────────────────┘
After, on rank r of tp (heads split over the ranks):
    q, k, v = linear(x, rows of Wq/Wk/Wv (and bq/bk/bv) of rank r's heads)       column-parallel
    msc::attention over rank r's heads (sinks: rank r's entries)
    y = linear(a, columns of Wo of rank r's heads); y = msc::tp_all_reduce(y); y = y + bo   row-parallel

Rank r holds query heads [r·nh/tp, (r+1)·nh/tp) and the key/value heads they read: [r·nkv/tp, ...) when
tp divides nkv; when tp exceeds nkv (and is a multiple of it) each key/value head is replicated on the
tp/nkv ranks whose query heads use it. The KV cache of a rank holds its own key/value heads only.

The projections are found from the graph, not from names: for each msc::attention node, the aten.linear
nodes q, k and v come from (searching back through view, norm and rotary nodes) and the first aten.linear
its output reaches (searching forward through views). A projection viewed per head ([1, T, -1, d]) is
split; one shared by every head (MLA's latents) stays whole, and shapes that name the head count are
rewritten; msc::mla_attention's kv_b weight is split by head rows; a fused QKV projection (DBRX) gives each rank its q, k and v rows. The embedding and the LM
head are split by vocabulary rows (_shard_vocabulary); router and norms stay replicated. Expert programs
split every expert's intermediate dimension (shard_experts). A meta-device run of rank 0's attention
program refuses, at compile time, a program that does not fit its share.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from msc.errors import MscError
from msc.ir import ROLE_ATTENTION, fetch_attr, get_attr_targets, graph_meta, node_meta
from msc.ops import MSC_OPS, is_attention, is_op
from msc.pass_manager import Pass, PassResult, register_pass, require_ran
from msc.runtime.staged import STAGE_KEY

LINEAR = torch.ops.aten.linear.default
MSC_OP_TARGETS = set(MSC_OPS.values())
_VIEWS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.transpose.int,
          torch.ops.aten._unsafe_view.default, torch.ops.aten.contiguous.default, torch.ops.aten.clone.default}


def check_tp(tp: int, num_heads: int, num_kv_heads: int, key: str = "plan.attention.tp") -> None:
    """MscError naming the numbers when tp cannot split these heads."""
    if tp < 1 or num_heads % tp:
        raise MscError(f"{key} = {tp} does not divide the model's {num_heads} attention heads")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise MscError(f"{key} = {tp} neither divides the model's {num_kv_heads} key/value heads nor is a multiple of "
                       "them (then each key/value head would be replicated on tp / heads ranks)")


def head_rows(rank: int, tp: int, heads: int, head_dim: int) -> tuple[int, int]:
    """Rows of a [heads·head_dim, ...] projection that rank `rank` of tp holds."""
    if heads % tp == 0:
        per = heads // tp
        return rank * per * head_dim, (rank + 1) * per * head_dim
    h = rank // (tp // heads)  # replicated: the key/value head of this rank's query heads
    return h * head_dim, (h + 1) * head_dim


def _source_linears(node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The aten.linear nodes that `node` (an attention input) is computed from (searching back through
    views, norms and rotary, stopping at each linear), and the nodes passed on the way."""
    found, seen, todo, region = [], set(), [node], []
    while todo:
        n = todo.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if n.target is LINEAR:
            found.append(n)
            continue
        if n.target in MSC_OP_TARGETS:  # another msc op (an earlier layer's experts ...): not this projection
            continue
        region.append(n)
        todo.extend(n.all_input_nodes)
        todo.extend(_copied_into(n))
    return found, region


def _split_fused_qkv(gm: fx.GraphModule, lin: fx.Node, layer: int, rank: int, tp: int, nh: int, nkv: int, param,
                     put) -> None:
    """A fused QKV projection (DBRX's Wqkv): linear → elementwise ops (a clamp) → split into q, k, v on the
    last dimension. Rank's rows: its query heads' rows, then its key and value heads' rows (a concatenation
    of three row ranges), and the split takes the rank's sizes."""
    n = lin
    while len(n.users) == 1 and next(iter(n.users)).target in (torch.ops.aten.clamp.default, torch.ops.aten.to.dtype):
        n = next(iter(n.users))
    split = next(iter(n.users)) if len(n.users) == 1 else None
    if split is None or split.target is not torch.ops.aten.split_with_sizes.default or len(split.args[1]) != 3:
        raise MscError(f"tensor parallelism: layer {layer}'s fused QKV projection is not split into q, k and v by one "
                       "split_with_sizes; msc cannot split it")
    q_size, k_size, v_size = split.args[1]
    if q_size % nh or k_size % nkv or v_size != k_size:
        raise MscError(f"tensor parallelism: layer {layer}'s fused QKV split {list(split.args[1])} does not match "
                       f"{nh} query and {nkv} key/value heads")
    hd, kd = q_size // nh, k_size // nkv
    qa, qb = head_rows(rank, tp, nh, hd)
    ka, kb = head_rows(rank, tp, nkv, kd)
    ranges = [[qa, qb], [q_size + ka, q_size + kb], [q_size + k_size + ka, q_size + k_size + kb]]
    put(param(lin.args[1]), {"cat_rows": ranges})
    if len(lin.args) > 2 and lin.args[2] is not None:
        put(param(lin.args[2]), {"cat_rows": ranges})
    split.args = (split.args[0], [qb - qa, kb - ka, kb - ka], *split.args[2:])


def _copied_into(n: fx.Node) -> list[fx.Node]:
    """Sources of in-place copies into n or into a slice of it (MLA fills its key tensor this way)."""
    dests = [n] + [u for u in n.users if u.op == "call_function" and u.target is torch.ops.aten.slice.Tensor]
    return [c.args[1] for d in dests for c in d.users
            if c.op == "call_function" and c.target is torch.ops.aten.copy_.default and c.args[0] is d]


def _per_head(lin: fx.Node) -> bool:
    """True when the projection's output is viewed as [1, T, heads, head_dim] with the head count left to
    the tensor (-1): one block of rows per head, which the ranks can split. A projection viewed otherwise
    (MLA's shared latent and rotary key part) is shared by all heads and stays whole on every rank."""
    n = lin
    while len(n.users) == 1:
        u = next(iter(n.users))
        if u.op != "call_function":
            return False
        if u.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default):
            shape = list(u.args[1])
            return len(shape) == 4 and shape[2] == -1
        if u.target not in _VIEWS and u.target is not torch.ops.aten.to.dtype:
            return False
        n = u
    return False


_SHAPED = {torch.ops.aten.new_empty.default, torch.ops.aten.new_zeros.default, torch.ops.aten.expand.default,
           torch.ops.aten.view.default, torch.ops.aten.reshape.default}


def _output_linear(attn: fx.Node, layer: int) -> fx.Node:
    """The linear projection the attention output goes through (o_proj), past views only."""
    n = attn
    while True:
        users = list(n.users)
        if len(users) != 1:
            break
        u = users[0]
        if u.op == "call_function" and u.target is LINEAR and u.args[0] is n:
            return u
        if u.op == "call_function" and u.target in _VIEWS:
            n = u
            continue
        break
    raise MscError(f"tensor parallelism: layer {layer}'s attention output does not go straight (through views) into "
                   "one linear projection; msc cannot split it row-parallel")


def shard_attention(gm: fx.GraphModule, tp: int, rank: int, num_heads: int, num_kv_heads: int
                    ) -> tuple[fx.GraphModule, dict[str, dict]]:
    """Rank `rank`'s program (a new GraphModule, same parameters object) and the slice of each sharded
    parameter: {target: {"rows": [a, b]} or {"cols": [a, b]}}; see the module docstring."""
    check_tp(tp, num_heads, num_kv_heads)
    graph = fx.Graph()
    env: dict = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    new = fx.GraphModule(gm, graph)
    slices: dict[str, dict] = {}

    def param(node) -> str:
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            raise MscError(f"tensor parallelism: expected a parameter, found {node}")
        return node.target

    def put(target: str, sl: dict) -> None:
        if target in slices and slices[target] != sl:
            raise MscError(f"tensor parallelism: parameter '{target}' would be split two ways (a fused or shared "
                           "projection); msc does not shard it")
        slices[target] = sl

    for attn in [n for n in new.graph.nodes if is_attention(n)]:
        mla = is_op(attn, "mla_attention")
        layer = attn.args[4] if mla else attn.args[3]
        found = {}
        region: list[fx.Node] = []
        # NOTE: MLA's latent and rotary key are shared by every head (whole on every rank); its per-head
        # projections are the query's and kv_b (the op's weight argument: rows of this rank's heads)
        inputs = (("q", attn.args[0]),) if mla else (("q", attn.args[0]), ("k", attn.args[1]), ("v", attn.args[2]))
        for what, arg in inputs:
            found[what], passed = _source_linears(arg)
            region += passed
        feeds: dict[fx.Node, set[str]] = {}
        for what, lins in found.items():
            for lin in lins:
                feeds.setdefault(lin, set()).add(what)
        split_any = {w: False for w in found}
        for lin, inputs in feeds.items():
            if inputs == {"q", "k", "v"}:
                _split_fused_qkv(new, lin, layer, rank, tp, num_heads, num_kv_heads, param, put)
                split_any = {w: True for w in found}
                continue
            if "q" in inputs and inputs & {"k", "v"}:
                raise MscError(f"tensor parallelism: layer {layer}'s attention inputs q and {sorted(inputs - {'q'})[0]} "
                               "come from one projection that does not also give the third; msc cannot split it")
            if not _per_head(lin):
                continue  # shared by every head (MLA's latent / rotary key part): whole on every rank
            heads = num_heads if inputs == {"q"} else num_kv_heads
            w = param(lin.args[1])
            features = fetch_attr(new, w).shape[0]
            if features % heads:
                raise MscError(f"tensor parallelism: layer {layer}'s {'/'.join(sorted(inputs))} projection has "
                               f"{features} outputs, not a multiple of its {heads} heads")
            a, b = head_rows(rank, tp, heads, features // heads)
            put(w, {"rows": [a, b]})
            if len(lin.args) > 2 and lin.args[2] is not None:
                put(param(lin.args[2]), {"rows": [a, b]})
            for what in inputs:
                split_any[what] = True
        missing = [w for w, ok in split_any.items() if not ok]
        if missing:
            raise MscError(f"tensor parallelism: layer {layer}'s attention input {missing[0]} comes from no projection "
                           "msc can split by head")
        # NOTE: a shape that names the head count (MLA builds its key as new_empty([1, heads, T, d]) and expands
        # the shared rotary part to every head) takes this rank's count instead
        for n in region:
            if n.target in _SHAPED and len(n.args) > 1 and isinstance(n.args[1], (list, tuple)) and len(n.args[1]) >= 4:
                shape = list(n.args[1])
                if shape[1] in (num_heads, num_kv_heads):
                    heads = num_heads if shape[1] == num_heads else num_kv_heads
                    shape[1] = heads // tp if heads % tp == 0 else 1
                    n.args = (n.args[0], shape, *n.args[2:])
        if mla:  # kv_b's rows: dn + dv per key/value head (as many as the query heads, or fewer: grouped)
            w = param(attn.args[3])
            per = attn.args[7] + attn.args[8]
            rows = fetch_attr(new, w).shape[0]
            check_tp(tp, num_heads, rows // per, "plan.attention.tp")
            put(w, {"rows": list(head_rows(rank, tp, rows // per, per))})
        sinks = None if mla else attn.args[6] if len(attn.args) > 6 else attn.kwargs.get("sinks")
        if sinks is not None:
            per = num_heads // tp
            put(param(sinks), {"rows": [rank * per, (rank + 1) * per]})
        o = _output_linear(attn, layer)
        w = param(o.args[1])
        cols = fetch_attr(new, w).shape[1]
        a, b = head_rows(rank, tp, num_heads, cols // num_heads)
        put(w, {"cols": [a, b]})
        bias = o.args[2] if len(o.args) > 2 else None
        o.args = (o.args[0], o.args[1])
        with new.graph.inserting_after(o):
            reduced = new.graph.call_function(torch.ops.msc.tp_all_reduce.default, (o, layer))
        o.replace_all_uses_with(reduced, delete_user_cb=lambda u: u is not reduced)
        added_nodes = [reduced]
        if bias is not None:
            with new.graph.inserting_after(reduced):
                added = new.graph.call_function(torch.ops.aten.add.Tensor, (reduced, bias))
            reduced.replace_all_uses_with(added, delete_user_cb=lambda u: u is not added)
            added_nodes.append(added)
        _stamp(added_nodes, o)
    _shard_vocabulary(new, tp, rank, put, param)
    new.graph.lint()
    new.recompile()
    return new, slices


def _stamp(nodes: list[fx.Node], like: fx.Node) -> None:
    if STAGE_KEY in node_meta(like):  # pipelined already: new nodes run in the stage of the node they serve
        for n in nodes:
            node_meta(n)[STAGE_KEY] = node_meta(like)[STAGE_KEY]


def _shard_vocabulary(gm: fx.GraphModule, tp: int, rank: int, put, param) -> None:
    """The embedding and the LM head split by vocabulary rows (when tp divides the vocabulary).

    Embedding: rank r holds rows [r·V/tp, (r+1)·V/tp); a token outside them looks up a clamped row and is
    zeroed; the all-reduce then gives every rank the full embedding. LM head: rank r computes the logits of
    its rows; an all-gather puts them side by side, so every rank has the full logits (and samples the same
    token). NOTE: a head followed by anything but the graph output (soft-capping, scaling) stays replicated."""
    g = gm.graph
    for emb in [n for n in g.nodes if n.op == "call_function" and n.target is torch.ops.aten.embedding.default]:
        w, ids = emb.args[0], emb.args[1]
        vocab = fetch_attr(gm, param(w)).shape[0]
        if vocab % tp:
            continue
        per = vocab // tp
        lo, hi = rank * per, (rank + 1) * per
        put(w.target, {"rows": [lo, hi]})
        with g.inserting_before(emb):
            local = g.call_function(torch.ops.aten.sub.Tensor, (ids, lo))
            outside = g.call_function(torch.ops.aten.logical_or.default, (
                g.call_function(torch.ops.aten.lt.Scalar, (ids, lo)), g.call_function(torch.ops.aten.ge.Scalar, (ids, hi))))
            clamped = g.call_function(torch.ops.aten.clamp.default, (local, 0, per - 1))
        emb.args = (w, clamped, *emb.args[2:])
        with g.inserting_before(emb):
            mask = g.call_function(torch.ops.aten.unsqueeze.default, (outside, -1))
        with g.inserting_after(emb):
            zeroed = g.call_function(torch.ops.aten.masked_fill.Scalar, (emb, mask, 0.0))
        with g.inserting_after(zeroed):
            reduced = g.call_function(torch.ops.msc.tp_all_reduce.default, (zeroed, -1))
        emb.replace_all_uses_with(reduced, delete_user_cb=lambda u: u is not zeroed)
        _stamp([local, outside, *outside.all_input_nodes, clamped, mask, zeroed, reduced], emb)
    out = next(n for n in g.nodes if n.op == "output")
    results = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    head = results[0]
    if not (isinstance(head, fx.Node) and head.op == "call_function" and head.target is LINEAR):
        return
    w = head.args[1]
    vocab = fetch_attr(gm, param(w)).shape[0]
    if vocab % tp:
        return
    per = vocab // tp
    put(w.target, {"rows": [rank * per, (rank + 1) * per]})
    if len(head.args) > 2 and head.args[2] is not None:
        put(param(head.args[2]), {"rows": [rank * per, (rank + 1) * per]})
    with g.inserting_after(head):
        gathered = g.call_function(torch.ops.msc.tp_all_gather.default, (head, -1, tp))
    head.replace_all_uses_with(gathered, delete_user_cb=lambda u: u is not gathered)
    _stamp([gathered], head)


def share_of(sl: dict, full_shape: list[int]) -> dict:
    """A slice of shard_attention ({"rows": [a, b]}, {"cols": [a, b]} or {"cat_rows": [[a, b], ...]}) as a
    take() of the whole tensor."""
    if "cat_rows" in sl:
        return take(full_shape, 0, sl["cat_rows"])
    if "rows" in sl:
        return take(full_shape, 0, [sl["rows"]])
    return take(full_shape, -1, [sl["cols"]])


def shared_shape(how: dict) -> list[int]:
    """The shape of the share a take() describes."""
    shape = list(how["of"])
    shape[how["dim"]] = sum(b - a for a, b in how["ranges"])
    return shape


def slice_tensor(t: torch.Tensor, sl: dict) -> torch.Tensor:
    """A parameter's share under one slice of shard_attention."""
    return take_share(t, share_of(sl, list(t.shape)))


def with_sliced_parameters(gm: fx.GraphModule, slices: dict[str, dict]) -> fx.GraphModule:
    """gm with each sliced parameter replaced by its share (the tensors are copied; others shared)."""
    attrs = {}
    for target in get_attr_targets(gm.graph):
        t = fetch_attr(gm, target)
        attrs[target] = slice_tensor(t, slices[target]) if target in slices else t
    return fx.GraphModule(attrs, gm.graph)


def _split_item(item, part: tuple[int, int], length: int, rank: int, tp: int) -> list:
    """Pieces of one stack item covering `part` = [start, stop) of its rows, rank's 1/tp of each."""
    key = item if isinstance(item, str) else item["key"]
    base = 0 if isinstance(item, str) or "rows" not in item else item["rows"][0]
    if not isinstance(item, str) and "cols" in item:
        raise MscError(f"tensor parallelism: expert tensor '{key}' is already a column slice")
    per = length // tp
    return [{"key": key, "rows": [base + part[0] + rank * per, base + part[0] + (rank + 1) * per]}]


def _split_stacked(gu: dict, dn: dict, layer: int, intermediate: int, rank: int, tp: int) -> tuple[dict, dict]:
    """Rank's share of experts built by stacking per-expert tensors: gate and up rows, down columns."""
    per = intermediate // tp
    groups = []
    for group in gu["stack"]:
        if len(group) == 2:  # gate and up, each [I, H]
            groups.append([p for item in group for p in _split_item(item, (0, intermediate), intermediate, rank, tp)])
        elif len(group) == 1:  # gate and up in one [2I, H]
            item = group[0]
            groups.append(_split_item(item, (0, intermediate), intermediate, rank, tp)
                          + _split_item(item, (intermediate, 2 * intermediate), intermediate, rank, tp))
        else:
            raise MscError(f"tensor parallelism: layer {layer}'s gate/up experts tensor is built from {len(group)} "
                           "pieces per expert; msc expects gate and up, or one fused gate_up")
    down_groups = []
    for group in dn["stack"]:
        if len(group) != 1 or (not isinstance(group[0], str) and set(group[0]) - {"key"}):
            raise MscError(f"tensor parallelism: layer {layer}'s down experts tensor is built from {group}; msc "
                           "expects one [H, I] tensor per expert")
        key = group[0] if isinstance(group[0], str) else group[0]["key"]
        down_groups.append([{"key": key, "cols": [rank * per, (rank + 1) * per]}])
    return {"stack": groups}, {"stack": down_groups}


def shard_experts(gm: fx.GraphModule, weights: dict[str, dict], base_shapes: dict[str, list[int]], tp: int, rank: int,
                  intermediate: int) -> tuple[fx.GraphModule, dict[str, dict], dict[str, list[int]]]:
    """Rank `rank`'s share of an expert node's program: the intermediate dimension of every expert split
    over tp ranks (gate and up rows, down columns), a msc::tp_all_reduce after each experts call (the
    partial sums add up inside the node, so the node still answers each replica once), the down bias on
    rank 0 only. Returns (program, weight sources, shapes of the sliced parameters)."""
    if intermediate % tp:
        raise MscError(f"plan.experts.tp = {tp} does not divide the experts' intermediate size {intermediate}")
    per = intermediate // tp
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    new = fx.GraphModule(gm, graph)
    sources: dict[str, dict] = {}
    for node in [n for n in new.graph.nodes if is_op(n, "experts")]:
        layer = node.args[5]
        layout = node.args[10] if len(node.args) > 10 else node.kwargs.get("layout", "")
        gate_up, down = node.args[3].target, node.args[4].target
        gu, dn = weights[gate_up], weights[down]
        shape_gu, shape_dn = base_shapes[gate_up], base_shapes[down]
        gub = node.args[7] if len(node.args) > 7 else None
        a, b = rank * per, (rank + 1) * per  # this rank's intermediate units
        interleaved = set(layout.split(",")) == {"gate_up_t", "down_t", "interleaved"}
        if gub is not None and not interleaved:
            raise MscError(f"tensor parallelism: layer {layer}'s experts have a gate/up bias in layout '{layout}'; msc "
                           "splits expert biases of GPT-OSS's interleaved layout only so far")
        if "stack" in gu and "stack" in dn and not layout:  # [E, 2I, H], [E, H, I] from per-expert tensors
            sources[gate_up], sources[down] = _split_stacked(gu, dn, layer, intermediate, rank, tp)
            sources[gate_up]["tp_take"] = take(shape_gu, 1, [[a, b], [intermediate + a, intermediate + b]])
            sources[down]["tp_take"] = take(shape_dn, 2, [[a, b]])
        elif "key" in gu and "key" in dn and not layout:
            # NOTE: fused [E, 2I, H] / [E, H, I] tensors (transformers' own layout, what a meta compile assumes):
            # gate rows [a, b) and up rows [I + a, I + b) of dimension 1, down columns [a, b)
            ranges = [[a, b], [intermediate + a, intermediate + b]]
            sources[gate_up] = {**gu, "dim1": ranges, "tp_take": take(shape_gu, 1, ranges)}
            sources[down] = {**dn, "cols": [a, b], "tp_take": take(shape_dn, 2, [[a, b]])}
        elif "key" in gu and "key" in dn and interleaved:
            # NOTE: [E, H, 2I] with gate and up interleaved on the last dimension (GPT-OSS): intermediate units
            # [a, b) are the columns [2a, 2b), and of the down tensor [E, I, H] the dim-1 indices [a, b)
            sources[gate_up] = {**gu, "cols": [2 * a, 2 * b], "tp_take": take(shape_gu, 2, [[2 * a, 2 * b]])}
            sources[down] = {**dn, "dim1": [a, b], "tp_take": take(shape_dn, 1, [[a, b]])}
            if gub is not None:
                sources[gub.target] = {**weights[gub.target], "cols": [2 * a, 2 * b],
                                       "tp_take": take(base_shapes[gub.target], 1, [[2 * a, 2 * b]])}
        else:
            raise MscError(f"tensor parallelism: layer {layer}'s experts are stored as {gu} with layout '{layout}'; msc "
                           "splits per-expert [I, H] tensors or GPT-OSS's interleaved [E, H, 2I] so far")
        if len(node.args) > 8 and node.args[8] is not None and rank != 0:
            args = list(node.args)
            bias, args[8] = args[8], None  # NOTE: the down bias is added once, by rank 0; the all-reduce sums it in
            node.args = tuple(args)
            if not bias.users:
                new.graph.erase_node(bias)
        with new.graph.inserting_after(node):
            reduced = new.graph.call_function(torch.ops.msc.tp_all_reduce.default, (node, layer))
        node.replace_all_uses_with(reduced, delete_user_cb=lambda u: u is not reduced)
        _stamp([reduced], node)
    new.graph.lint()
    new.recompile()
    return new, sources, {t: shared_shape(src["tp_take"]) for t, src in sources.items()}


def take(full_shape: list[int], dim: int, ranges: list[list[int]]) -> dict:
    """How a rank's share comes out of the whole tensor (random weights make the whole, then take this):
    the ranges of one dimension, concatenated."""
    return {"of": list(full_shape), "dim": dim, "ranges": [list(r) for r in ranges]}


def take_share(t: torch.Tensor, how: dict) -> torch.Tensor:
    d = how["dim"] % t.dim()
    return torch.cat([t.narrow(d, a, b - a) for a, b in how["ranges"]], dim=d).contiguous()


def tp_program_name(rank: int) -> str:
    return f"{ROLE_ATTENTION}.tp{rank}"


def model_heads(hf_config) -> tuple[int, int]:
    """(query heads, key/value heads) of a transformers config."""
    nh = getattr(hf_config, "num_attention_heads", None)
    if nh is None:
        raise MscError(f"tensor parallelism: the {hf_config.model_type} config names no num_attention_heads")
    return nh, getattr(hf_config, "num_key_value_heads", None) or nh


@register_pass
class ShardTensorParallel(Pass):
    """With plan.attention.tp > 1: the attention program becomes one program per tp rank ("attention.tp<r>"),
    each with its share of the heads (see the module docstring); with plan.experts.tp > 1 each expert node's
    program becomes one per tp rank ("expert.<j>.tp<r>", shard_experts). With both 1 it changes nothing."""

    name = "shard_tensor_parallel"

    def requires(self, gm, ctx):
        require_ran(gm, "lower_roles", self.name)

    def run(self, gm, ctx):
        tp = ctx.plan.attention.tp
        programs = graph_meta(gm)["programs"]
        from msc.passes.lower_roles import Program

        etp = ctx.plan.experts.tp
        if etp > 1:
            intermediate = ctx.moe["intermediate_size"]
            for name in sorted(n for n in programs if not n.startswith(ROLE_ATTENTION)):
                base = programs.pop(name)
                for r in range(etp):
                    prog, sources, sliced = shard_experts(base.gm, base.weights, base.shapes, etp, r, intermediate)
                    kept = set(get_attr_targets(prog.graph))
                    weights = {t: sources.get(t, w) for t, w in base.weights.items() if t in kept}
                    shapes = {t: sliced.get(t, sh) for t, sh in base.shapes.items() if t in kept}
                    if ctx.checkpoint is not None:
                        for t in sources:
                            if ctx.checkpoint.source_shape(sources[t]) != shapes[t]:
                                raise MscError(f"tensor parallelism: '{t}' from its slices is not of shape {shapes[t]}")
                    pname = f"{name}.tp{r}"
                    programs[pname] = Program(pname, prog, weights, shapes, {t: base.dtypes[t] for t in weights})
        if tp == 1:
            return PassResult(gm, {"attention_tp": 1, "experts_tp": etp})

        nh, nkv = model_heads(ctx.hf_config)
        base = programs.pop(ROLE_ATTENTION)
        for r in range(tp):
            prog, slices = shard_attention(base.gm, tp, r, nh, nkv)
            weights, shapes = {}, {}
            for target in get_attr_targets(prog.graph):
                src, shape = dict(base.weights[target]), list(base.shapes[target])
                sl = slices.get(target)
                if sl is not None:
                    if "key" not in src or "rows" in src or "cols" in src:
                        raise MscError(f"tensor parallelism: parameter '{target}' is built from {src}; msc slices only "
                                       "whole checkpoint tensors")
                    how = share_of(sl, shape)
                    if "cat_rows" in sl:
                        src = {"cat": [{"key": src["key"], "rows": rows} for rows in sl["cat_rows"]]}
                    else:
                        src.update(sl)
                    src["tp_take"], shape = how, shared_shape(how)
                    if ctx.checkpoint is not None and ctx.checkpoint.source_shape(src) != shape:
                        raise MscError(f"tensor parallelism: '{target}' from {src} is not of shape {shape}")
                weights[target], shapes[target] = src, shape
            programs[tp_program_name(r)] = Program(tp_program_name(r), prog, weights, shapes,
                                                   {t: base.dtypes[t] for t in weights})
        self._check_shapes(programs[tp_program_name(0)])
        return PassResult(gm, {"attention_tp": tp, "heads_per_rank": nh // tp, "kv_heads_per_rank": max(1, nkv // tp),
                               "experts_tp": etp})

    @staticmethod
    def _check_shapes(prog) -> None:
        """Run rank 0's program on meta tensors of its sliced shapes: a head count fixed in a view fails here."""
        import torch

        from msc.runtime import context

        attrs = {t: torch.empty(s, dtype=getattr(torch, prog.dtypes[t]), device="meta") for t, s in prog.shapes.items()}
        gm = fx.GraphModule(attrs, prog.gm.graph)

        class _Meta:
            def attention(self, q, k, v, layer, scaling, window, sinks=None):
                return q.new_empty(1, q.shape[2], q.shape[1], v.shape[3])

            def dispatch(self, hidden, idx, weights, layer, bounds):
                return torch.empty(1, dtype=torch.long, device="meta")

            def combine(self, ticket, hidden, layer):
                return torch.empty_like(hidden)

        ids = torch.zeros(1, 3, dtype=torch.long, device="meta")
        try:
            with context.use(_Meta()), torch.no_grad():
                gm(ids, ids)
        except Exception as e:  # noqa: BLE001 (the program does not fit its sliced weights)
            raise MscError(f"tensor parallelism: the attention program does not run on one rank's share of the heads "
                           f"({type(e).__name__}: {e}); a shape in the graph may name the head count") from None
