"""A ClientApp of the user's own (wash_client_app) in this process, through Flower's own
ClientApp and Context: the member is built at the server's hello, kept in
``context.state`` and taken up again at the next message; a message before any hello, or a
node without a partition id, is refused by name. With a ``worker-dir``, the same member
lives in a member worker (served here on its real socket) that imports ``build`` by name;
a function it cannot import is named."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import grpc
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict, UserConfigValue

from tests.unit.small_configs import three_members
from tests.unit.test_clientapp import Parity, ParityTask
from wash_fed import worker, worker_link
from wash_fed.keys import Config, MessageType, Metric, NodeConfig, Record, Reply
from wash_fed.member_app import MemberParts, wash_client_app

pytestmark = pytest.mark.usefixtures("task_identity")

SETTINGS = three_members(**{"shuffle-optimizer-state": True}).member_settings


def build(context: Context) -> MemberParts:
    model = Parity()
    optimizer = torch.optim.AdamW(model.parameters())
    partition = int(context.node_config[NodeConfig.PARTITION_ID])
    return MemberParts(model, ParityTask(partition, optimizer), optimizer)


def context_of(partition: int | None, worker_dir: Path | None = None) -> Context:
    node: dict[str, UserConfigValue] = {}
    if partition is not None:
        node[NodeConfig.PARTITION_ID] = partition
    if worker_dir is not None:
        node[NodeConfig.WORKER_DIR] = str(worker_dir)
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})


def message(message_type: str, server_round: int, **config: str) -> Message:
    content = RecordDict(
        {Record.CONFIG: ConfigRecord({Config.SERVER_ROUND: server_round, **config})}
    )
    if message_type == MessageType.HELLO:
        content[Record.SETTINGS] = ConfigRecord(dict(SETTINGS.to_mapping()))
    return Message(content, dst_node_id=7, message_type=message_type)


def send(context: Context, message_type: str, server_round: int, **config: str) -> Message:
    sent = message(message_type, server_round, **config)
    return wash_client_app(build)(sent, context)  # a fresh app: a fresh process


def weights(model_state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in model_state.values()])


def test_the_member_is_built_at_the_hello_and_kept_in_the_context() -> None:
    context = context_of(1)
    hello = send(context, MessageType.HELLO, 0)
    assert not hello.has_error(), hello.error
    first = send(context, MessageType.TRAIN, 1, **{Config.REPLY: Reply.METRICS})
    second = send(context, MessageType.TRAIN, 2, **{Config.REPLY: Reply.METRICS})
    assert first.content.metric_records[Record.METRICS]["rounds-here"] == 1
    assert second.content.metric_records[Record.METRICS]["rounds-here"] == 2, "task state kept"
    assert second.content.metric_records[Record.METRICS][Metric.PARTITION_ID] == 1


def test_members_start_from_the_same_weights() -> None:
    states = []
    for partition in (0, 2):
        context = context_of(partition)
        send(context, MessageType.HELLO, 0)
        built = build(context)  # outside the app: torch's own generator, not the run's seed
        collected = send(context, MessageType.COLLECT, 1)
        states.append(collected.content.array_records[Record.ARRAYS].to_torch_state_dict())
    assert torch.equal(weights(states[0]), weights(states[1]))
    assert not torch.equal(weights(states[0]), weights(dict(built.model.state_dict())))


def test_a_message_before_the_hello_is_refused() -> None:
    with pytest.raises(ValueError, match="came before the server's hello"):
        send(context_of(0), MessageType.TRAIN, 1, **{Config.REPLY: Reply.METRICS})


def test_a_node_without_a_partition_id_is_told_how_to_give_one() -> None:
    with pytest.raises(ValueError, match=r"node config lacks 'partition-id'.*--node-config"):
        send(context_of(None), MessageType.HELLO, 0)


def test_with_a_worker_dir_the_member_lives_in_its_worker(short_tmp: Path) -> None:
    directory = worker_link.run_directory(short_tmp, 1)
    directory.mkdir(parents=True, mode=0o700)
    factory = worker.member_factory(worker_link.MemberSource.of(build, "build"))
    served = threading.Thread(target=worker.serve, args=(directory, 1, factory), daemon=True)
    served.start()
    with grpc.insecure_channel(f"unix:{worker_link.socket_path(directory)}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
    context = context_of(2, worker_dir=short_tmp)
    hello = send(context, MessageType.HELLO, 0)
    assert hello.content.metric_records[Record.METRICS][Metric.WORKER_PID] == os.getpid()
    for server_round in (1, 2):
        reply = send(context, MessageType.TRAIN, server_round, **{Config.REPLY: Reply.METRICS})
    assert reply.content.metric_records[Record.METRICS]["rounds-here"] == 2, "kept resident"
    assert not context.state.config_records, "nothing kept in the ClientApp's context"
    send(context, MessageType.END, 3)
    served.join(timeout=30)
    assert not served.is_alive(), "the worker ended with the run"


def test_a_build_a_worker_cannot_import_is_named(short_tmp: Path) -> None:
    def nested(context: Context) -> MemberParts:
        return build(context)

    with pytest.raises(ValueError, match=r"test_member_app:.*nested cannot be imported.*top level"):
        wash_client_app(nested)(message(MessageType.HELLO, 0), context_of(0, short_tmp))
