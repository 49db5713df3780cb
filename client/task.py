"""One member's handlers on Flower records: decode, call the member protocol, encode.

Two runtimes use it: the ClientApp itself (the member restored from ``context.state`` for
every message: :func:`handle_in_process`) and the member worker (the member resident in a
long-lived process: :mod:`client.worker`). Training uses CUDA when the process has it
(``device = "auto"``).
"""

from __future__ import annotations

import functools
import io
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import torch
from flwr.app import (
    ConfigRecord,
    Context,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
    UserConfigValue,
)

from client.checkpoints import MemberCheckpoints
from wash_fed import wire
from wash_fed.config import WashFedConfig
from wash_fed.data import ImageData
from wash_fed.evaluation import accuracy, predict
from wash_fed.keys import (
    Config,
    Info,
    MessageType,
    Metric,
    Metrics,
    NodeConfig,
    Record,
    Reply,
    ReplyKind,
    Split,
)
from wash_fed.models import model_layout
from wash_fed.protocol import apply_delivery, final_dtype, member_payload, to_wire
from wash_fed.training import (
    Member,
    MemberData,
    TrainingData,
    configure_torch,
    load_training_data,
    local_member_data,
    resolve_device,
    shared_member_data,
)

__all__ = ["MemberTask", "handle_in_process", "member_identity"]

_STATE_KEY = "member"
_REPLY_KINDS = (Reply.VALUES, Reply.WEIGHTS, Reply.STATE, Reply.METRICS)


@functools.lru_cache(maxsize=1)
def _shared_data(cfg: WashFedConfig) -> TrainingData:
    """Loaded once per process: read-only and identical for every member of the run."""
    return load_training_data(cfg)


@functools.lru_cache(maxsize=4)
def _member_data(cfg: WashFedConfig, partition: int, data_path: str, test_path: str) -> MemberData:
    """The node's own data when it names some (``data-path``), else its partition of the
    run's data set. Cached: a simulation process serves the messages of several members."""
    if data_path:
        return local_member_data(cfg, partition, data_path, test_path or None)
    return shared_member_data(cfg, partition, _shared_data(cfg))


def member_identity(node_config: Mapping[str, UserConfigValue], cfg: WashFedConfig) -> int:
    """This node's partition id, checked against the run configuration."""
    try:
        partition_id = int(node_config[NodeConfig.PARTITION_ID])
        num_partitions = int(node_config[NodeConfig.NUM_PARTITIONS])
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


