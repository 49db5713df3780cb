"""The member protocol: what a member sends after its local steps, how the server turns the
replies into deliveries, and how a member applies a delivery -- per strategy, on plain
tensors.

Every runner runs this module and nothing else of the exchange: the population trainer
(:mod:`wash_fed.population`, in memory), the ClientApp and the member worker (over Flower,
where :mod:`wash_fed.wire` only converts records). So the population trainer is the
bit-exact reference for a federated run.

One round ``r`` of a member::

    apply_delivery(member, due)            # what the exchange of an earlier round produced
    member.train_steps(local_steps)
    payload = member_payload(member, round_reply(server, r), r)

and of the server, with the payloads of the members that answered (by partition id)::

    server.prepare(r, members)             # as the messages go out: what needs no reply
    admitted = gate.admit(payloads, lambda p: server.payload_problem(r, p), what=...)
    exchange = server.exchange(r, admitted.accepted)
    deliveries.settle(answered, exchange)  # acknowledged ones go, new ones become due

except in the last round, whose payloads are the members' whole models for the final step
(:func:`round_reply`) and which has no exchange.

Invariants: a delivery stays due until its member answers a later message, so a member that
fails loses nothing; a member applies each delivery at most once (``Member.applied_event``);
WASH's deliveries are a per-coordinate permutation of what the participants sent, so the
multiset of values at every coordinate is preserved.

Values travel in the ``wire-dtype`` format (:func:`wire_format`,
:class:`wash_fed.codec.WireFormat`): payloads and deliveries are encoded when they leave and
decoded, against the tensors they stand for, where they arrive -- the server reads each
payload (:meth:`ServerProtocol.read`) before the reply gate sees it, a member decodes its
delivery when it applies it. The server shuffles and averages decoded values. With
``float32`` nothing changes and WASH preserves the population's mean exactly; with a 16-bit
type every value that travels is rounded once to that type (relative error at most 2**-8
for ``bfloat16``, 2**-11 for ``float16``) and WASH preserves the multiset of the rounded
values; ``int8`` and ``int4`` round each value within half its block's scale on the way
up, and WASH preserves the multiset of those decoded values until it quantizes each
member's new values, block by block, on the way down.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import xxhash
from torch import Tensor

from wash_fed.codec import WireFormat
from wash_fed.config import MemberSettings, WashFedConfig
from wash_fed.gate import check_tensors, check_values
from wash_fed.keys import Reply, ReplyKind
from wash_fed.papa import population_mean, pull_toward
from wash_fed.shuffle import (
    DrawnPermutations,
    ShuffleMask,
    draw_ahead,
    gather,
    scatter,
    shuffle_values,
)

__all__ = [
    "Deliveries",
    "Delivery",
    "DeliveryKind",
    "EnsembleServer",
    "Exchange",
    "FedAvgServer",
    "Member",
    "PapaServer",
    "ServerProtocol",
    "WashServer",
    "apply_delivery",
    "final_format",
    "member_payload",
    "papa_rate",
    "payload_bytes",
    "round_reply",
    "server_protocol",
    "tensors_digest",
    "wire_format",
]

DeliveryKind = Literal["values", "mean", "state"]
Payload = Mapping[str, Tensor]


class Member(Protocol):
    """What the protocol needs of a member (:class:`wash_fed.member.PopulationMember` is
    one, whatever trains it): its run's configuration, its model and device, its masks and
    the tensors they select, and the newest delivery it applied. The server's side needs
    none of it."""

    settings: MemberSettings
    device: torch.device
    model: torch.nn.Module
    applied_event: int

    def parameters(self) -> list[Tensor]: ...
    def shuffle_mask(self, event: int) -> ShuffleMask: ...
    def shuffle_groups(self, with_optimizer_state: bool) -> dict[str, list[Tensor]]: ...


@dataclass(frozen=True)
class Delivery:
    """What a member applies before its next local steps, its ``tensors`` in the wire
    format (:func:`wire_format`; decoded as they are applied).

    ``kind == "values"`` (WASH): ``tensors[kind]`` is the flat vector, shape ``(m,)``, that
    the member writes back at the mask of shuffle event ``event`` for each value kind
    (``weights``, ``momentum_buffer``). ``kind == "mean"`` (PAPA): ``tensors[name]`` is the
    population mean of parameter ``name`` after round ``event``. ``kind == "state"``
    (FedAvg, in the population trainer): ``tensors`` is the global model's state dict after
    round ``event``, which the member continues from.
    """

    kind: DeliveryKind
    event: int
    tensors: Mapping[str, Tensor]
    """Read only: one delivery may be shared by several members, or held as the record
    that carries it (:class:`wash_fed.wire.RecordTensors`)."""


def apply_delivery(member: Member, delivery: Delivery) -> bool:
    """Write ``delivery`` into ``member`` in place, unless it already applied this event or
    a later one. Returns whether it was applied."""
    if delivery.event <= member.applied_event:
        return False
    wire = wire_format(member.settings)
    if delivery.kind == "values":
        mask = member.shuffle_mask(delivery.event).to(member.device)
        groups = member.shuffle_groups(member.settings.exchange.shuffle_optimizer_state)
        like = {kind: group[0].new_empty(mask.num_selected) for kind, group in groups.items()}
        for kind, received in wire.decode(delivery.tensors, like).items():
            scatter(groups[kind], mask, received)
    elif delivery.kind == "mean":
        parameters = dict(member.model.named_parameters())
        mean = wire.decode(delivery.tensors, parameters)
        pull_toward(member.parameters(), list(mean.values()), papa_rate(member.settings))
    elif delivery.kind == "state":
        member.model.load_state_dict(wire.decode(delivery.tensors, member.model.state_dict()))
    else:
        raise ValueError(f"unknown delivery kind {delivery.kind!r}")
    member.applied_event = delivery.event
    return True


RunSettings = WashFedConfig | MemberSettings
"""A run's whole configuration (the server's) or what a member knows of it."""


def wire_format(cfg: RunSettings) -> WireFormat:
    """How the values exchanged while training travel (``wire-dtype``; ``auto`` as the
    strategy takes it: :meth:`wash_fed.config.ExchangeConfig.wire_dtype_for`)."""
    return WireFormat(cfg.exchange.wire_dtype_for(cfg.strategy))


def fedavg_format(cfg: RunSettings) -> WireFormat:
    """How FedAvg's models would travel with this run's ``wire-dtype`` (``auto``: FedAvg's
    own): the format of the FedAvg bytes a run is compared with."""
    return WireFormat(cfg.exchange.wire_dtype_for("fedavg"))


def final_format(cfg: RunSettings) -> WireFormat:
    """How the final step's values travel (``final-dtype``): the collected members and the
    soup on its way down."""
    return WireFormat(cfg.final.final_dtype)


def papa_rate(cfg: RunSettings) -> float:
    """How much of itself a member keeps when pulled toward the mean: ``papa-rate`` for
    ``papa``, 0 (replaced by the mean) for ``papa-all``."""
    return 0.0 if cfg.strategy == "papa-all" else cfg.exchange.papa_rate


def member_payload(member: Member, reply: ReplyKind, event: int) -> dict[str, Tensor]:
    """What ``member`` sends back after the local steps of round ``event``.

    ``values``: its values at the mask of shuffle event ``event``, one flat vector per kind;
    ``weights``: its parameters by name; ``state``: its full state dict; ``metrics``: nothing;
    encoded in the ``wire-dtype`` format. ``final``: its full state dict in the
    ``final-dtype`` format.
    """
    wire = wire_format(member.settings)
    if reply == Reply.VALUES:
        mask = member.shuffle_mask(event).to(member.device)
        groups = member.shuffle_groups(member.settings.exchange.shuffle_optimizer_state)
        return wire.encode({kind: gather(tensors, mask) for kind, tensors in groups.items()})
    if reply == Reply.WEIGHTS:
        return wire.encode(dict(member.model.named_parameters()))
    if reply == Reply.STATE:
        return wire.encode(member.model.state_dict())
    if reply == Reply.FINAL:
        return final_format(member.settings).encode(member.model.state_dict())
    if reply == Reply.METRICS:
        return {}
    raise ValueError(f"unknown reply kind {reply!r}")


def tensors_digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """A short fingerprint of named tensors' values (names, dtypes, shapes and bytes, in
    order): XXH3-128, a fingerprint, not a signature, at memory speed (ResNet-18's 16
    float16 replies, 18 MB, in under a millisecond; SHA-256 took 11 ms on the round's
    path)."""
    h = xxhash.xxh3_128()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # any dtype, bfloat16 too
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Exchange:
    """What the server did with one round's payloads."""

    deliveries: dict[int, Delivery]
    """New deliveries by member (partition id)."""
    counts: dict[str, int] = field(default_factory=dict)
    """What moved (WASH: ``selected``, ``moved``, ``participants``; PAPA: ``averaged``)."""

    @property
    def digest(self) -> str:
        """Fingerprint of every delivery, in member order: equal digests, equal exchanges."""
        return tensors_digest(
            (f"{member}.{d.kind}.{d.event}.{name}", t)
            for member, d in sorted(self.deliveries.items())
            for name, t in sorted(d.tensors.items())
        )


