"""What a WASH round costs outside the members' training: the server's side and the member's.

**Server.** One round's ``aggregate_train`` through the strategy, as the ServerApp runs it
(:class:`~wash_fed.strategy.rounds.PopulationStrategy` over
:class:`~wash_fed.protocol.WashServer`: the replies' records read, the reply gate, the
shuffle event, its permutations drawn ahead while the members train: ``configure_train``
starts them, and the round begins once they are drawn; "drawn ahead" is that drawing's own
time, "held ahead" the memory it holds until the round), and the next round's messages that
carry the deliveries, for the replies of ``N`` members in ``--wire-dtype`` (float16, as
docs/results/server-round.md measured; the default mask:
``shuffle-prob`` 0.05, constant schedule; each member's values the same random vector plus
its own noise, so every reply passes the gate). Beside it, measured in the same process on
the same values, the floor: a copy of every value (``torch.stack``) and one per-coordinate
permutation of them (``torch.gather`` along the member axis, the permutations drawn
beforehand). Each layout and member count runs in a process of its own, which reports its
peak memory above what it held before the round (the replies, as records): ``peak /
replies`` is that over the replies' size, the median over the repeats, from a second process
of that row whose allocator maps every block of 64 KiB or more on its own
(:data:`LIVE_MEMORY`), so that the high-water mark counts live memory, not the allocator's
cache; the times come from the first.

**Member.** A real member of the built-in app (:func:`client.task.worker_member`, Fashion-MNIST,
checkpoints in a folder of its own) trains rounds 1-3 among three peers whose replies are
its own values plus noise; from round 2 each message delivers values. Its reply's figures
give the round: training, the checkpoint, and the rest of the handler (mask, gather, wire
conversion, scatter of the delivery): the member's overhead, as a share of its training.

    python benchmarks/server_round.py [--layouts cnn,resnet18,torchvision:resnet50]
        [--members 4,16,64] [--member-models cnn,resnet18] [--repeats 3] [--wire-dtype float16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.task import worker_member
from wash_fed import wire
from wash_fed.codec import WireFormat
from wash_fed.config import ConfigValue, WashFedConfig
from wash_fed.keys import MessageType, Metric, Record
from wash_fed.models import build_model
from wash_fed.protocol import WashServer, payload_bytes, wire_format
from wash_fed.shuffle import draw_ahead, draw_permutations
from wash_fed.strategy.roster import Roster
from wash_fed.strategy.rounds import PopulationStrategy

SHAPES = {"cnn": (1, (28, 28))}
"""Input channels and image size by layout (default: 3 channels, 32x32)."""
NOISE = 0.01
"""How far a member's values sit from the shared vector (relative)."""


def _seconds(fn: Callable[[], object], repeats: int) -> float:
    """The median wall time of ``fn`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _memory_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process (kiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


@contextmanager
def _peak_above_now() -> Iterator[dict[str, int]]:
    """The peak resident memory inside the block above what was resident when it began
    (bytes, under ``"peak"``): the kernel's high-water mark reset on entry."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _memory_kib("VmRSS")
    found: dict[str, int] = {}
    yield found
    found["peak"] = (_memory_kib("VmHWM") - before) * 1024


def population(
    layout: str, members: int, wire_dtype: str
) -> tuple[WashFedConfig, dict[str, torch.Tensor]]:
    """The run's configuration for ``members`` members of ``layout``, and its parameters."""
    cfg = WashFedConfig.from_mapping(
        {"num-members": members, "model": layout, "wire-dtype": wire_dtype}
    )
    channels, size = SHAPES.get(layout, (3, (32, 32)))
    model = build_model(layout, 10, channels, size)
    return cfg, {name: p.detach() for name, p in model.named_parameters()}


def strategy_over(
    cfg: WashFedConfig, parameters: Mapping[str, torch.Tensor], members: int
) -> PopulationStrategy:
    """The ServerApp's rounds over ``members`` members at nodes 1000, 1001, ..."""
    roster = Roster(cfg, reference={})
    roster.nodes = {p: 1000 + p for p in range(members)}
    return PopulationStrategy(cfg, roster, WashServer(cfg, range(members), parameters))


