"""Colocated lowering: the captured program as one executable holding attention, router and experts.

The disaggregated roles come from the pass pipeline; the colocated program is the captured graph itself
(before any pass splits it), bound to a device, with every parameter of the model. It runs in one process
(msc.runtime.gpu_engine.ColocatedEngine on a GPU): the baseline a one-GPU user runs and the reference the
planner compares plans against.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch import Tensor, nn

from msc.capture import Captured
from msc.errors import MscError
from msc.ir import bind_device, get_attr_targets

COLOCATED = "colocated"


def colocated_program(captured: Captured, weight: Callable[[str], Tensor], device: str | torch.device) -> fx.GraphModule:
    """The captured graph bound to `device`, its parameters from weight(target) and its constants (rotary
    tables) moved to the device; fused as a bundle's programs are when loaded (msc.fusions)."""
    from msc.fusions import fuse_program, fuse_weights

    gm = bind_device(captured.gm, device)
    fuse_program(gm.graph)  # NOTE: the load-time fusions of a bundle's programs, so both paths run one program
    attrs = {}
    for target in get_attr_targets(gm.graph):
        if target in captured.constants:
            attrs[target] = captured.constants[target].to(device)
        else:
            attrs[target] = weight(target)
    out = fx.GraphModule(attrs, gm.graph)
    del attrs
    fuse_weights(out, device)
    return out


def from_hf_model(captured: Captured, model: nn.Module, device: str | torch.device) -> fx.GraphModule:
    """A colocated program that shares the weights of a transformers model of the same config (no copy:
    capture names each parameter by its module path, the model's own state-dict names)."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())

    def weight(target: str) -> Tensor:
        if target not in tensors:
            raise MscError(f"the model has no tensor '{target}' that the captured program reads; was it made from the same config?")
        return tensors[target].detach()

    return colocated_program(captured, weight, device)