def round_reply(protocol: ServerProtocol, server_round: int) -> ReplyKind:
    """What every member sends back from round ``server_round``: ``protocol``'s reply, but
    from the last training round of a population strategy its whole model in
    ``final-dtype`` (:data:`Reply.FINAL`), which the final step collects. That round has no
    exchange: a WASH shuffle keeps every coordinate's values among the members and a PAPA
    pull their mean, so the uniform soup would be the same (exactly in ``float32``; a 16-bit
    ``wire-dtype`` would have rounded the values it moved); the members' own models, their
    ensemble and a greedy soup differ by that last exchange. FedAvg's final model is its
    last average, sent as every round's."""
    if server_round == protocol.cfg.num_server_rounds and not isinstance(protocol, FedAvgServer):
        return Reply.FINAL
    return protocol.reply_for(server_round)


class ServerProtocol:
    """The server's side of a strategy: what members send back each round, what such a
    payload must look like, and what the server delivers to them. Subclasses are the
    strategies."""

    def __init__(self, cfg: WashFedConfig, members: Iterable[int]) -> None:
        self.cfg = cfg
        self.members = sorted(members)
        self.format = wire_format(cfg)

    def reply_for(self, server_round: int) -> ReplyKind:
        """What every member sends back from round ``server_round``."""
        return "metrics"

    def prepare(self, server_round: int, members: int) -> None:
        """Start, in the background, what round ``server_round``'s exchange among
        ``members`` members needs before their replies arrive (called as its messages go
        out; nothing for most strategies)."""

    def like(self, server_round: int) -> dict[str, Tensor]:
        """The tensors a payload of round ``server_round`` stands for (their names, shapes
        and dtypes), which :meth:`read` decodes it against."""
        return {}

    def read(self, server_round: int, payload: Payload) -> dict[str, Tensor]:
        """A member's payload of round ``server_round`` as it left the member: decoded from
        the wire format. A ValueError naming what is wrong where it is not of that form."""
        return self.format.decode(payload, self.like(server_round))

    def payload_problem(self, server_round: int, payload: Payload) -> str | None:
        """Why a member's payload of round ``server_round`` (:meth:`read`) is not of the
        form its reply kind asks for (None: it is); the reply gate's first check
        (:meth:`wash_fed.gate.ReplyGate.admit`)."""
        return f"sent values {sorted(payload)[:3]} for metrics only" if payload else None

    def exchange(self, server_round: int, payloads: Mapping[int, Payload]) -> Exchange:
        """Turn the admitted payloads of round ``server_round`` (by partition id, those the
        reply gate let through, read) into deliveries in the wire format; the payloads'
        tensors may be reused and overwritten."""
        return Exchange({})


