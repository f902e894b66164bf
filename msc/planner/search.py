"""Deployment-plan search (the reference's Algorithm 1, widened).

Search space (documented in docs/planner.md):
- attention tensor-parallel size tp_a and expert tensor-parallel size tp_e in {1, 2, 4, 8} (at most the GPUs
  per node of their pool);
- expert nodes n_e: every divisor of the expert count E (each node holds E / n_e experts; the paper's plans
  are n_e = E);
- attention replicas n_a: 1 up to what the pool's GPUs allow;
- micro-batches m: 1 to 8 (the paper stops at 4);
- for each, binary search of the largest micro-batch b_a (sequences per replica per micro-batch) whose decode
  step meets the time-per-output-token target, capped by memory: a replica holds its attention weights and
  the KV cache of its m·b_a sequences at the workload's full length, an expert node its experts.

`Planner.best_for` searches one configuration; `Planner.search` runs the same checks and the same binary
search for all configurations at once, the step evaluated over numpy arrays of them (msc.planner.perf holds
elementwise): every configuration tries the same batches as under best_for and gets the same plan, bit for
bit, in a few dozen array evaluations instead of tens of thousands of scalar ones.

The global batch is B = b_a · m · n_a sequences; a decode step emits one token for each, so throughput is
B / T_step. Plans are ranked by tokens/s per GPU (or per dollar: `objective="cost"`).

The colocated baseline serves the same model on instances of g GPUs of the attention pool's type (attention
tensor-parallel, experts expert-parallel on the same GPUs, the two phases one after the other), with g the
best power of two that fits; each plan states its gain over it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from msc.errors import MscError
from msc.planner.cost import ModelCost
from msc.planner.perf import Efficiency, Profile, Side, StepTimes, colocated_step, disaggregated_step

TP_SIZES = (1, 2, 4, 8)
MAX_MICROBATCHES = 8
MAX_BATCH = 1 << 16


@dataclass(frozen=True)
class Pool:
    """GPUs of one type available to a side (or to both, when `shared`)."""

    gpu: object  # msc.planner.hardware.GPU
    count: int
    per_node: int = 8


@dataclass(frozen=True)
class Workload:
    input_len: int = 571
    output_len: int = 159
    tpot_s: float = 0.150

    @property
    def mean_context(self) -> float:
        """Average context length during decoding (prompt plus half the output)."""
        return self.input_len + self.output_len / 2

    @property
    def max_context(self) -> int:
        return self.input_len + self.output_len


@dataclass(frozen=True)
class Pinned:
    """Plan fields a spec fixes (None: searched). `batch` is the spec's plan.batch_size: sequences per replica
    (b_a * m)."""

    tp_a: int | None = None
    n_a: int | None = None
    tp_e: int | None = None
    n_e: int | None = None
    m: int | None = None
    batch: int | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.tp_a, self.n_a, self.tp_e, self.n_e, self.m, self.batch))

    @classmethod
    def of_spec(cls, plan) -> "Pinned":
        """The fields a spec's `plan:` sets."""
        return cls(plan.attention.tp, plan.attention.replicas, plan.experts.tp, plan.experts.nodes, plan.microbatches,
                   plan.batch_size)


@dataclass
class Plan:
    tp_a: int
    n_a: int
    tp_e: int
    n_e: int
    m: int
    b_a: int
    step_s: float
    t_a: float  # summed over layers, one micro-batch
    t_e: float
    t_c: float
    binding: str
    gpus: int
    cost_per_hour: float
    attention_mem_bytes: float
    expert_mem_bytes: float
    gain: float | None = None  # throughput per GPU (or per cost) over the colocated baseline

    @property
    def batch(self) -> int:
        return self.b_a * self.m * self.n_a

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_s

    @property
    def per_gpu(self) -> float:
        return self.tokens_per_s / self.gpus

    @property
    def per_dollar_hour(self) -> float:
        return self.tokens_per_s / self.cost_per_hour

    def key(self) -> tuple:
        return (self.tp_a, self.n_a, self.tp_e, self.n_e, self.m, self.b_a)

    @property
    def tc_over_tf(self) -> float:
        """T_c / T_f: a micro-batch's communication time over its slower side's compute time. The ping-pong
        pipeline hides communication only when it is below 1 (the reference's condition T_c < T_f)."""
        tf = max(self.t_a, self.t_e)
        return self.t_c / tf if tf > 0 else math.inf

    def describe(self) -> str:
        return f"{self.n_a}×att(tp{self.tp_a}) + {self.n_e}×exp(tp{self.tp_e}), m={self.m}"


