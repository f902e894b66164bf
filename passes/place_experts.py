"""place_experts: assign each MoE layer's experts to the expert nodes of the plan.

Before:  expert program, experts(hidden_l, index_l, weights_l, Wgu_l, Wd_l, l, 0) per layer
After:   gm.meta["msc"]["placement"] = {"num_nodes": N, "bounds": {l: [b0, ..., bN]}, "slots": {l: [...]},
         "shares": {l: [...]}, "strategy": ...}: per layer, a list of *slots* (slot s holds expert slots[s]; a
         replicated expert has several) and node j holds slots b_j..b_{j+1}-1. `shares[s]` is the fraction of
         its expert's (token, expert) pairs slot s takes. The attention side maps each pair's expert id to a
         slot before the dispatch (msc::expert_slots, inserted by insert_dispatch_combine), so the exchange
         and the expert nodes see contiguous slot ranges whatever the placement.

Strategies (the spec's `passes: [{name: place_experts, config: {strategy: ..., routing: FILE}}]`):
- `contiguous` (default): expert e in slot e, contiguous blocks of equal size (±1);
- `balanced`: the same number of experts per node as contiguous (so the same memory), experts assigned
  largest expected load first to the least-loaded node with room (LPT), from a routing profile
  (msc.planner.routing's format: pairs per expert per layer, recorded by `msc run --colocated
  --record-routing`);
- `replicated`: `replicas_per_node` extra slots on every node (memory for that many more experts) hold
  copies of the hottest experts (one more copy each time for the expert with the largest load per copy),
  copies spread over distinct nodes, and the pairs of a replicated expert split between its copies so as
  to minimise the busiest node's load: a parametric maximum flow (networkx) from the experts through the
  nodes holding their copies to a sink whose edges carry at most the load bound being tested.

NOTE: expected loads come from the profile's counts; a layer the profile does not cover is placed
contiguously. Without a profile `balanced` and `replicated` are refused (nothing to balance).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from msc.errors import MscError
from msc.ir import ROLE_EXPERT, fetch_attr, graph_meta, node_meta
from msc.ops import is_op
from msc.pass_manager import Pass, PassConfig, PassResult, register_pass, require_ran


class PlaceExpertsConfig(PassConfig):
    strategy: Literal["contiguous", "balanced", "replicated"] = "contiguous"
    routing: Optional[str] = None  # a routing profile JSON (msc.planner.routing)
    replicas_per_node: int = 1  # replicated: extra expert slots per node (memory for that many more experts)


def contiguous_bounds(num_experts: int, num_nodes: int) -> list[int]:
    """Split experts 0..E-1 into N contiguous blocks whose sizes differ by at most one."""
    return [(j * num_experts) // num_nodes for j in range(num_nodes + 1)]


@dataclass
class LayerPlacement:
    """Slots of one layer: slot s holds expert slots[s] and takes shares[s] of its pairs; node j holds slots
    bounds[j]..bounds[j+1]-1."""

    slots: list[int]
    bounds: list[int]
    shares: list[float]

    def node_slots(self, j: int) -> range:
        return range(self.bounds[j], self.bounds[j + 1])

    def node_experts(self, j: int) -> list[int]:
        return [self.slots[s] for s in self.node_slots(j)]

    def node_loads(self, counts: list[float]) -> list[float]:
        """Expected pairs per node for expert pair counts `counts`."""
        return [sum(counts[self.slots[s]] * self.shares[s] for s in self.node_slots(j))
                for j in range(len(self.bounds) - 1)]

    def imbalance(self, counts: list[float]) -> float:
        """Busiest node's expected load over the mean (1.0: perfectly even)."""
        loads = self.node_loads(counts)
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0

    @property
    def identity(self) -> bool:
        return self.slots == list(range(len(self.slots)))

    def copies(self) -> dict[int, list[int]]:
        """expert -> its slots."""
        out: dict[int, list[int]] = {}
        for s, e in enumerate(self.slots):
            out.setdefault(e, []).append(s)
        return out


