"""The member worker's link: a request (message type, run id, run and node config,
content) and a reply survive their encoding."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from wash_fed import worker_link
from wash_fed.keys import Config, MessageType, Record

NODE_CONFIG = {"partition-id": 0, "num-partitions": 1}


def test_request_envelope_round_trips() -> None:
    content = RecordDict(
        {
            Record.CONFIG: ConfigRecord({Config.SERVER_ROUND: 3, Config.REPLY: "values"}),
            Record.VALUES: ArrayRecord({"weights": torch.arange(5, dtype=torch.float32)}),
            Record.METRICS: MetricRecord({"loss": 0.5}),
        }
    )
    request = worker_link.WorkerRequest(
        MessageType.TRAIN, 2**63 + 5, {"lr": 0.1, "model": "cnn"}, NODE_CONFIG, content
    )
    decoded = worker_link.decode_request(worker_link.encode_request(request))
    assert (decoded.message_type, decoded.run_id) == (MessageType.TRAIN, 2**63 + 5)
    assert decoded.run_config == {"lr": 0.1, "model": "cnn"} and decoded.node_config == NODE_CONFIG
    assert set(decoded.content) == set(content)
    values = decoded.content.array_records[Record.VALUES]["weights"].numpy()
    assert values.tolist() == [0, 1, 2, 3, 4]
    reply = worker_link.decode_reply(worker_link.encode_reply(content))
    assert dict(reply.config_records[Record.CONFIG]) == dict(content.config_records[Record.CONFIG])