@dataclass
class Colocated:
    gpus_per_instance: int
    batch: int
    step_s: float
    cost_per_hour: float

    @property
    def per_gpu(self) -> float:
        return self.batch / self.step_s / self.gpus_per_instance

    @property
    def per_dollar_hour(self) -> float:
        return self.batch / self.step_s / self.cost_per_hour


@dataclass
class SearchResult:
    plans: list[Plan]  # feasible, best first
    colocated: Colocated | None
    evaluated: int
    rejected: dict[str, int] = field(default_factory=dict)


_SIDES: dict[tuple, Side] = {}


def side_of(gpu, tp: int) -> Side:
    key = (gpu.name, gpu.flops, gpu.mem_bw, gpu.nic_bw, gpu.nvlink_bw, tp)
    side = _SIDES.get(key)
    if side is None:
        side = _SIDES[key] = _side_of(gpu, tp)
    return side


def _side_of(gpu, tp: int) -> Side:
    return Side(flops=gpu.flops, mem_bw=gpu.mem_bw, nic_bw=gpu.nic_bw, nvlink_bw=gpu.nvlink_bw, tp=tp)


def over_nvlink(side: Side, where=True) -> Side:
    """The side with its exchange bandwidth NVLink's instead of the NIC's (`where`: elementwise mask)."""
    bw = np.where(where, side.nvlink_bw, side.nic_bw) if isinstance(where, np.ndarray) else side.nvlink_bw
    return Side(side.flops, side.mem_bw, bw, side.nvlink_bw, side.tp)


def attention_memory(model: ModelCost, b_a: int, m: int, tp_a: int, wl: Workload) -> float:
    """Bytes per attention GPU: its share of the attention weights and of the KV cache of m·b_a sequences."""
    kv = m * b_a * wl.max_context * model.kv_bytes_tp(tp_a)  # replicated heads when tp exceeds them
    state = m * b_a * model.state_bytes_per_seq() * tp_a  # state layers: every rank keeps each sequence's state
    act = m * b_a * model.hidden_size * model.dtype_bytes * 16  # activations in flight (generous)
    return (model.attention_weight_bytes() + kv + state + act) / tp_a


def expert_memory(model: ModelCost, n_e: int, tp_e: int, extra_slots: int = 0) -> float:
    """Bytes per expert GPU: its share of the experts, plus `extra_slots` more experts (replicas)."""
    per_expert = model.expert_weight_bytes() / max(model.num_experts, 1)
    return (model.expert_weight_bytes() / n_e + extra_slots * per_expert) / tp_e