def place_contiguous(num_experts: int, nodes: int) -> LayerPlacement:
    return LayerPlacement(list(range(num_experts)), contiguous_bounds(num_experts, nodes), [1.0] * num_experts)


def _from_nodes(per_node: list[list[int]], shares: dict[tuple[int, int], float] | None = None) -> LayerPlacement:
    """A placement from each node's experts (in order); shares[(expert, node)] where replicated (else 1)."""
    slots, bounds, sh = [], [0], []
    for j, experts in enumerate(per_node):
        for e in experts:
            slots.append(e)
            sh.append(1.0 if shares is None else shares.get((e, j), 1.0))
        bounds.append(len(slots))
    return LayerPlacement(slots, bounds, sh)


def place_balanced(counts: list[float], nodes: int) -> LayerPlacement:
    """Experts to nodes, each node as many as contiguous gives it, the largest expected load first onto the
    least-loaded node with room (LPT; ties to the lower node, so the result is deterministic)."""
    e = len(counts)
    caps = [b - a for a, b in zip(contiguous_bounds(e, nodes), contiguous_bounds(e, nodes)[1:])]
    per_node: list[list[int]] = [[] for _ in range(nodes)]
    load = [0.0] * nodes
    for x in sorted(range(e), key=lambda i: (-counts[i], i)):
        j = min((j for j in range(nodes) if len(per_node[j]) < caps[j]), key=lambda j: (load[j], j))
        per_node[j].append(x)
        load[j] += counts[x]
    return _from_nodes([sorted(p) for p in per_node])


def place_replicated(counts: list[float], nodes: int, extra_per_node: int) -> LayerPlacement:
    """`extra_per_node` more slots per node for copies of the hottest experts, pairs split by a flow; see the
    module docstring."""
    e = len(counts)
    if extra_per_node < 0:
        raise MscError(f"place_experts: replicas_per_node = {extra_per_node}; expected >= 0")
    caps = [b - a + extra_per_node for a, b in zip(contiguous_bounds(e, nodes), contiguous_bounds(e, nodes)[1:])]
    copies = [1] * e
    for _ in range(nodes * extra_per_node):  # one more copy for the largest load per copy (at most one per node)
        cand = [x for x in range(e) if copies[x] < nodes]
        if not cand:
            break
        x = max(cand, key=lambda i: (counts[i] / copies[i], -i))
        copies[x] += 1
    # copies onto nodes: heaviest load per copy first, to the least-loaded node with room not holding it yet
    per_node: list[list[int]] = [[] for _ in range(nodes)]
    load = [0.0] * nodes
    items = sorted(((counts[x] / copies[x], x) for x in range(e) for _ in range(copies[x])), key=lambda t: (-t[0], t[1]))
    for w, x in items:
        room = [j for j in range(nodes) if len(per_node[j]) < caps[j] and x not in per_node[j]]
        if not room:
            raise MscError(f"place_experts: no room for a copy of expert {x} (replicas_per_node {extra_per_node})")
        j = min(room, key=lambda j: (load[j], j))
        per_node[j].append(x)
        load[j] += w
    per_node = [sorted(p) for p in per_node]
    return _from_nodes(per_node, _split_by_flow(counts, per_node))


