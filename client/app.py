"""The wash-fed ClientApp: one member of the population per SuperNode.

A member is identified by its ``partition-id`` (node config). Its weights, optimizer state,
learning-rate schedule position and data position live in ``context.state`` between
messages; every handler restores the member, does its one job and saves it again. Training
uses CUDA when the node has it (``device = "auto"``).

Handlers (message types in :mod:`wash_fed.wire`):

* ``query.hello`` -- check configuration and data before any training, say who we are.
* ``train`` -- apply what the server delivered (WASH values, PAPA mean or FedAvg's global
  model), train ``local-steps``, reply with what ``config["reply"]`` asks for and metrics.
* ``query.collect`` -- apply what is still due, reply with the full state dict.
* ``query.bn_statistics`` -- BatchNorm statistics of a soup on the member's own data.
* ``evaluate`` -- test accuracy of the model in ``arrays`` on the member's test data.
"""

from __future__ import annotations

import functools
import io
import time
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from wash_fed import wire
from wash_fed.config import WashFedConfig
from wash_fed.data import ImageData
from wash_fed.evaluation import accuracy, predict
from wash_fed.papa import pull_toward
from wash_fed.shuffle import gather, scatter
from wash_fed.training import (
    Member,
    TrainingData,
    load_test_data,
    load_training_data,
    resolve_device,
)

app = ClientApp()

_STATE_KEY = "member"


@functools.lru_cache(maxsize=1)
def _training_data(cfg: WashFedConfig, device: torch.device) -> TrainingData:
    """Loaded once per process: read-only and identical for every member of the run."""
    data = load_training_data(cfg)
    return TrainingData(data.train.to(device), data.partitions, data.holdout)


@functools.lru_cache(maxsize=1)
def _test_data(cfg: WashFedConfig) -> ImageData:
    return load_test_data(cfg)


def _identity(context: Context, cfg: WashFedConfig) -> int:
    """This node's partition id, checked against the run configuration."""
    try:
        partition_id = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err}; start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n>"'
        ) from None
    if num_partitions != cfg.num_members:
        raise ValueError(
            f"node config says num-partitions={num_partitions}, the run has "
            f"num-members={cfg.num_members}"
        )
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} outside 0..{num_partitions - 1}")
    return partition_id


def _restore(context: Context) -> Member:
    cfg = WashFedConfig.from_mapping(context.run_config)
    device = resolve_device(cfg.device)
    member = Member(cfg, _identity(context, cfg), _training_data(cfg, device), device)
    if _STATE_KEY in context.state:
        blob = context.state.config_records[_STATE_KEY]["state"]
        assert isinstance(blob, bytes)
        member.load_state_dict(torch.load(io.BytesIO(blob), map_location=device))
    return member


def _save(context: Context, member: Member) -> None:
    buffer = io.BytesIO()
    torch.save(member.state_dict(), buffer)
    context.state[_STATE_KEY] = ConfigRecord({"state": buffer.getvalue()})


def _reply(msg: Message, member: Member, metrics: dict[str, Any], **records: Any) -> Message:
    content = RecordDict(
        {**records, wire.METRICS: MetricRecord({"partition-id": member.index, **metrics})}
    )
    return Message(content, reply_to=msg)