class MemberTask:
    """Member ``partition_id`` of the run ``cfg`` and its handlers, one per message type.

    ``startup_seconds`` (building or restoring the member) is reported by the first reply
    after it was set, as ``restore-seconds``.
    """

    def __init__(
        self,
        cfg: WashFedConfig,
        partition_id: int,
        node_config: Mapping[str, UserConfigValue],
        checkpoints: MemberCheckpoints | None = None,
    ) -> None:
        configure_torch(cfg)
        device = resolve_device(cfg.model.device)
        self.cfg = cfg
        self.data = _member_data(
            cfg,
            partition_id,
            str(node_config.get(NodeConfig.DATA_PATH, "")),
            str(node_config.get(NodeConfig.TEST_DATA_PATH, "")),
        )
        self.member = Member(cfg, partition_id, self.data.train, device)
        self.checkpoints = checkpoints
        self.kept: dict[str, torch.Tensor] | None = None
        """The model the server last sent in the final step (a soup), which a patch
        updates."""
        self.credential = ""
        """What the server issued this member at its first hello of the run ("": none yet)."""
        self.resumed = False
        self.startup_seconds = 0.0
        self._handlers: dict[str, Callable[[RecordDict], tuple[Metrics, RecordDict]]] = {
            MessageType.HELLO: self.hello,
            MessageType.TRAIN: self.train,
            MessageType.COLLECT: self.collect,
            MessageType.BN_STATISTICS: self.bn_statistics,
            MessageType.EVALUATE: self.evaluate,
            MessageType.END: self.end,
        }

    def handle(self, message_type: str, content: RecordDict) -> RecordDict:
        """The reply content to a message of ``message_type``."""
        handler = self._handlers.get(message_type)
        if handler is None:
            raise ValueError(f"no handler for message type {message_type!r}")
        started = time.perf_counter()
        metrics, reply = handler(content)
        if self.checkpoints is not None and message_type in (
            MessageType.TRAIN,
            MessageType.COLLECT,
        ):
            saving = time.perf_counter()
            config = content.config_records[Record.CONFIG]
            server_round = int(cast(int, config[Config.SERVER_ROUND]))
            keep_from = config.get(Config.CHECKPOINTED_ROUND)
            self.checkpoints.save(
                self.member,
                self.cfg,
                server_round,
                None if keep_from is None else int(cast(int, keep_from)),
                self.credential,
            )
            metrics[Metric.CHECKPOINT_SECONDS] = time.perf_counter() - saving
        metrics |= {
            Metric.PARTITION_ID: self.member.index,
            Metric.RESTORE_SECONDS: self.startup_seconds,
            Metric.HANDLER_SECONDS: time.perf_counter() - started,
        }
        self.startup_seconds = 0.0
        record: dict[str, MetricRecordValues] = dict(metrics)
        reply[Record.METRICS] = MetricRecord(record)
        return reply

    # --- handlers: (metrics, other records of the reply) ---------------------------------

    def hello(self, content: RecordDict) -> tuple[Metrics, RecordDict]:
        """Check configuration and data before training; report identity and first mask.
        In a resumed run, a member not yet restored continues from its checkpoint. A member
        without a credential adopts the one the server issues; every hello shows it."""
        config = content.config_records[Record.CONFIG]
        resumed_round = 0
        if Config.RESUME_RUN in config and not self.resumed:
            resumed_round = self._continue(
                int(cast(int, config[Config.RESUME_RUN])),
                int(cast(int, config[Config.RESUME_ROUND])),
            )
        if not self.credential:
            self.credential = str(config.get(Config.CREDENTIAL, ""))
        mask = self.member.shuffle_mask(1)
        info = ConfigRecord(
            {
                Info.MASK_DIGEST: mask.digest(),
                Info.DEVICE: str(self.member.device),
                Info.TORCH: torch.__version__,
                Info.RESUMED: self.resumed,
                Info.CREDENTIAL: self.credential,
                Info.MODEL_LAYOUT: json.dumps(model_layout(self.member.model)),
            }
        )
        metrics: Metrics = {
            Metric.NUM_EXAMPLES: len(self.member.stream.indices),
            Metric.TEST_EXAMPLES: len(self.data.test) if self.data.test is not None else 0,
            Metric.HOLDOUT_EXAMPLES: len(self.data.holdout) if self.data.holdout else 0,
            Metric.MASK_SIZE: mask.num_selected,
            Metric.STEPS_DONE: self.member.steps_done,
            Metric.APPLIED_EVENT: self.member.applied_event,
            Metric.RESUMED_ROUND: resumed_round,
        }
        return metrics, RecordDict({Record.INFO: info})

    def train(self, content: RecordDict) -> tuple[Metrics, RecordDict]:
        """One round: apply the delivery, train, reply with what the server asked for."""
        config = content.config_records[Record.CONFIG]
        server_round = int(cast(int, config[Config.SERVER_ROUND]))
        reply = str(config.get(Config.REPLY, Reply.METRICS))
        if reply not in _REPLY_KINDS:
            raise ValueError(f"{Config.REPLY}={reply!r}; expected one of {_REPLY_KINDS}")
        self._apply(content)
        started = time.perf_counter()
        stats = self.member.train_steps(self.cfg.optim.local_steps)
        metrics: Metrics = {
            Metric.TRAIN_SECONDS: time.perf_counter() - started,
            Metric.LOSS: stats.loss,
            Metric.TRAIN_ACCURACY: stats.accuracy,
            Metric.NUM_EXAMPLES: stats.examples,
            Metric.STEPS: stats.steps,
            Metric.EPOCHS: stats.epochs,
        }
        if config.get(Config.EVALUATE, False) and self.data.test is not None:
            metrics[Metric.TEST_ACCURACY] = self._accuracy(self.data.test)
        payload = member_payload(self.member, cast(ReplyKind, reply), server_round)
        return metrics, RecordDict({**wire.payload_records(cast(ReplyKind, reply), payload)})

    def collect(self, content: RecordDict) -> tuple[Metrics, RecordDict]:
        """Final step: apply what is still due, reply with the full state dict (and, when the
        server has no test set, the member's accuracy on its own)."""
        self._apply(content)
        metrics: Metrics = {Metric.STEPS_DONE: self.member.steps_done}
        if not self.cfg.data.test_on_server and self.data.test is not None:
            metrics[Metric.TEST_ACCURACY] = self._accuracy(self.data.test)
        state = to_wire(self.member.model.state_dict(), final_dtype(self.cfg))
        return metrics, RecordDict({Record.ARRAYS: wire.tensors_to_record(state)})

    def bn_statistics(self, content: RecordDict) -> tuple[Metrics, RecordDict]:
        """BatchNorm statistics of the soup in ``arrays`` on this member's own data."""
        soup = self._received_model(content)
        stats = self.member.bn_statistics(soup)
        record = wire.bn_statistics_to_record(stats)
        return {Metric.BATCHES: stats.batches}, RecordDict({Record.STATS: record})

    def evaluate(self, content: RecordDict) -> tuple[Metrics, RecordDict]:
        """Accuracy of the model in ``arrays`` on this member's test data, or its held-out
        images (``split``); no accuracy and no examples when it has none."""
        split = content.config_records[Record.CONFIG].get(Config.SPLIT, Split.TEST)
        data = {Split.TEST: self.data.test, Split.HOLDOUT: self.data.holdout}.get(str(split))
        if data is None:
            return {Metric.NUM_EXAMPLES: 0}, RecordDict()
        received = self._received_model(content)
        own = {k: v.clone() for k, v in self.member.model.state_dict().items()}
        self.member.model.load_state_dict(received)
        try:
            acc = self._accuracy(data)
        finally:
            self.member.model.load_state_dict(own)
        return {Metric.ACCURACY: acc, Metric.NUM_EXAMPLES: len(data)}, RecordDict()

    def end(self, content: RecordDict) -> tuple[Metrics, RecordDict]:
        """The run is over. A final model in ``arrays`` is evaluated first (as by
        :meth:`evaluate`). Unless the run can be resumed (it did not complete), its
        checkpoints and those of the runs it continued are removed, whether or not the
        evaluation worked."""
        config = content.config_records[Record.CONFIG]
        try:
            metrics = self.evaluate(content)[0] if Record.ARRAYS in content.array_records else {}
        finally:
            if self.checkpoints is not None and not config.get(Config.KEEP_CHECKPOINTS, False):
                self.checkpoints.remove()
                for run in cast(list[int], config.get(Config.EARLIER_RUNS, [])):
                    self.checkpoints.sibling(int(run)).remove()
        return metrics | {Metric.STEPS_DONE: self.member.steps_done}, RecordDict()

    # --- checkpoints ---------------------------------------------------------------------

    def restore_own(self) -> None:
        """Continue from this run's newest checkpoint, when there is one (a restarted worker
        or SuperNode)."""
        if self.checkpoints is None:
            return
        saved = self.checkpoints.restore(self.member, self.cfg)
        if saved is not None:
            self.resumed = True
            saved_round, self.credential = saved
            print(f"member {self.member.index} resumed at round {saved_round}", flush=True)

    def _continue(self, run_id: int, at_most: int) -> int:
        """Load the newest checkpoint of run ``run_id`` of a round ``<= at_most``."""
        if self.checkpoints is None:
            raise ValueError(
                f"member {self.member.index} keeps no checkpoints (member-checkpoints is '' "
                "and the node has no worker-dir): it cannot continue a run"
            )
        earlier = self.checkpoints.sibling(run_id)
        saved = earlier.restore(self.member, self.cfg, at_most=at_most)
        if saved is None:
            raise ValueError(
                f"member {self.member.index} has no checkpoint of run {run_id} at or before "
                f"round {at_most} in {earlier.directory}"
            )
        self.resumed = True
        saved_round, self.credential = saved
        return saved_round

    # --- helpers -------------------------------------------------------------------------

    def _apply(self, content: RecordDict) -> None:
        """Write what the server delivered: the protocol's delivery, or FedAvg's model."""
        delivery = wire.delivery_from_content(content)
        if delivery is not None:
            apply_delivery(self.member, delivery)
        if Record.ARRAYS in content.array_records:
            state = wire.record_to_tensors(content.array_records[Record.ARRAYS])
            self.member.model.load_state_dict(state)

    def _received_model(self, content: RecordDict) -> dict[str, torch.Tensor]:
        """The model a final-step message carries, whole or (``patch``) as the tensors that
        differ from the one this member kept from the previous message; kept in turn."""
        tensors = wire.record_to_tensors(content.array_records[Record.ARRAYS])
        if content.config_records[Record.CONFIG].get(Config.PATCH, False):
            if self.kept is None:
                raise ValueError("a patch arrived, but this member kept no model to apply it to")
            unknown = sorted(tensors.keys() - self.kept.keys())
            if unknown:
                raise ValueError(f"the patch names tensors the kept model lacks: {unknown[:3]}")
            tensors = {**self.kept, **tensors}
        self.kept = tensors
        return tensors

    def _accuracy(self, data: ImageData) -> float:
        return accuracy(
            predict(self.member.model, data, self.cfg.final.eval_batch_size), data.labels
        )

    # --- state ---------------------------------------------------------------------------

    def state_bytes(self) -> bytes:
        """The member's state (see :meth:`wash_fed.training.Member.state_dict`) and the
        model it kept, as bytes."""
        buffer = io.BytesIO()
        torch.save({"member": self.member.state_dict(), "kept": self.kept}, buffer)
        return buffer.getvalue()

    def load_state_bytes(self, blob: bytes) -> None:
        saved = torch.load(io.BytesIO(blob), map_location=self.member.device)
        self.member.load_state_dict(saved["member"])
        self.kept = saved["kept"]


def handle_in_process(message_type: str, content: RecordDict, context: Context) -> RecordDict:
    """Run one message in this process: restore the member from ``context.state`` (or, in
    a fresh process, its checkpoint on disk), handle the message, save the member back."""
    started = time.perf_counter()
    cfg = WashFedConfig.from_mapping(context.run_config)
    partition = member_identity(context.node_config, cfg)
    checkpoints = (
        MemberCheckpoints.of_run(
            Path(cfg.runtime.member_checkpoints) / f"member-{partition}", context.run_id
        )
        if cfg.runtime.member_checkpoints and cfg.strategy != "fedavg"  # FedAvg does not resume
        else None
    )
    task = MemberTask(cfg, partition, context.node_config, checkpoints)
    if _STATE_KEY in context.state:
        kept = context.state.config_records[_STATE_KEY]
        task.load_state_bytes(cast(bytes, kept["state"]))
        task.resumed = bool(kept["resumed"])
        task.credential = str(kept["credential"])
    else:
        task.restore_own()
    task.startup_seconds = time.perf_counter() - started
    reply = task.handle(message_type, content)
    context.state[_STATE_KEY] = ConfigRecord(
        {"state": task.state_bytes(), "resumed": task.resumed, "credential": task.credential}
    )
    return reply
