"""``parallel.param_dtype=bf16`` in one process: what FSDP2's parameter cast does, without sharding.

FSDP2 with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` gives each unit (a block;
the root: embedding, final norm, head) bf16 leaf copies of its fp32 parameters for its forward and
backward, and casts their bf16 gradients to fp32 before reducing them into the fp32 master weights.
Here the same units get the same copies from module hooks, where FSDP2 installs them:

- before the unit's forward, each parameter is replaced in its module by a bf16 copy (a leaf
  ``nn.Parameter``, as FSDP2's unsharded parameter is); once autograd has accumulated the copy's
  gradient (in bf16, over every use in the graph), it is cast to fp32 and added to the fp32
  parameter's, which is what FSDP2's fp32 reduction does on one rank;
- after the forward the fp32 parameters are back (state dicts, the optimizer and the diagnostics
  see them), and when the gradient of the unit's output arrives the same copies are installed
  again until the end of backward, so activation checkpointing recomputes with them (FSDP2's
  pre-backward all-gather).

Buffers are not cast (FSDP2 leaves them too): the RoPE table stays fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import torch
from torch import nn


class _UnitCast:
    """The parameters of one unit, cast for its forward and backward."""

    def __init__(self, slots: list[tuple[nn.Module, str]], dtype: torch.dtype):
        self.slots, self.dtype = slots, dtype
        self.masters: list[torch.Tensor] = []
        self.casts: list[torch.Tensor] = []
        self.installed = False

    def _install(self, tensors: list[torch.Tensor]) -> None:
        for (module, name), t in zip(self.slots, tensors):
            module._parameters[name] = t  # bypasses nn.Module.__setattr__, which takes Parameters only

    def pre_forward(self, _module: nn.Module, _args: tuple, _kwargs: dict) -> None:
        if not self.installed:  # read now: to_empty and checkpoint loads replace the Parameters
            self.masters = [module._parameters[name] for module, name in self.slots]
        self.casts = []
        for master in self.masters:
            cast = nn.Parameter(master.detach().to(self.dtype), requires_grad=master.requires_grad)
            if master.requires_grad:
                cast.register_post_accumulate_grad_hook(functools.partial(_add_grad_to, master))
            self.casts.append(cast)
        self._install(self.casts)
        self.installed = True

    def post_forward(self, _module: nn.Module, _args: tuple, _kwargs: dict, output: object) -> None:
        self.restore()
        if not torch.is_grad_enabled():
            return
        for t in _tensors(output):
            if t.requires_grad:
                t.register_hook(self.pre_backward)

    def pre_backward(self, _grad: torch.Tensor) -> None:
        if not self.installed:
            self._install(self.casts)
            self.installed = True
            torch.autograd.Variable._execution_engine.queue_callback(self.restore)

    def restore(self) -> None:
        if self.installed:
            self._install(self.masters)
            self.installed = False


def _tensors(output: object) -> Iterator[torch.Tensor]:
    """The tensors in a forward's output: a block's (stream, MoE statistics), a LossOutput, logits."""
    if isinstance(output, torch.Tensor):
        yield output
    elif dataclasses.is_dataclass(output):
        for field in dataclasses.fields(output):
            yield from _tensors(getattr(output, field.name))
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)


def _add_grad_to(master: torch.Tensor, cast: torch.Tensor) -> None:
    """The copy's gradient, cast to the master's dtype, accumulated into the master's."""
    grad = cast.grad.to(master.dtype)
    cast.grad = None
    if master.grad is None:
        master.grad = grad
    else:
        master.grad += grad


def _unit_slots(unit: nn.Module, other_units: set[nn.Module]) -> list[tuple[nn.Module, str]]:
    """(module, name) of every parameter of ``unit`` outside the other units (FSDP2's grouping)."""
    slots: list[tuple[nn.Module, str]] = []
    stack = [unit]
    while stack:
        module = stack.pop()
        slots += [(module, name) for name, p in module._parameters.items() if p is not None]
        stack += [child for child in module.children() if child not in other_units]
    return slots


def apply_param_cast(model: nn.Module, units: list[nn.Module], dtype: torch.dtype) -> None:
    """Give each of ``units`` (the blocks, then the root) its parameters in ``dtype`` as FSDP2 would."""
    for unit in units:
        cast = _UnitCast(_unit_slots(unit, set(units) - {unit}), dtype)
        unit.register_forward_pre_hook(cast.pre_forward, with_kwargs=True)
        unit.register_forward_hook(cast.post_forward, with_kwargs=True, always_call=True)