def replies_to(
    messages: Sequence[Message], values: Sequence[Mapping[str, torch.Tensor]]
) -> list[Message]:
    """Each message answered with its member's ``values`` (in member order, as they travel)."""
    metrics = MetricRecord({Metric.LOSS: 1.0, Metric.NUM_EXAMPLES: 8})
    return [
        Message(
            RecordDict({Record.METRICS: metrics, **wire.payload_records("values", mine)}),
            reply_to=message,
        )
        for message, mine in zip(messages, values, strict=True)
    ]


def member_values(
    base: torch.Tensor, members: int, wire: WireFormat
) -> list[dict[str, torch.Tensor]]:
    """``members`` vectors of weights near ``base`` (each with noise of its own), encoded
    as they travel."""
    scale = NOISE * float(base.abs().mean())
    return [wire.encode({"weights": base + scale * torch.randn_like(base)}) for _ in range(members)]


def server_side(layout: str, members: int, repeats: int, wire_dtype: str) -> dict[str, float]:
    """One layout and member count (run in a process of its own): seconds and bytes."""
    torch.manual_seed(0)
    cfg, parameters = population(layout, members, wire_dtype)
    selected = cfg.shuffle_mask([p.numel() for p in parameters.values()], 1).num_selected
    values = member_values(torch.randn(selected), members, wire_format(cfg))

    def one_round() -> None:
        strategy = strategy_over(cfg, parameters, members)
        sent = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), cast(Grid, None))
        replies = replies_to(list(sent), values)
        cast(WashServer, strategy.protocol).wait_prepared()  # drawn while members train
        with _peak_above_now() as memory:
            started = time.perf_counter()
            strategy.aggregate_train(1, replies)
            timings["aggregate"].append(time.perf_counter() - started)
            started = time.perf_counter()
            strategy.messages(MessageType.TRAIN, 2, {})
            timings["deliver"].append(time.perf_counter() - started)
        timings["peak"].append(memory["peak"])
        moved = strategy.state.history[-1].exchange["moved"]
        assert moved > 0, "the round shuffled nothing: no reply passed the gate"

    timings: dict[str, list[float]] = {"aggregate": [], "deliver": [], "peak": []}
    for _ in range(repeats):
        one_round()
    # The permutation's floor: the values as the server shuffles them (a float type's values
    # as sent; a quantized format's decoded to float32).
    fmt = wire_format(cfg)
    like = {"weights": torch.empty(selected, dtype=fmt.exact_dtype)}
    weights = [fmt.decode(v, like)["weights"] for v in values]
    stacked = torch.stack(weights)
    permutations = draw_permutations(members, selected, seed=0, event=1)
    drawn = draw_ahead(members, selected, seed=0, event=1).indices
    return {
        "selected": selected,
        "replies_bytes": sum(payload_bytes(v) for v in values),
        "aggregate": statistics.median(timings["aggregate"]),
        "deliver": statistics.median(timings["deliver"]),
        "peak": statistics.median(timings["peak"]),
        "copy": _seconds(lambda: torch.stack(weights), repeats),
        "permutation": _seconds(lambda: torch.gather(stacked, 0, permutations), repeats),
        "ahead": _seconds(lambda: draw_ahead(members, selected, seed=0, event=1), repeats),
        "ahead_bytes": drawn.numel() * drawn.element_size(),
    }


def member_side(model: str, wire_dtype: str, rounds: int = 3, peers: int = 3) -> dict[str, float]:
    """A real member among ``peers`` synthetic ones, rounds 1..``rounds``: the mean of rounds
    2.. (those that deliver) of its reply's seconds."""
    run_config: dict[str, ConfigValue] = {
        "num-members": peers + 1,
        "model": model,
        "holdout-size": 0,
        "eval-every": 0,
        "wire-dtype": wire_dtype,
    }
    cfg = WashFedConfig.from_mapping(run_config)
    node_config: dict[str, ConfigValue] = {"partition-id": 0, "num-partitions": peers + 1}
    context = Context(
        run_id=1, node_id=0, node_config=node_config, state=RecordDict(), run_config=run_config
    )
    with tempfile.TemporaryDirectory(prefix="wf-member-") as folder:
        member = worker_member(context, MessageType.TRAIN, RecordDict(), Path(folder))
        parameters = dict(member.member.model.named_parameters())
        strategy = strategy_over(cfg, parameters, peers + 1)
        figures: list[dict[str, float]] = []
        for server_round in range(1, rounds + 1):
            messages = list(
                strategy.configure_train(
                    server_round, ArrayRecord(), ConfigRecord(), cast(Grid, None)
                )
            )
            reply = member.handle(MessageType.TRAIN, messages[0].content)
            metrics = reply.metric_records[Record.METRICS]
            figures.append({key: float(cast(float, metrics[key])) for key in metrics})
            sent = wire.record_to_tensors(reply.array_records[Record.VALUES])
            own = strategy.protocol.read(server_round, sent)["weights"]
            others = member_values(own, peers, wire_format(cfg))
            answers = [Message(reply, reply_to=messages[0])]
            strategy.aggregate_train(server_round, answers + replies_to(messages[1:], others))
    delivering = figures[1:]

    def mean(key: str) -> float:
        return statistics.fmean(f[key] for f in delivering)

    train, checkpoint = mean(Metric.TRAIN_SECONDS), mean(Metric.CHECKPOINT_SECONDS)
    rest = mean(Metric.HANDLER_SECONDS) - train
    return {"train": train, "checkpoint": checkpoint, "other": rest - checkpoint}


LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
"""The environment of the process that measures peak memory: every block of 64 KiB or more
mapped on its own, so that what is freed leaves the resident set at once (it slows every
large allocation, so times come from another process)."""


def _server_row(
    layout: str, members: int, repeats: int, wire_dtype: str, env: dict[str, str]
) -> dict[str, float]:
    """:func:`server_side` in a process of its own, with ``env`` added to its environment."""
    one = ["--one", layout, str(members), "--repeats", str(repeats), "--wire-dtype", wire_dtype]
    done = subprocess.run(
        [sys.executable, __file__, *one],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | env,
    )
    return cast(dict[str, float], json.loads(done.stdout.splitlines()[-1]))


def server_table(
    layouts: Sequence[str], counts: Sequence[int], repeats: int, wire_dtype: str
) -> str:
    """Every layout at every member count, each in a process of its own; Markdown."""
    lines = [
        "| layout | members | values/member | replies (MB) | aggregate_train (s) | deliveries "
        "(s) | copy (s) | permutation (s) | round / permutation | peak / replies "
        "| drawn ahead (s) | held ahead / replies |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layout in layouts:
        for members in counts:
            row = _server_row(layout, members, repeats, wire_dtype, {})
            row["peak"] = _server_row(layout, members, repeats, wire_dtype, LIVE_MEMORY)["peak"]
            server = row["aggregate"] + row["deliver"]
            lines.append(
                f"| {layout} | {members} | {row['selected']:,} | {row['replies_bytes'] / 1e6:.2f} "
                f"| {row['aggregate']:.3f} | {row['deliver']:.3f} | {row['copy']:.3f} "
                f"| {row['permutation']:.3f} | {server / row['permutation']:.1f}x "
                f"| {row['peak'] / row['replies_bytes']:.2f} | {row['ahead']:.3f} "
                f"| {row['ahead_bytes'] / row['replies_bytes']:.2f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def member_table(models: Sequence[str], wire_dtype: str) -> str:
    lines = [
        "| model | training (s) | checkpoint (s) | mask, gather, wire, scatter (s) "
        "| overhead / training |",
        "|---|---|---|---|---|",
    ]
    for model in models:
        row = member_side(model, wire_dtype)
        overhead = (row["checkpoint"] + row["other"]) / row["train"]
        lines.append(
            f"| {model} | {row['train']:.2f} | {row['checkpoint']:.3f} | {row['other']:.3f} "
            f"| {100 * overhead:.1f}% |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layouts", default="cnn,resnet18,torchvision:resnet50")
    parser.add_argument("--members", default="4,16,64")
    parser.add_argument("--member-models", default="cnn,resnet18", help="'' for none")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--wire-dtype",
        default="float16",
        help="the replies' and deliveries' format (wire-dtype; 'auto': the run's default)",
    )
    parser.add_argument("--one", nargs=2, metavar=("LAYOUT", "MEMBERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    if args.one:
        layout, members = args.one
        print(json.dumps(server_side(layout, int(members), args.repeats, args.wire_dtype)))
        return 0
    counts = [int(n) for n in args.members.split(",")]
    print(server_table(args.layouts.split(","), counts, args.repeats, args.wire_dtype))
    if args.member_models:
        print()
        print(member_table(args.member_models.split(","), args.wire_dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
