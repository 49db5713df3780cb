"""A Flower app that costs nothing but Flower: every round the ServerApp sends each node one
message and polls for the replies every ``poll-interval`` seconds (as wash-fed's server
does); the ClientApp replies at once. The ServerApp logs one line at the end,
``floor rounds: [seconds, ...]``."""

from __future__ import annotations

import json
import time
from logging import INFO

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.train()
def reply_at_once(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"answered": 1})}), reply_to=msg)


@server.main()
def rounds(grid: Grid, context: Context) -> None:
    members = int(context.run_config["num-members"])
    poll = float(context.run_config["poll-interval"])
    while len(nodes := sorted(grid.get_node_ids())) < members:
        time.sleep(poll)
    seconds = []
    for r in range(1, int(context.run_config["num-server-rounds"]) + 1):
        started = time.monotonic()
        content = RecordDict({"config": ConfigRecord({"round": r})})
        messages = [Message(content, dst_node_id=n, message_type="train") for n in nodes]
        pending = set(grid.push_messages(messages))
        while True:
            pending -= {m.metadata.reply_to_message_id for m in grid.pull_messages(pending)}
            if not pending:
                break
            time.sleep(poll)
        seconds.append(time.monotonic() - started)
    log(INFO, "floor rounds: %s", json.dumps(seconds))