class EnsembleServer(ServerProtocol):
    """Independent members: nothing is exchanged until the final collection."""


class WashServer(ServerProtocol):
    """WASH: after each round, one shuffle event among the members whose values passed the
    gate (:mod:`wash_fed.gate`: form, then magnitude against the others).

    ``parameters`` are the model's parameter tensors by name, in registration order (only
    their sizes matter); replies carry the values in the ``wire-dtype`` format: the weights
    and, with ``shuffle-optimizer-state``, the optimizer state of ``state_kinds``
    (:meth:`wash_fed.member.PopulationMember.state_kinds`).
    """

    def __init__(
        self,
        cfg: WashFedConfig,
        members: Iterable[int],
        parameters: Mapping[str, Tensor],
        state_kinds: Sequence[str] = (),
    ) -> None:
        super().__init__(cfg, members)
        self.numels = [p.numel() for p in parameters.values()]
        self.state_kinds = list(state_kinds)
        self._selected = (-1, 0)
        """``(round, values its mask selects)`` of the round last asked about."""
        self._drawing = ThreadPoolExecutor(1, thread_name_prefix="wash-permutations")
        self._prepared: dict[tuple[int, int], Future[DrawnPermutations]] = {}
        """The permutations of :meth:`prepare`, by ``(round, members)``."""

    def reply_for(self, server_round: int) -> ReplyKind:
        return "values"

    def prepare(self, server_round: int, members: int) -> None:
        """Draw round ``server_round``'s permutations for ``members`` members in a thread
        of their own while the members train (they depend on the run's seed, the round and
        the number of participants, not on the replies): the exchange then only applies
        them, unless the gate leaves someone out (it then draws for those left). Held as
        ``uint8`` up to 256 members: ``members`` bytes a selected value."""
        if members < 2 or round_reply(self, server_round) != "values":
            return
        selected = self.selected(server_round)
        self._prepared = {
            key: drawing for key, drawing in self._prepared.items() if key[0] >= server_round
        }
        self._prepared[server_round, members] = self._drawing.submit(
            draw_ahead, members, selected, seed=self.cfg.seed, event=server_round
        )

    def expected_kinds(self) -> list[str]:
        with_state = self.cfg.exchange.shuffle_optimizer_state
        return ["weights", *self.state_kinds] if with_state else ["weights"]

    def selected(self, server_round: int) -> int:
        """How many values a member sends from round ``server_round`` (its mask derived
        once, not once per reply)."""
        if self._selected[0] != server_round:
            mask = self.cfg.shuffle_mask(self.numels, server_round)
            self._selected = (server_round, mask.num_selected)
        return self._selected[1]

    def like(self, server_round: int) -> dict[str, Tensor]:
        """The values in the wire format's exact dtype: a 16-bit float type's values are
        gated, shuffled and delivered as they came (moving them needs no arithmetic), at
        half the memory and bytes read of float32."""
        selected = self.selected(server_round)
        dtype = self.format.exact_dtype
        return {kind: torch.empty(selected, dtype=dtype) for kind in self.expected_kinds()}

    def payload_problem(self, server_round: int, payload: Payload) -> str | None:
        selected = self.selected(server_round)
        kinds = self.expected_kinds()
        return check_values(payload, kinds, selected, self.format.exact_dtype)

    def wait_prepared(self) -> None:
        """Block until what :meth:`prepare` started is drawn."""
        self._drawing.submit(lambda: None).result()

    def exchange(self, server_round: int, payloads: Mapping[int, Payload]) -> Exchange:
        """One shuffle event among the admitted members (in member order), in place: each
        payload's values become what its member receives. The payloads are the reply
        gate's admitted ones: their values are not checked for finiteness again."""
        selected = self.selected(server_round)
        counts = {"selected": selected, "moved": 0, "participants": len(payloads)}
        members = sorted(payloads)
        drawn = self._prepared.pop((server_round, len(members)), None)
        for unused in [key for key in self._prepared if key[0] == server_round]:
            del self._prepared[unused]  # drawn for all, and the gate left some out
        if len(members) < 2:
            return Exchange({}, counts)
        received, moved = shuffle_values(
            [payloads[m] for m in members],
            seed=self.cfg.seed,
            event=server_round,
            in_place=True,
            drawn=None if drawn is None else drawn.result(),
            gated=True,
        )
        deliveries = {
            member: Delivery("values", server_round, self.format.encode(mine))
            for member, mine in zip(members, received, strict=True)
        }
        return Exchange(deliveries, counts | {"moved": moved})


