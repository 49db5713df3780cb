"""A population member of any model and optimizer: WASH+Opt moves SGD's momentum and Adam's
two moments with the weights, state a parameter has not got yet is made as the optimizer's
first step makes it, and an optimizer whose state WASH does not know is named."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from tests.unit.small_configs import three_members
from wash_fed.member import PopulationMember
from wash_fed.protocol import Delivery, apply_delivery, member_payload
from wash_fed.shuffle import shuffle_values

CPU = torch.device("cpu")


Optimizer = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]


def members(optimizer: Optimizer) -> list[PopulationMember]:
    """Three members of a small regression model, each trained one step on its own data."""
    cfg = three_members(**{"shuffle-optimizer-state": True}).member_settings
    population = []
    for index in range(3):
        torch.manual_seed(index)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        member = PopulationMember(cfg, index, model, CPU, optimizer(model.parameters()))
        x, y = torch.randn(32, 8), torch.randn(32, 1)
        nn.functional.mse_loss(model(x), y).backward()  # type: ignore[no-untyped-call]
        assert member.optimizer is not None
        member.optimizer.step()
        population.append(member)
    return population


@pytest.mark.parametrize(
    ("optimizer", "kinds"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), {"weights", "momentum_buffer"}),
        (lambda ps: torch.optim.Adam(ps, lr=0.01), {"weights", "exp_avg", "exp_avg_sq"}),
        (
            lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True),
            {"weights", "exp_avg", "exp_avg_sq"},
        ),
    ],
    ids=["sgd", "adam", "adamw-amsgrad"],
)
def test_wash_opt_moves_the_optimizers_state_with_the_weights(
    optimizer: Optimizer, kinds: set[str]
) -> None:
    population = members(optimizer)
    payloads = [member_payload(m, "values", 1) for m in population]
    assert all(set(p) == kinds for p in payloads)
    received, moved = shuffle_values(payloads, seed=0, event=1)
    assert moved > 0
    for member, mine in zip(population, received, strict=True):
        assert apply_delivery(member, Delivery("values", 1, mine))
    after = [member_payload(m, "values", 1) for m in population]
    for kind in kinds:  # each coordinate's values are the members' values, permuted
        sent = torch.stack([p[kind] for p in payloads]).sort(dim=0).values
        kept = torch.stack([p[kind] for p in after]).sort(dim=0).values
        assert torch.equal(sent, kept), kind
    for member in population:  # the optimizer steps on with the state it was given
        assert member.optimizer is not None
        loss = member.model(torch.randn(4, 8)).sum()
        loss.backward()
        member.optimizer.step()


def test_state_a_parameter_has_not_got_yet_is_made_as_the_first_step_makes_it() -> None:
    cfg = three_members(**{"shuffle-optimizer-state": True}).member_settings
    model = nn.Linear(4, 2)
    member = PopulationMember(cfg, 0, model, CPU, torch.optim.AdamW(model.parameters()))
    groups = member.shuffle_groups(with_optimizer_state=True)
    assert all(float(t.abs().sum()) == 0.0 for t in groups["exp_avg"])
    model(torch.randn(3, 4)).sum().backward()
    assert member.optimizer is not None
    member.optimizer.step()  # Adam finds a whole state: its step count, then its moments
    assert float(member.optimizer.state[model.weight]["step"]) == 1.0


def test_an_optimizer_whose_state_wash_does_not_know_is_named() -> None:
    cfg = three_members(**{"shuffle-optimizer-state": True}).member_settings
    model = nn.Linear(4, 2)
    member = PopulationMember(cfg, 0, model, CPU, torch.optim.RMSprop(model.parameters()))
    with pytest.raises(ValueError, match="not of RMSprop"):
        member.shuffle_groups(with_optimizer_state=True)
    assert set(member.shuffle_groups(with_optimizer_state=False)) == {"weights"}
