"""A member of the population as the member protocol sees it: a model, the optimizer that
trains it, and the newest delivery it applied -- whatever trains it. Framework-free.

The built-in image classifier (:class:`wash_fed.training.Member`) is one, with its own
training loop; a member of any other task is one too, trained by the caller's own loop.
What WASH needs of it:

* its **parameters** in registration order (the order the layer schedule walks), each
  shuffle event's **mask** over them, derived from ``(seed, event)`` and never transmitted;
* with WASH+Opt (``shuffle-optimizer-state``), the optimizer's **per-parameter state** of
  the parameters' shape, moved with the weights at the same coordinates: SGD's
  ``momentum_buffer``, Adam's and AdamW's ``exp_avg`` and ``exp_avg_sq``
  (:data:`OPTIMIZER_STATE`); state a parameter does not have yet (before its first step)
  is created as zeros, so that every member sends the same kinds.
"""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import Tensor, nn

from wash_fed.config import MemberSettings
from wash_fed.shuffle import ShuffleMask

__all__ = ["OPTIMIZER_STATE", "MemberState", "PopulationMember", "optimizer_state_kinds"]

OPTIMIZER_STATE: dict[type[torch.optim.Optimizer], tuple[str, ...]] = {
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adam: ("exp_avg", "exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq"),
}
"""The per-parameter state, shaped like its parameter, that WASH+Opt moves, by optimizer."""


def optimizer_state_kinds(optimizer: torch.optim.Optimizer | None) -> tuple[str, ...]:
    """The state kinds WASH+Opt moves for ``optimizer``; ValueError naming it where WASH+Opt
    does not know its state (none at all, or an optimizer not in :data:`OPTIMIZER_STATE`)."""
    if optimizer is None:
        raise ValueError("shuffle-optimizer-state needs the member's optimizer")
    kinds = OPTIMIZER_STATE.get(type(optimizer))
    if kinds is None:
        known = ", ".join(kind.__name__ for kind in OPTIMIZER_STATE)
        raise ValueError(
            f"shuffle-optimizer-state moves the state of {known}, not of {type(optimizer).__name__}"
        )
    return kinds


class MemberState(TypedDict):
    """A population member's own state (:meth:`PopulationMember.state_dict`)."""

    model: dict[str, Tensor]
    optimizer: dict[str, object] | None
    """torch's own optimizer state (its momentum buffers, its moments); None without one."""
    applied_event: int


class PopulationMember:
    """Member ``index`` of a run with ``settings``: ``model`` (on ``device``) and, when it
    has one, the ``optimizer`` that trains it.

    Invariants: :attr:`applied_event` only grows (a delivery is applied at most once); the
    mask of an event is a function of ``(settings.seed, event)`` and the parameters' sizes,
    so every member and the server derive the same one.
    """

    def __init__(
        self,
        settings: MemberSettings,
        index: int,
        model: nn.Module,
        device: torch.device,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        members = settings.num_members
        if not 0 <= index < members:
            raise ValueError(f"member index {index} out of range for num-members={members}")
        self.settings, self.index, self.device = settings, index, device
        self.model = model
        self.optimizer = optimizer
        self.applied_event = 0
        """The newest delivery (the round whose exchange produced it) written into the member."""
        self._mask: tuple[int, ShuffleMask] | None = None

    def parameters(self) -> list[Tensor]:
        """The trainable tensors, in registration order (the order layer schedules use)."""
        return list(self.model.parameters())

    def shuffle_mask(self, event: int) -> ShuffleMask:
        """The WASH mask of shuffle event ``event`` over this member's parameters. The
        latest one is kept: a round sends its values at mask ``r`` and the next writes the
        shuffled ones back at the same mask."""
        if self._mask is None or self._mask[0] != event:
            numels = [p.numel() for p in self.parameters()]
            self._mask = (event, self.settings.shuffle_mask(numels, event))
        return self._mask[1]

    def state_kinds(self) -> tuple[str, ...]:
        """The optimizer state this member's shuffles move (``shuffle-optimizer-state``:
        :func:`optimizer_state_kinds`; otherwise none)."""
        if not self.settings.exchange.shuffle_optimizer_state:
            return ()
        return optimizer_state_kinds(self.optimizer)

    def shuffle_groups(self, with_optimizer_state: bool) -> dict[str, list[Tensor]]:
        """The tensors a shuffle event moves, by kind, each list aligned with
        :meth:`parameters`: ``{"weights": [...]}``, and with ``with_optimizer_state`` each
        kind of :func:`optimizer_state_kinds`."""
        params = self.parameters()
        groups: dict[str, list[Tensor]] = {"weights": params}
        if with_optimizer_state:
            for kind in optimizer_state_kinds(self.optimizer):
                groups[kind] = [self._state(p, kind) for p in params]
        return groups

    def state_dict(self) -> MemberState:
        """The model, the optimizer's state and the newest delivery applied."""
        return {
            "model": self.model.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "applied_event": self.applied_event,
        }

    def load_state_dict(self, state: MemberState) -> None:
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.applied_event = int(state["applied_event"])

    def _state(self, param: Tensor, kind: str) -> Tensor:
        """The optimizer's ``kind`` of ``param``, created as zeros where it has none yet."""
        assert self.optimizer is not None  # optimizer_state_kinds said so
        state = self.optimizer.state[param]
        if not state and isinstance(self.optimizer, torch.optim.Adam | torch.optim.AdamW):
            state.update(_fresh_adam_state(self.optimizer, param))
        if state.get(kind) is None:
            state[kind] = torch.zeros_like(param, memory_format=torch.preserve_format)
        value: Tensor = state[kind]
        return value


def _fresh_adam_state(optimizer: torch.optim.Optimizer, param: Tensor) -> dict[str, Tensor]:
    """What Adam's (and AdamW's) first step gives a parameter before it updates it: a step
    count of zero (on the parameter's device where the optimizer keeps it there) and zero
    moments. Adam initialises a parameter's state only while it has none, so all of it is
    made at once."""
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    on_device = group.get("capturable") or group.get("fused")
    zeros = {
        kind: torch.zeros_like(param, memory_format=torch.preserve_format)
        for kind in ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if group["amsgrad"] else ()))
    }
    return {"step": torch.zeros((), device=param.device if on_device else "cpu"), **zeros}