class _AveragingServer(ServerProtocol):
    """A strategy whose members send whole tensors (those of ``tensors``: names, shapes,
    dtypes) and get their mean back."""

    def __init__(
        self, cfg: WashFedConfig, members: Iterable[int], tensors: Mapping[str, Tensor]
    ) -> None:
        super().__init__(cfg, members)
        self.reference = {name: t.detach() for name, t in tensors.items()}

    def like(self, server_round: int) -> dict[str, Tensor]:
        return self.reference

    def payload_problem(self, server_round: int, payload: Payload) -> str | None:
        return check_tensors(payload, self.reference)

    def _mean_for_all(
        self, kind: DeliveryKind, server_round: int, payloads: Mapping[int, Payload]
    ) -> Exchange:
        """The mean of the admitted payloads (in member order), delivered to every member."""
        if not payloads:
            return Exchange({}, {"averaged": 0})
        names = list(self.reference)
        mean = population_mean([[payloads[m][n] for n in names] for m in sorted(payloads)])
        delivery = Delivery(
            kind, server_round, self.format.encode(dict(zip(names, mean, strict=True)))
        )
        return Exchange(dict.fromkeys(self.members, delivery), {"averaged": len(payloads)})


class PapaServer(_AveragingServer):
    """PAPA: every ``papa-every`` rounds the members send their parameters and every
    member is pulled toward the mean of those that pass the gate (``papa-all``: replaced
    by it) before its next steps."""

    def _due(self, server_round: int) -> bool:
        return server_round % self.cfg.exchange.papa_every == 0

    def reply_for(self, server_round: int) -> ReplyKind:
        return "weights" if self._due(server_round) else "metrics"

    def like(self, server_round: int) -> dict[str, Tensor]:
        return super().like(server_round) if self._due(server_round) else {}

    def payload_problem(self, server_round: int, payload: Payload) -> str | None:
        if not self._due(server_round):
            return ServerProtocol.payload_problem(self, server_round, payload)
        return super().payload_problem(server_round, payload)

    def exchange(self, server_round: int, payloads: Mapping[int, Payload]) -> Exchange:
        """On its rounds: the mean of the admitted members' weights, for every member."""
        if not self._due(server_round):
            return Exchange({})
        return self._mean_for_all("mean", server_round, payloads)


