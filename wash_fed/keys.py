"""Every name two processes share: message types, record names, config and metric entries,
node configuration.

The ServerApp, the ClientApp, the member worker and the tests spell these names only
through this module. It imports nothing, so the ClientApp's worker proxy can use it without
loading torch.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "RESULTS_IN",
    "SCALES_SUFFIX",
    "Config",
    "Info",
    "MessageType",
    "Metric",
    "Metrics",
    "NodeConfig",
    "Record",
    "Reply",
    "Split",
]

SCALES_SUFFIX: Final = "#scales"
"""A quantized tensor ``name`` travels as its codes under ``name`` and its blocks' scales
under ``name`` + this (no state-dict name holds a ``#``)."""
RESULTS_IN: Final = "results in "
"""The ServerApp's first log line ends with this and its results folder; the launcher reads
it there to settle a run whose ServerApp was killed before it could."""


class MessageType:
    """Message types; Flower routes ``<category>.<action>`` to the ClientApp's handlers."""

    TRAIN: Final = "train"
    """A round: apply the delivery, train ``local-steps``, reply with what ``reply`` asks."""
    EVALUATE: Final = "evaluate"
    """Test accuracy of the model in ``arrays`` on the member's own test data."""
    HELLO: Final = "query.hello"
    """Before training (and when a node comes back): identity, data, first mask's digest."""
    COLLECT: Final = "query.collect"
    """Final step: apply what is still due, reply with the full state dict."""
    BN_STATISTICS: Final = "query.bn_statistics"
    """Final step: BatchNorm statistics of the soup in ``arrays`` on the member's data."""
    END: Final = "query.end"
    """The run is over: the member's worker (if any) removes its checkpoint and exits."""


class Record:
    """Names of the records in a message's content."""

    CONFIG: Final = "config"
    METRICS: Final = "metrics"
    INFO: Final = "info"
    """A member's description of itself (``query.hello`` replies), a ConfigRecord."""
    SETTINGS: Final = "settings"
    """``query.hello``: what a member must know of the run, a ConfigRecord of kebab-case
    keys (:class:`wash_fed.config.MemberSettings`)."""
    VALUES: Final = "values"
    """WASH: values at a shuffle event's mask, by value kind (a delivery, or a reply)."""
    MEAN: Final = "mean"
    """PAPA: the population mean of the parameters (a delivery)."""
    ARRAYS: Final = "arrays"
    """A full state dict or the parameters (Flower's FedAvg uses this name too)."""
    STATS: Final = "stats"
    """BatchNorm statistics (``<layer>.mean``, ``<layer>.var``)."""


class Config:
    """Entries of the ``config`` record, server to member."""

    SERVER_ROUND: Final = "server-round"
    REPLY: Final = "reply"
    """What the member sends back from a round: one of :class:`Reply`."""
    EVALUATE: Final = "evaluate"
    """True: the member also reports its test accuracy this round."""
    DELIVERY_EVENT: Final = "delivery-event"
    """The round whose exchange produced the delivery (``values`` or ``mean``) in the message."""
    PATCH: Final = "patch"
    """``query.bn_statistics`` and ``evaluate``: True when ``arrays`` holds only the tensors
    that differ from the model the member kept from the final step's previous message."""
    SPLIT: Final = "split"
    """``evaluate``: on which of its data the member evaluates, one of :class:`Split`."""
    CHECKPOINTED_ROUND: Final = "checkpointed-round"
    """``train`` and ``query.collect``: the newest round of the server's own checkpoint; a
    member keeps its checkpoints of that round and later (absent: its newest only)."""
    CREDENTIAL: Final = "credential"
    """``query.hello``: a secret the server issues; a member without a credential for the
    run adopts it, keeps it with its checkpoints and shows it at every hello."""
    RESUME_RUN: Final = "resume-run"
    """``query.hello`` of a resumed run: the run whose member checkpoints to continue."""
    RESUME_ROUND: Final = "resume-round"
    """``query.hello`` of a resumed run: the last round the server has; the member continues
    from its newest checkpoint of a round no later than this."""
    KEEP_CHECKPOINTS: Final = "keep-checkpoints"
    """``query.end``: True when the run did not complete (it can be resumed)."""
    EARLIER_RUNS: Final = "earlier-runs"
    """``query.end`` of a resumed run: the runs it continued, whose checkpoints go with it."""


class Split:
    """A member's evaluation data."""

    TEST: Final = "test"
    HOLDOUT: Final = "holdout"
    """Its held-out training images (greedy-soup ingredients)."""


class Reply:
    """What a member sends back from a round."""

    VALUES: Final = "values"
    WEIGHTS: Final = "weights"
    STATE: Final = "state"
    METRICS: Final = "metrics"
    FINAL: Final = "final"
    """The whole model in ``final-dtype``: the last training round's reply, which the final
    step collects."""


ReplyKind = Literal["values", "weights", "state", "metrics", "final"]


class Metric:
    """Entries of the ``metrics`` record, member to server."""

    PARTITION_ID: Final = "partition-id"
    LOSS: Final = "loss"
    TRAIN_ACCURACY: Final = "train-accuracy"
    TEST_ACCURACY: Final = "test-accuracy"
    NUM_EXAMPLES: Final = "num-examples"
    """Also Flower FedAvg's weighting key."""
    TEST_EXAMPLES: Final = "test-examples"
    """``query.hello``: the member's test images (the most its evaluations may weigh)."""
    HOLDOUT_EXAMPLES: Final = "holdout-examples"
    """``query.hello``: the member's held-out images."""
    STEPS: Final = "steps"
    STEPS_DONE: Final = "steps-done"
    EPOCHS: Final = "epochs"
    APPLIED_EVENT: Final = "applied-event"
    """The newest delivery the member has applied (0: none)."""
    MASK_SIZE: Final = "mask-size"
    BATCHES: Final = "batches"
    ACCURACY: Final = "accuracy"
    RESTORE_SECONDS: Final = "restore-seconds"
    TRAIN_SECONDS: Final = "train-seconds"
    HANDLER_SECONDS: Final = "handler-seconds"
    CHECKPOINT_SECONDS: Final = "checkpoint-seconds"
    """The member's time to write its checkpoint after the message."""
    RESPOND_SECONDS: Final = "respond-seconds"
    """The ClientApp's handling of the message: the member's, and relaying it to the
    member worker where the node has one."""
    STARTUP_SECONDS: Final = "startup-seconds"
    """The ClientApp's process starting, up to handling the message (0: the process was
    running before the message was sent: a simulation's, or one Flower started ahead)."""
    DELIVERED_AT: Final = "delivered-at"
    """When the SuperLink handed the message to the node (Flower's stamp, Unix seconds;
    absent where Flower does not pass it on: deployments)."""
    RECEIVED_AT: Final = "received-at"
    """When the ClientApp began handling the message (Unix seconds, the node's clock)."""
    RESUMED_ROUND: Final = "resumed-round"
    """``query.hello``: the round of the checkpoint the member continues from (0: none)."""
    WORKER_PID: Final = "worker-pid"
    """The member worker's process id (absent when the member runs in the ClientApp)."""


Metrics = dict[str, float]
"""A member's metrics record: figures by :class:`Metric` name (integers among them)."""


class Info:
    """Entries of the ``info`` record of a ``query.hello`` reply."""

    MASK_DIGEST: Final = "mask-digest"
    DEVICE: Final = "device"
    TORCH: Final = "torch"
    RESUMED: Final = "resumed"
    """True when the member was restored from a checkpoint of this run."""
    CREDENTIAL: Final = "credential"
    """The credential the member holds (see :attr:`Config.CREDENTIAL`)."""
    MODEL_LAYOUT: Final = "model-layout"
    """Its model's state entries, ``name:shape`` each, as a JSON list: every member must
    build the server's."""
    STATE_KINDS: Final = "state-kinds"
    """The optimizer state its shuffles move, as a JSON list (WASH+Opt; empty without)."""
    PARAMETERS: Final = "parameters"
    """The names of its model's parameters, in registration order, as a JSON list: what
    WASH's masks range over (the rest of the state, buffers, is not shuffled)."""


class NodeConfig:
    """Keys of a SuperNode's ``--node-config``."""

    PARTITION_ID: Final = "partition-id"
    NUM_PARTITIONS: Final = "num-partitions"
    WORKER_DIR: Final = "worker-dir"
    """Where this node's member worker keeps its socket and checkpoints; unset: no worker."""
    DATA_PATH: Final = "data-path"
    """This node's own training data (a tensor file or an image folder); unset: its
    partition of the run's data set."""
    TEST_DATA_PATH: Final = "test-data-path"
    """This node's own test data, with ``data-path``; unset: it evaluates nothing."""