def _split_by_flow(counts: list[float], per_node: list[list[int]]) -> dict[tuple[int, int], float]:
    """Each replicated expert's share on each node holding it, minimising the busiest node's load: the
    smallest bound L for which a maximum flow source -> expert (its pairs) -> nodes holding it -> sink (at
    most L each) carries every pair, by bisection; the shares are that flow's."""
    import networkx as nx

    holders: dict[int, list[int]] = {}
    for j, experts in enumerate(per_node):
        for x in experts:
            holders.setdefault(x, []).append(j)
    total = sum(counts)
    if total <= 0:
        return {(x, j): 1.0 / len(js) for x, js in holders.items() for j in js}

    def flow(bound: float):
        g = nx.DiGraph()
        for x, js in holders.items():
            g.add_edge("s", ("e", x), capacity=float(counts[x]))
            for j in js:
                g.add_edge(("e", x), ("n", j))  # no capacity: unbounded
        for j in range(len(per_node)):
            g.add_edge(("n", j), "t", capacity=bound)
        value, f = nx.maximum_flow(g, "s", "t")
        return value, f

    lo, hi = total / len(per_node), total  # the mean load is a lower bound, everything on one node an upper one
    for _ in range(40):
        mid = (lo + hi) / 2
        if flow(mid)[0] >= total * (1 - 1e-9):
            hi = mid
        else:
            lo = mid
    _, f = flow(hi)
    shares = {}
    for x, js in holders.items():
        for j in js:
            shares[(x, j)] = f[("e", x)][("n", j)] / counts[x] if counts[x] > 0 else 1.0 / len(js)
    return shares


def place_layer(strategy: str, counts: list[float] | None, num_experts: int, nodes: int,
                replicas_per_node: int) -> LayerPlacement:
    if strategy == "contiguous" or counts is None:
        return place_contiguous(num_experts, nodes)
    if len(counts) != num_experts:
        raise MscError(f"place_experts: the routing profile counts {len(counts)} experts, the layer has {num_experts}")
    if strategy == "balanced":
        return place_balanced(counts, nodes)
    return place_replicated(counts, nodes, replicas_per_node)


@register_pass
class PlaceExperts(Pass):
    name = "place_experts"
    Config = PlaceExpertsConfig

    def requires(self, gm, ctx):
        require_ran(gm, "split_roles", self.name)

    def run(self, gm, ctx):
        cfg = self.config
        profile = None
        if cfg.strategy != "contiguous":
            if cfg.routing is None:
                raise MscError(f"place_experts: strategy '{cfg.strategy}' balances expected loads and needs a routing "
                               "profile: config.routing = FILE (record one with msc run --colocated --record-routing FILE)")
            from msc.planner.routing import load_routing

            profile = load_routing(cfg.routing)
        nodes = ctx.plan.experts.nodes
        if cfg.strategy != "contiguous" and ctx.plan.experts.tp > 1:
            raise MscError(f"place_experts: strategy '{cfg.strategy}' with plan.experts.tp = {ctx.plan.experts.tp} is not "
                           "supported yet (tensor-parallel expert nodes split contiguous expert rows only)")
        table: dict[int, LayerPlacement] = {}
        expert_gm = graph_meta(gm)["roles"][ROLE_EXPERT]
        for n in expert_gm.graph.nodes:
            if not is_op(n, "experts"):
                continue
            layer = n.args[5]
            num_experts = fetch_attr(expert_gm, n.args[3].target).shape[0]
            if nodes > num_experts:
                raise MscError(
                    f"plan.experts.nodes = {nodes} is more than the {num_experts} experts of layer {layer}: "
                    f"use at most {num_experts} expert nodes"
                )
            counts = profile.counts(layer) if profile is not None else None
            p = place_layer(cfg.strategy, counts, num_experts, nodes, cfg.replicas_per_node)
            node_meta(n)["placement"] = p.bounds
            table[layer] = p
        graph_meta(gm)["placement"] = {
            "num_nodes": nodes, "strategy": cfg.strategy,
            "bounds": {k: p.bounds for k, p in table.items()},
            "slots": {k: p.slots for k, p in table.items()},
            "shares": {k: p.shares for k, p in table.items()},
        }
        imbalance = {}
        if profile is not None:
            for k, p in table.items():
                c = profile.counts(k)
                if c is not None:
                    imbalance[k] = round(p.imbalance(c), 4)
        some = next(iter(table.values()))
        return PassResult(gm, {"nodes": nodes, "strategy": cfg.strategy,
                               "slots_per_node": [b1 - b0 for b0, b1 in zip(some.bounds, some.bounds[1:])],
                               **({"imbalance": imbalance} if imbalance else {})})