def _apply_delivery(member: Member, content: RecordDict) -> None:
    """Write what the server delivered into the member: WASH values, PAPA mean or a model."""
    config = content.config_records.get(wire.CONFIG, ConfigRecord())
    if wire.VALUES in content:
        values = wire.record_to_tensors(content.array_records[wire.VALUES])
        event = int(config["values-event"])  # type: ignore[arg-type]
        mask = member.shuffle_mask(event).to(member.device)
        groups = member.shuffle_groups(member.cfg.shuffle_optimizer_state)
        if values.keys() != groups.keys():
            raise ValueError(f"received value kinds {sorted(values)}, expected {sorted(groups)}")
        for kind, received in values.items():
            scatter(groups[kind], mask, received)
    if wire.MEAN in content:
        mean = wire.record_to_tensors(content.array_records[wire.MEAN])
        names = [name for name, _ in member.model.named_parameters()]
        rate = 0.0 if member.cfg.strategy == "papa-all" else member.cfg.papa_rate
        pull_toward(member.parameters(), [mean[n] for n in names], rate)
    if wire.ARRAYS in content:
        state = wire.record_to_tensors(content.array_records[wire.ARRAYS])
        member.model.load_state_dict(state)


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Check configuration and data before training; report identity and the first mask."""
    member = _restore(context)
    mask = member.shuffle_mask(1)
    info = ConfigRecord(
        {
            "mask-digest": mask.digest(),
            "device": str(member.device),
            "torch": torch.__version__,
        }
    )
    metrics = {"num-examples": len(member.stream.indices), "mask-size": mask.num_selected}
    _save(context, member)
    return _reply(msg, member, metrics, **{wire.CONFIG: info})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: apply the delivery, train, reply with what the server asked for."""
    started = time.perf_counter()
    member = _restore(context)
    restored = time.perf_counter()
    config = msg.content.config_records[wire.CONFIG]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    _apply_delivery(member, msg.content)
    train_started = time.perf_counter()
    stats = member.train_steps(member.cfg.local_steps)
    metrics: dict[str, Any] = {
        "restore-seconds": restored - started,
        "train-seconds": time.perf_counter() - train_started,
        "loss": stats.loss,
        "train-accuracy": stats.accuracy,
        "num-examples": stats.examples,
        "steps": stats.steps,
        "epochs": stats.epochs,
    }
    if config.get("evaluate", False):
        test = _test_data(member.cfg)
        metrics["test-accuracy"] = accuracy(
            predict(member.model, test, member.cfg.eval_batch_size), test.labels
        )
    reply = str(config.get("reply", wire.REPLY_METRICS))
    records: dict[str, ArrayRecord] = {}
    if reply == wire.REPLY_VALUES:
        mask = member.shuffle_mask(server_round).to(member.device)
        groups = member.shuffle_groups(member.cfg.shuffle_optimizer_state)
        gathered = {kind: gather(tensors, mask) for kind, tensors in groups.items()}
        records[wire.VALUES] = wire.tensors_to_record(gathered)
    elif reply == wire.REPLY_WEIGHTS:
        records[wire.ARRAYS] = wire.tensors_to_record(dict(member.model.named_parameters()))
    elif reply == wire.REPLY_STATE:
        records[wire.ARRAYS] = wire.tensors_to_record(member.model.state_dict())
    _save(context, member)
    metrics["handler-seconds"] = time.perf_counter() - started
    return _reply(msg, member, metrics, **records)


@app.query("collect")
def collect(msg: Message, context: Context) -> Message:
    """Final step: apply what is still due, reply with the full state dict."""
    member = _restore(context)
    _apply_delivery(member, msg.content)
    _save(context, member)
    state = wire.tensors_to_record(member.model.state_dict())
    return _reply(msg, member, {"steps": member.steps_done}, **{wire.ARRAYS: state})


@app.query("bn_statistics")
def bn_statistics(msg: Message, context: Context) -> Message:
    """BatchNorm statistics of the soup in ``arrays`` on this member's own data."""
    member = _restore(context)
    soup = wire.record_to_tensors(msg.content.array_records[wire.ARRAYS])
    stats = member.bn_statistics(soup)
    return _reply(
        msg,
        member,
        {"batches": stats.batches},
        **{wire.STATS: wire.bn_statistics_to_record(stats)},
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Test accuracy of the model in ``arrays`` on this member's test data."""
    member = _restore(context)
    member.model.load_state_dict(wire.record_to_tensors(msg.content.array_records[wire.ARRAYS]))
    test = _test_data(member.cfg)
    acc = accuracy(predict(member.model, test, member.cfg.eval_batch_size), test.labels)
    return _reply(msg, member, {"accuracy": acc, "num-examples": len(test)})
