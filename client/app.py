"""The wash-fed ClientApp: one member of the population per SuperNode.

A member is identified by its node's ``partition-id``. Every handler is "load, call the
task, reply": the member is restored from ``context.state`` in this process
(:func:`client.task.handle_in_process`).

Message types and what the member does are in :mod:`wash_fed.keys` and
:class:`client.task.MemberTask`.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.task import handle_in_process

app = ClientApp()


def _respond(msg: Message, context: Context) -> Message:
    """The member's reply to ``msg``."""
    content = handle_in_process(msg.metadata.message_type, msg.content, context)
    return Message(content, reply_to=msg)


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    return _respond(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _respond(msg, context)


@app.query("collect")
def collect(msg: Message, context: Context) -> Message:
    return _respond(msg, context)


@app.query("bn_statistics")
def bn_statistics(msg: Message, context: Context) -> Message:
    return _respond(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _respond(msg, context)


@app.query("end")
def end(msg: Message, context: Context) -> Message:
    return _respond(msg, context)
