"""Checkpoint keys → graph parameters, through transformers' own checkpoint conversion mapping.

transformers 5 renames and fuses some tensors when it loads a checkpoint (per-expert `experts.E.gate_proj`
/ `up_proj` become one stacked `experts.gate_up_proj`; Ernie's `mlp.moe_statics.*` moves under the gate;
Mixtral's `block_sparse_moe` becomes `mlp`), and writes the original layout back when it saves. A role
of a compiled bundle reads the checkpoint itself, so it must know which on-disk tensors make each
parameter of the captured graph.

NOTE: rather than restating each family's renames, msc runs every checkpoint key forward through the
family's mapping as transformers' loader does (`rename_source_key`) and records which keys land on each
parameter. A fusing converter is accepted when its operations are the ones msc's checkpoint reader can
reproduce lazily, row block by row block: `MergeModulelist(dim=0)` (stack the experts) optionally followed by
`Concatenate(dim=1)` (gate then up in one [2I, H] block), `Concatenate(dim=0)` of whole tensors (read one
after the other) and `Split(dim=0)` of one tensor into parameters (each reads its row block, sized like the
model's parameter). Anything else is refused by name.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from msc.errors import MscError


@dataclass
class _Fused:
    patterns: list[str]  # the converter's source patterns, in concatenation order
    ops: list[str]
    experts: dict[int, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))  # e -> pattern -> key


@dataclass
class KeyIndex:
    """For each graph parameter that is not stored under its own name: where it comes from."""

    renamed: dict[str, str]  # param -> checkpoint key
    fused: dict[str, _Fused]  # param -> per-expert sources
    # param -> (source patterns, pattern -> key): tensors concatenated along dim 0 (Kimi-Linear's one depthwise
    # convolution from its q, k and v convolutions)
    concat: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    # param -> (checkpoint key, every target param in order, this param's position): one tensor split along dim 0
    # into parameters sized like the model's (Param2MoE's fused query_key_value, Lara-mini's in_proj)
    split: dict[str, tuple[str, list[str], int]] = field(default_factory=dict)
    rows_of: object = None  # param -> its size along dim 0 (set by the adapter; needed for `split`)

    def source(self, param: str, expert_rows: tuple[int, int] | None, num_experts: int | None = None) -> dict | None:
        """The weight source of `param` (None: not a renamed or fused parameter). num_experts: how many experts
        a fused parameter has (so a missing last expert is noticed); default: the largest expert number seen."""
        if param in self.renamed:
            src = {"key": self.renamed[param]}
            if expert_rows is not None:
                src["rows"] = list(expert_rows)
            return src
        if param in self.split:
            key, targets, pos = self.split[param]
            if self.rows_of is None or expert_rows is not None:
                raise MscError(f"'{param}' is split from checkpoint tensor '{key}', which needs the model's parameter sizes")
            sizes = [int(self.rows_of(t)) for t in targets]
            start = sum(sizes[:pos])
            return {"key": key, "rows": [start, start + sizes[pos]]}
        if param in self.concat:
            patterns, keys = self.concat[param]
            missing = [p for p in patterns if p not in keys]
            if missing or expert_rows is not None:
                raise MscError(f"checkpoint has no tensor for part '{missing[0] if missing else '?'}' of '{param}'")
            return {"cat": [keys[p] for p in patterns]}
        fused = self.fused.get(param)
        if fused is None:
            return None
        if fused.ops not in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]):
            raise MscError(f"checkpoint tensors of '{param}' are fused by transformers with {' + '.join(fused.ops)}, "
                           "which msc's per-role reader cannot reproduce")
        n = num_experts if num_experts is not None else max(fused.experts) + 1
        start, stop = expert_rows if expert_rows is not None else (0, n)
        parts = []
        for e in range(start, stop):
            have = fused.experts.get(e, {})
            missing = [p for p in fused.patterns if p not in have]
            if missing:
                raise MscError(f"checkpoint has no tensor for expert {e} of '{param}' (pattern '{missing[0]}')")
            parts.append([have[p] for p in fused.patterns])
        return {"stack": parts}


def _op_names(converter) -> list[str]:
    out = []
    for op in converter.operations:
        name = type(op).__name__
        dim = getattr(op, "dim", None)
        if (name, dim) not in (("MergeModulelist", 0), ("Concatenate", 1)):
            name = f"{name}(dim={dim})"
        out.append(name)
    return out


def _expert_index(key: str, pattern: str) -> int:
    """The number standing for `*` in `pattern` within `key` (`.experts.*.w1.weight` in `...experts.3.w1.weight`)."""
    rx = re.escape(pattern.replace("\\.", ".")).replace(r"\*", r"(\d+)")  # patterns may come regex-escaped
    m = re.search(rx, key)
    if m is None:
        raise MscError(f"cannot find the expert number of checkpoint key '{key}' (pattern '{pattern}')")
    return int(m.group(1))


def build_key_index(model_type: str, keys: set[str]) -> KeyIndex:
    """Run every checkpoint key through transformers' conversion mapping for `model_type`."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_checkpoint_conversion_mapping(model_type) or []
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    index = KeyIndex({}, {})
    if not mapping:
        return index
    for key in keys:
        target, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            if target != key:
                index.renamed[target] = key
            continue
        conv = by_pattern[pattern]
        if "*" not in pattern and _op_names(conv) == ["Split(dim=0)"]:  # one tensor, row blocks per target
            targets = [target.replace(conv.target_patterns[0], t, 1) for t in conv.target_patterns]
            for i, t in enumerate(targets):
                index.split[t] = (key, targets, i)
            continue
        if "*" not in pattern and _op_names(conv) == ["Concatenate(dim=0)"]:  # whole tensors end to end
            index.concat.setdefault(target, (list(conv.source_patterns), {}))[1][pattern] = key
            continue
        if "*" not in pattern:  # not a per-expert merge: a split or reshape of one tensor (a fused QKV, say)
            raise MscError(f"checkpoint key '{key}' is converted by transformers ({' + '.join(_op_names(conv))}) into "
                           f"{list(conv.target_patterns)}, which msc's per-role checkpoint reader cannot reproduce")
        fused = index.fused.setdefault(target, _Fused(list(conv.source_patterns), _op_names(conv)))
        fused.experts[_expert_index(key, pattern)][pattern] = key
    return index