class FedAvgServer(_AveragingServer):
    """FedAvg on the member protocol (the population trainer's; a Flower run uses Flower's
    own FedAvg): every round the members send their full state and all continue from the
    mean of those that pass the gate. Members train equally many examples per round, so the
    mean is FedAvg's weighting by examples. ``state`` is the model's state dict (its names,
    shapes and dtypes are what replies must match)."""

    def reply_for(self, server_round: int) -> ReplyKind:
        return "state"

    def exchange(self, server_round: int, payloads: Mapping[int, Payload]) -> Exchange:
        """The mean of the admitted members' states, for every member to continue from."""
        return self._mean_for_all("state", server_round, payloads)


def server_protocol(
    cfg: WashFedConfig,
    members: Iterable[int],
    parameters: Mapping[str, Tensor],
    state_kinds: Sequence[str] = (),
) -> ServerProtocol:
    """The server protocol of ``cfg.strategy`` (anything but ``fedavg``, which is Flower's),
    for a model with ``parameters`` (by name, in registration order) whose members move
    the optimizer state ``state_kinds`` with WASH+Opt."""
    if cfg.strategy == "wash":
        return WashServer(cfg, members, parameters, state_kinds)
    if cfg.strategy in ("papa", "papa-all"):
        return PapaServer(cfg, members, parameters)
    if cfg.strategy == "ensemble":
        return EnsembleServer(cfg, members)
    raise ValueError(f"no member protocol for strategy {cfg.strategy!r}")


class Deliveries:
    """The deliveries due, by member. A delivery stays due until its member answers a
    message that carried it; a newer one (PAPA's next mean) replaces an older one."""

    def __init__(self) -> None:
        self._due: dict[int, Delivery] = {}

    def due(self, member: int) -> Delivery | None:
        return self._due.get(member)

    def settle(self, answered: Iterable[int], exchange: Exchange) -> None:
        """Members in ``answered`` applied what was due to them; ``exchange``'s deliveries
        are due from now on."""
        for member in answered:
            self._due.pop(member, None)
        self._due.update(exchange.deliveries)

    def __len__(self) -> int:
        return len(self._due)


def payload_bytes(payload: Mapping[str, Tensor]) -> int:
    """Bytes of the tensors' data, as they would travel."""
    return sum(t.numel() * t.element_size() for t in payload.values())