def _max_b_by_memory(model: ModelCost, m: int, tp_a: int, wl: Workload, usable: float) -> int:
    per_seq = ((m * wl.max_context * model.kv_bytes_tp(tp_a) + m * model.hidden_size * model.dtype_bytes * 16) / tp_a
               + m * model.state_bytes_per_seq())
    room = usable - model.attention_weight_bytes() / tp_a
    return int(min(MAX_BATCH, room // per_seq)) if room > 0 else 0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Planner:
    def __init__(self, model: ModelCost, attention: Pool, expert: Pool | None, workload: Workload,
                 eff: Efficiency | None = None, profile: Profile | None = None,
                 objective: Literal["gpu", "cost"] = "gpu", max_microbatches: int = MAX_MICROBATCHES,
                 tp_sizes: tuple[int, ...] = TP_SIZES, pinned: Pinned | None = None, routing=None):
        self.model, self.att_pool, self.exp_pool = model, attention, expert
        self.routing = routing  # msc.planner.routing.RoutingProfile: skewed expert loads (None: uniform)
        self.extra_slots = routing.extra_slots if routing is not None else 0  # replicas' memory per expert node
        if routing is not None:
            routing.check_model(model.num_experts, len(model.layers))
        self.pinned = pinned or Pinned()
        self.colocated_reason: str | None = None  # set by colocated() when there is no instance
        self.shared = expert is None  # homogeneous: one pool for both sides
        self.wl, self.eff, self.profile = workload, eff or Efficiency(), profile
        self.objective = objective
        self.max_m = max_microbatches
        # NOTE: a measured profile holds for the tensor-parallel size it was measured at (its fits include
        # no all-reduce), so a search with one keeps to that size, colocated instances included.
        self.tp_sizes = (profile.tp,) if profile is not None else tp_sizes
        self.evaluated = 0
        for pool in filter(None, (attention, expert)):
            if pool.count < 1:
                raise MscError(f"pool of {pool.gpu.name} has {pool.count} GPUs: expected at least 1")
        self._check_pinned()

    def _check_pinned(self) -> None:
        """Pinned fields the search could never honour are errors, each naming the field."""
        pin, exp_pool = self.pinned, self.att_pool if self.shared else self.exp_pool
        if pin.m is not None and not 1 <= pin.m <= self.max_m:
            raise MscError(f"plan.microbatches is {pin.m}; the planner searches 1 to {self.max_m} (planner.max_microbatches)")
        if pin.n_e is not None and self.model.num_experts % pin.n_e:
            raise MscError(f"plan.experts.nodes is {pin.n_e}, which does not divide the model's {self.model.num_experts} "
                           f"experts; pick one of {_divisors(self.model.num_experts)}")
        for name, tp, pool in (("plan.attention.tp", pin.tp_a, self.att_pool), ("plan.experts.tp", pin.tp_e, exp_pool)):
            if tp is not None and tp not in self.tp_sizes:
                raise MscError(f"{name} is {tp}; the planner models tp in {list(self.tp_sizes)}"
                               + (" (planner.profile was measured at that size)" if self.profile is not None else ""))
            if tp is not None and tp > pool.per_node:
                raise MscError(f"{name} is {tp}, more GPUs than a node of {pool.gpu.name} has ({pool.per_node})")
        if pin.batch is not None and pin.m is not None and pin.batch % pin.m:
            raise MscError(f"plan.batch_size {pin.batch} is not a multiple of plan.microbatches {pin.m} (each "
                           "micro-batch holds batch_size / m sequences)")

    # ------------------------------------------------------------------ one configuration
    def step(self, tp_a: int, n_a: int, tp_e: int, n_e: int, m: int, b_a: int):
        self.evaluated += 1
        att, exp = self.sides(tp_a, tp_e, tp_a * n_a + tp_e * n_e)
        return disaggregated_step(self.model, b_a, m, n_a, n_e, self.wl.mean_context, att, exp, self.eff, self.profile,
                                  self.routing)

    def sides(self, tp_a, tp_e, gpus) -> tuple[Side, Side]:
        """The attention and expert sides of plans with these tp sizes and GPU counts (ints, or int arrays),
        their exchange over NVLink where a plan sits in one node: one pool (one GPU type) whose nodes hold it
        whole.

        NOTE: a plan larger than a node is costed over the NIC throughout, although some of its pairs may
        share a node: placement inside the cluster is not modelled."""
        exp_gpu = (self.att_pool if self.shared else self.exp_pool).gpu
        make = _side_of if isinstance(tp_a, np.ndarray) else side_of  # side_of caches the scalar sides
        att, exp = make(self.att_pool.gpu, tp_a), make(exp_gpu, tp_e)
        in_node = self.shared & (np.asarray(gpus) <= self.att_pool.per_node)
        if in_node.any():
            where = in_node if in_node.ndim else True
            att, exp = over_nvlink(att, where), over_nvlink(exp, where)
        return att, exp

    def _fits_gpus(self, tp_a: int, n_a: int, tp_e: int, n_e: int) -> bool:
        if self.shared:
            return tp_a * n_a + tp_e * n_e <= self.att_pool.count
        return tp_a * n_a <= self.att_pool.count and tp_e * n_e <= self.exp_pool.count

    def configurations(self):
        """Every (tp_a, n_a, tp_e, n_e, m) of the search space that fits the pools' GPU counts."""
        exp_pool = self.att_pool if self.shared else self.exp_pool
        experts = self.model.num_experts
        pin = self.pinned

        def only(value, choices):
            return [value] if value is not None else list(choices)

        for tp_e in only(pin.tp_e, (t for t in self.tp_sizes if t <= exp_pool.per_node)):
            for n_e in only(pin.n_e, _divisors(experts)):
                for tp_a in only(pin.tp_a, (t for t in self.tp_sizes if t <= self.att_pool.per_node)):
                    for n_a in only(pin.n_a, range(1, self.att_pool.count // tp_a + 1)):
                        if not self._fits_gpus(tp_a, n_a, tp_e, n_e):
                            break
                        for m in only(pin.m, range(1, self.max_m + 1)):
                            if pin.batch is None or pin.batch % m == 0:
                                yield tp_a, n_a, tp_e, n_e, m

    def best_for(self, tp_a: int, n_a: int, tp_e: int, n_e: int, m: int, rejected: dict | None = None) -> Plan | None:
        """The plan with the largest b_a meeting the latency and memory limits (binary search)."""
        rejected = rejected if rejected is not None else {}
        exp_gpu = (self.att_pool if self.shared else self.exp_pool).gpu
        usable_e = exp_gpu.mem_bytes * self.eff.memory_fraction
        if expert_memory(self.model, n_e, tp_e, self.extra_slots) > usable_e:
            rejected["expert memory"] = rejected.get("expert memory", 0) + 1
            return None
        b_mem = _max_b_by_memory(self.model, m, tp_a, self.wl, self.att_pool.gpu.mem_bytes * self.eff.memory_fraction)
        if b_mem < 1:
            rejected["attention memory"] = rejected.get("attention memory", 0) + 1
            return None
        if self.pinned.batch is not None:
            plans = self._pinned_batch(np.array([[tp_a, n_a, tp_e, n_e, m]], dtype=np.int64),
                                       np.array([b_mem], dtype=np.int64), rejected)
            return plans[0] if plans else None
        lo, hi = 0, b_mem  # invariant: b = lo meets the target (0: trivially), hi + 1 is beyond memory
        if self.step(tp_a, n_a, tp_e, n_e, m, 1).total > self.wl.tpot_s:
            rejected["latency"] = rejected.get("latency", 0) + 1
            return None
        lo = 1
        if self.step(tp_a, n_a, tp_e, n_e, m, hi).total <= self.wl.tpot_s:
            lo = hi
        else:
            while hi - lo > 1:  # T_step grows with b_a: lo meets the target, hi does not
                mid = (lo + hi) // 2
                if self.step(tp_a, n_a, tp_e, n_e, m, mid).total <= self.wl.tpot_s:
                    lo = mid
                else:
                    hi = mid
        if lo < b_mem:
            binding = "latency (TPOT)"
        else:
            binding = "batch cap of the search" if b_mem == MAX_BATCH else "memory (KV cache)"
        return self.make_plan(tp_a, n_a, tp_e, n_e, m, lo, binding)

    def make_plan(self, tp_a: int, n_a: int, tp_e: int, n_e: int, m: int, b_a: int, binding: str, st=None) -> Plan:
        """The plan of one configuration at batch b_a; st: its step times when already evaluated."""
        st = st if st is not None else self.step(tp_a, n_a, tp_e, n_e, m, b_a)
        exp_pool = self.att_pool if self.shared else self.exp_pool
        return Plan(
            tp_a=tp_a, n_a=n_a, tp_e=tp_e, n_e=n_e, m=m, b_a=b_a, step_s=st.total,
            t_a=st.t_a, t_e=st.t_e, t_c=st.t_c, binding=binding,
            gpus=tp_a * n_a + tp_e * n_e,
            cost_per_hour=tp_a * n_a * self.att_pool.gpu.price_per_hour + tp_e * n_e * exp_pool.gpu.price_per_hour,
            attention_mem_bytes=attention_memory(self.model, b_a, m, tp_a, self.wl),
            expert_mem_bytes=expert_memory(self.model, n_e, tp_e, self.extra_slots),
        )

    def score(self, p: Plan | Colocated) -> float:
        return p.per_dollar_hour if self.objective == "cost" else p.per_gpu

    # ------------------------------------------------------------------ whole search
    def steps(self, cfgs: np.ndarray, b_a: np.ndarray) -> StepTimes:
        """step() of many configurations at once: cfgs [N, 5] rows (tp_a, n_a, tp_e, n_e, m), b_a [N]."""
        self.evaluated += len(b_a)
        tp_a, n_a, tp_e, n_e, m = cfgs.T
        att, exp = self.sides(tp_a, tp_e, tp_a * n_a + tp_e * n_e)
        return disaggregated_step(self.model, b_a, m, n_a, n_e, self.wl.mean_context, att, exp, self.eff, self.profile,
                                  self.routing)

    def best_for_all(self, configs: list[tuple], rejected: dict | None = None, progress=None) -> list[Plan]:
        """best_for of every configuration, evaluated together: the same memory and latency checks, and the same
        binary search per configuration (lockstep: each round halves the interval of every open one)."""
        rejected = rejected if rejected is not None else {}
        exp_gpu = (self.att_pool if self.shared else self.exp_pool).gpu
        usable_e = exp_gpu.mem_bytes * self.eff.memory_fraction
        usable_a = self.att_pool.gpu.mem_bytes * self.eff.memory_fraction
        exp_fits: dict[tuple, bool] = {}
        b_mem_of: dict[tuple, int] = {}
        kept, b_mem = [], []
        for tp_a, n_a, tp_e, n_e, m in configs:
            if (n_e, tp_e) not in exp_fits:
                exp_fits[n_e, tp_e] = expert_memory(self.model, n_e, tp_e, self.extra_slots) <= usable_e
            if not exp_fits[n_e, tp_e]:
                rejected["expert memory"] = rejected.get("expert memory", 0) + 1
                continue
            if (m, tp_a) not in b_mem_of:
                b_mem_of[m, tp_a] = _max_b_by_memory(self.model, m, tp_a, self.wl, usable_a)
            if b_mem_of[m, tp_a] < 1:
                rejected["attention memory"] = rejected.get("attention memory", 0) + 1
                continue
            kept.append((tp_a, n_a, tp_e, n_e, m))
            b_mem.append(b_mem_of[m, tp_a])
        if not kept:
            return []
        cfgs, b_mem = np.array(kept, dtype=np.int64), np.array(b_mem, dtype=np.int64)
        if self.pinned.batch is not None:
            return self._pinned_batch(cfgs, b_mem, rejected)
        meets = self.steps(cfgs, np.ones(len(cfgs), dtype=np.int64)).total <= self.wl.tpot_s
        if not meets.all():
            rejected["latency"] = rejected.get("latency", 0) + int((~meets).sum())
            cfgs, b_mem = cfgs[meets], b_mem[meets]
        hi = b_mem.copy()  # invariant: b = lo meets the target, hi does not (or is the memory cap, which does)
        lo = np.where(self.steps(cfgs, hi).total <= self.wl.tpot_s, hi, 1)
        open_ = np.flatnonzero(hi - lo > 1)
        while len(open_):  # T_step grows with b_a
            if progress is not None:
                progress(len(cfgs) - len(open_), len(cfgs))
            mid = (lo[open_] + hi[open_]) // 2
            ok = self.steps(cfgs[open_], mid).total <= self.wl.tpot_s
            lo[open_[ok]] = mid[ok]
            hi[open_[~ok]] = mid[~ok]
            open_ = open_[hi[open_] - lo[open_] > 1]
        if progress is not None:
            progress(len(cfgs), len(cfgs))
        st = self.steps(cfgs, lo)
        cap = "batch cap of the search"
        plans = []
        for row, b, bm, t, ta, te, tc in zip(cfgs.tolist(), lo.tolist(), b_mem.tolist(), st.total.tolist(), st.t_a.tolist(),
                                             st.t_e.tolist(), st.t_c.tolist()):
            binding = "latency (TPOT)" if b < bm else cap if bm == MAX_BATCH else "memory (KV cache)"
            plans.append(self.make_plan(*row, b, binding, StepTimes(ta, te, tc, t)))
        return plans

    def _pinned_batch(self, cfgs: np.ndarray, b_mem: np.ndarray, rejected: dict) -> list[Plan]:
        """With plan.batch_size pinned, each configuration is evaluated at b_a = batch_size / m (kept even when it
        misses the TPOT target: the spec asked for that batch; its binding says so)."""
        b_a = self.pinned.batch // cfgs[:, 4]
        fits = b_a <= b_mem
        if not fits.all():
            rejected["attention memory"] = rejected.get("attention memory", 0) + int((~fits).sum())
            cfgs, b_a = cfgs[fits], b_a[fits]
        if not len(cfgs):
            return []
        st = self.steps(cfgs, b_a)
        plans = []
        for row, b, t, ta, te, tc in zip(cfgs.tolist(), b_a.tolist(), st.total.tolist(), st.t_a.tolist(),
                                         st.t_e.tolist(), st.t_c.tolist()):
            binding = "pinned batch" if t <= self.wl.tpot_s else "pinned batch, over the TPOT target"
            plans.append(self.make_plan(*row, b, binding, StepTimes(ta, te, tc, t)))
        return plans

    def search(self, top: int = 10, progress=None) -> SearchResult:
        rejected: dict[str, int] = {}
        plans = self.best_for_all(list(self.configurations()), rejected, progress)
        plans.sort(key=lambda p: (-self.score(p), p.gpus, p.key()))
        colo = self.colocated()
        if colo is not None:
            for p in plans:
                p.gain = self.score(p) / self.score(colo)
        return SearchResult(plans[:top] if top else plans, colo, self.evaluated, rejected)

    def colocated_side(self, g: int) -> Side:
        """A colocated instance of g GPUs of the attention pool: its all-reduces over NVLink inside a node, over
        each GPU's NIC for an instance larger than one (`per_node`)."""
        side = side_of(self.att_pool.gpu, g)
        return side if g <= self.att_pool.per_node else Side(side.flops, side.mem_bw, side.nic_bw, side.nic_bw, g)

    def fastest(self) -> tuple[float, tuple]:
        """The shortest step of any configuration that fits in memory, at one sequence per micro-batch, and
        that configuration (inf and () when none fits)."""
        exp_gpu = (self.att_pool if self.shared else self.exp_pool).gpu
        usable_e = exp_gpu.mem_bytes * self.eff.memory_fraction
        usable_a = self.att_pool.gpu.mem_bytes * self.eff.memory_fraction
        fits = [c for c in self.configurations() if expert_memory(self.model, c[3], c[2], self.extra_slots) <= usable_e
                and _max_b_by_memory(self.model, c[4], c[0], self.wl, usable_a) >= 1]
        if not fits:
            return math.inf, ()
        total = self.steps(np.array(fits, dtype=np.int64), np.ones(len(fits), dtype=np.int64)).total
        i = int(np.argmin(total))
        return float(total[i]), tuple(fits[i])

    def colocated(self, batch: int | None = None) -> Colocated | None:
        """Best colocated instance on the attention pool's GPU type (sizes 1, 2, 4, ... up to the pool), each at
        the largest batch that meets the TPOT target and memory (`batch`: at that batch instead, where it fits
        memory, whatever its TPOT). When there is none, `colocated_reason` says why: "memory" (no size holds
        the weights and one sequence's KV cache) or "latency" (those that do miss the TPOT target at batch 1).

        NOTE: an instance larger than a node (`per_node`) runs its all-reduces over the NIC, not NVLink. Memory
        is the busiest GPU's: its share of the attention weights and KV cache, and ceil(E / g) whole experts."""
        pool, gpu = self.att_pool, self.att_pool.gpu
        best = None
        self.colocated_reason = "memory"
        g = 1 if self.profile is None else self.profile.tp
        prof = self.profile
        experts = max(self.model.num_experts, 1)
        while g <= max(pool.count, 1):
            side = self.colocated_side(g)
            usable = gpu.mem_bytes * self.eff.memory_fraction
            room = (usable - self.model.attention_weight_bytes() / g
                    - self.model.expert_weight_bytes() * math.ceil(experts / g) / experts)
            per_seq = self.wl.max_context * self.model.kv_bytes_tp(g) / g + self.model.state_bytes_per_seq()
            b_mem = int(min(MAX_BATCH, room // per_seq)) if room > 0 else 0
            step = (lambda b: colocated_step(self.model, b, self.wl.mean_context, side, self.eff, prof,  # noqa: E731
                                             self.routing))
            c = None
            if batch is not None:
                if batch <= b_mem:
                    c = Colocated(g, batch, step(batch), g * gpu.price_per_hour)
            elif b_mem >= 1:
                self.colocated_reason = "latency"
                if step(1) <= self.wl.tpot_s:
                    lo, hi = 1, b_mem
                    if step(hi) <= self.wl.tpot_s:
                        lo = hi
                    while hi - lo > 1:
                        mid = (lo + hi) // 2
                        if step(mid) <= self.wl.tpot_s:
                            lo = mid
                        else:
                            hi = mid
                    c = Colocated(g, lo, step(lo), g * gpu.price_per_hour)
            if c is not None and (best is None or self.score(c) > self.score(best)):
                best = c
            if prof is not None:
                break  # the profile's fits hold for instances of profile.tp GPUs only
            g *= 2
        return best


def explain_infeasible(result: SearchResult, planner: Planner) -> str:
    """One message naming the binding constraint, with the true best figure: latency when some configuration
    fits in memory (then memory is not what stops it), else memory, else the pool's size."""
    m = planner.model
    r = result.rejected
    parts = []
    if r.get("latency"):
        fastest, cfg = planner.fastest()
        tp_a, n_a, tp_e, n_e, mb = cfg
        parts.append(f"the TPOT target is {planner.wl.tpot_s * 1e3:g} ms, but the fastest configuration "
                     f"({n_a}×att(tp{tp_a}) + {n_e}×exp(tp{tp_e}), m={mb}) takes {fastest * 1e3:.1f} ms a token even "
                     "with one sequence per micro-batch")
    elif r.get("attention memory") or r.get("expert memory"):
        att = planner.att_pool.gpu
        usable = att.mem_bytes * planner.eff.memory_fraction
        if r.get("attention memory"):
            need = m.attention_weight_bytes() / max(t for t in planner.tp_sizes if t <= planner.att_pool.per_node)
            parts.append(f"attention weights need {need / 2**30:.1f} GiB per GPU even at the largest tp (plus the KV "
                         f"cache of one sequence), {att.name} offers {usable / 2**30:.1f} GiB usable")
        if r.get("expert memory"):
            exp_pool = planner.att_pool if planner.shared else planner.exp_pool
            most = exp_pool.count
            parts.append(f"the experts need {m.expert_weight_bytes() / 2**30:.1f} GiB; {exp_pool.gpu.name} × {most} "
                         f"offer {exp_pool.gpu.mem_bytes * planner.eff.memory_fraction * most / 2**30:.1f} GiB usable")
    elif planner.pinned.any:
        parts.append("no configuration keeps the pinned plan fields (within the pools' GPU counts, with "
                     "plan.batch_size a multiple of the micro-batch count)")
    else:
        gpus = planner.att_pool.count + (0 if planner.shared else planner.exp_pool.count)
        parts.append(f"disaggregation needs at least one attention and one expert GPU; the pools have {gpus}")
    return "no plan meets the constraints: " + "; ".join(parts)
