"""The built-in member: image classification on the run's data set (or the node's own files),
on the public member API (:class:`wash_fed.clientapp.WashMember`), with checkpoints on
node-local disk.

Two runtimes use it: the ClientApp itself (the member restored from ``context.state`` for
every message: :func:`handle_in_process`) and the member worker (the member resident in a
long-lived process, :mod:`wash_fed.worker`, built by :func:`worker_member`). Training uses
CUDA when the process has it (``device = "auto"``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import cast

import torch
from flwr.app import ConfigRecord, Context, RecordDict, UserConfigValue
from torch import nn

from client.checkpoints import MemberCheckpoints
from wash_fed.clientapp import ExampleCounts, TrainRound, WashMember
from wash_fed.config import WashFedConfig
from wash_fed.evaluation import accuracy, predict
from wash_fed.keys import Config, MessageType, Metric, Metrics, NodeConfig, Record, Split
from wash_fed.member_app import handle_in_context
from wash_fed.routing import member_index
from wash_fed.training import (
    LoopState,
    Member,
    MemberData,
    TrainingData,
    configure_torch,
    load_training_data,
    local_member_data,
    resolve_device,
    shared_member_data,
)

__all__ = ["ImageTask", "MemberTask", "handle_in_process", "worker_member"]


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


class ImageTask:
    """The built-in task (:class:`wash_fed.clientapp.Task`): image classification on the
    member's share of the run's data set (or its node's own files), trained by
    :class:`wash_fed.training.Member`'s loop: ``local-steps`` SGD steps a round."""

    def __init__(self, member: Member, data: MemberData) -> None:
        self.member = member
        self.data = data

    def train(self, model: nn.Module, round_: TrainRound) -> Metrics:
        stats = self.member.train_steps(self.member.cfg.optim.local_steps)
        return {
            Metric.LOSS: stats.loss,
            Metric.TRAIN_ACCURACY: stats.accuracy,
            Metric.NUM_EXAMPLES: stats.examples,
            Metric.STEPS: stats.steps,
            Metric.EPOCHS: stats.epochs,
        }

    def evaluate(self, model: nn.Module, split: str) -> Metrics | None:
        data = {Split.TEST: self.data.test, Split.HOLDOUT: self.data.holdout}.get(split)
        if data is None:
            return None
        predicted = predict(model, data, self.member.cfg.final.eval_batch_size)
        return {Metric.ACCURACY: accuracy(predicted, data.labels), Metric.NUM_EXAMPLES: len(data)}

    def bn_inputs(self, batches: int) -> Iterator[torch.Tensor]:
        return self.member.bn_inputs(batches)

    def examples(self) -> ExampleCounts:
        test, holdout = self.data.test, self.data.holdout
        return ExampleCounts(
            len(self.member.stream.indices),
            len(test) if test is not None else 0,
            len(holdout) if holdout is not None else 0,
        )

    def state_dict(self) -> dict[str, object]:
        return dict(self.member.loop_state())

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.member.load_loop_state(cast(LoopState, state))  # written by state_dict()


class MemberTask(WashMember):
    """Member ``partition_id`` of the run ``cfg`` on the built-in task, with checkpoints
    on node-local disk when ``checkpoints`` is given: written after every round and the
    final collection, continued from by a resumed run or a restarted worker, removed when
    the run completed."""

    def __init__(
        self,
        cfg: WashFedConfig,
        partition_id: int,
        node_config: Mapping[str, UserConfigValue],
        checkpoints: MemberCheckpoints | None = None,
    ) -> None:
        configure_torch(cfg)
        self.cfg = cfg
        self.data = _member_data(
            cfg,
            partition_id,
            str(node_config.get(NodeConfig.DATA_PATH, "")),
            str(node_config.get(NodeConfig.TEST_DATA_PATH, "")),
        )
        trained = Member(cfg, partition_id, self.data.train, resolve_device(cfg.model.device))
        super().__init__(trained, ImageTask(trained, self.data))
        self.trained = trained
        self.checkpoints = checkpoints

    def after(self, message_type: str, content: RecordDict) -> Metrics:
        """Every reply says the steps taken; a round and the final collection are written
        to the checkpoints (and say how long that took)."""
        metrics: Metrics = {Metric.STEPS_DONE: self.trained.steps_done}
        if self.checkpoints is None or message_type not in (MessageType.TRAIN, MessageType.COLLECT):
            return metrics
        saving = time.perf_counter()
        config = content.config_records[Record.CONFIG]
        keep_from = config.get(Config.CHECKPOINTED_ROUND)
        self.checkpoints.save(
            self,
            self.cfg,
            int(cast(int, config[Config.SERVER_ROUND])),
            None if keep_from is None else int(cast(int, keep_from)),
        )
        return metrics | {Metric.CHECKPOINT_SECONDS: time.perf_counter() - saving}

    def resume(self, config: ConfigRecord) -> int:
        """A resumed run's hello: a member not yet restored continues from its checkpoint
        of the run named, of a round no later than the server's."""
        if Config.RESUME_RUN not in config or self.resumed:
            return 0
        return self._continue(
            int(cast(int, config[Config.RESUME_RUN])),
            int(cast(int, config[Config.RESUME_ROUND])),
        )

    def end(self, content: RecordDict) -> tuple[Metrics, RecordDict]:
        """The run is over. Unless it can be resumed (it did not complete), its checkpoints
        and those of the runs it continued are removed, whether or not the evaluation of the
        final model worked."""
        config = content.config_records[Record.CONFIG]
        try:
            return super().end(content)
        finally:
            if self.checkpoints is not None and not config.get(Config.KEEP_CHECKPOINTS, False):
                self.checkpoints.remove()
                for run in cast(list[int], config.get(Config.EARLIER_RUNS, [])):
                    self.checkpoints.sibling(int(run)).remove()

    def restore_own(self) -> None:
        """Continue from this run's newest checkpoint, when there is one (a restarted worker
        or SuperNode)."""
        if self.checkpoints is None:
            return
        saved_round = self.checkpoints.restore(self, self.cfg)
        if saved_round is not None:
            self.resumed = True
            print(f"member {self.member.index} resumed at round {saved_round}", flush=True)

    def _continue(self, run_id: int, at_most: int) -> int:
        """Load the newest checkpoint of run ``run_id`` of a round ``<= at_most``."""
        if self.checkpoints is None:
            raise ValueError(
                f"member {self.member.index} keeps no checkpoints (member-checkpoints is '' "
                "and the node has no worker-dir): it cannot continue a run"
            )
        earlier = self.checkpoints.sibling(run_id)
        saved_round = earlier.restore(self, self.cfg, at_most=at_most)
        if saved_round is None:
            raise ValueError(
                f"member {self.member.index} has no checkpoint of run {run_id} at or before "
                f"round {at_most} in {earlier.directory}"
            )
        self.resumed = True
        return saved_round


def handle_in_process(message_type: str, content: RecordDict, context: Context) -> RecordDict:
    """Run one message in this process: the member taken up from ``context.state`` (or, in
    a fresh process, from its checkpoint on disk), handling the message, kept back there
    (:func:`wash_fed.member_app.handle_in_context`)."""
    started = time.perf_counter()
    cfg = WashFedConfig.from_mapping(context.run_config)
    partition = member_index(context.node_config, cfg.num_members)
    checkpoints = (
        MemberCheckpoints.of_run(
            Path(cfg.runtime.member_checkpoints) / f"member-{partition}", context.run_id
        )
        if cfg.runtime.member_checkpoints and cfg.strategy != "fedavg"  # FedAvg does not resume
        else None
    )
    task = MemberTask(cfg, partition, context.node_config, checkpoints)
    return handle_in_context(task, message_type, content, context, started, task.restore_own)


def worker_member(
    context: Context, message_type: str, content: RecordDict, directory: Path
) -> MemberTask:
    """The member a member worker keeps (:data:`wash_fed.worker.MemberFactory`):
    checkpointed in the worker's own folder, continuing from its newest checkpoint there (a
    restarted worker)."""
    del message_type, content  # the run configuration says all the member needs
    cfg = WashFedConfig.from_mapping(context.run_config)
    partition = member_index(context.node_config, cfg.num_members)
    task = MemberTask(cfg, partition, context.node_config, MemberCheckpoints(directory))
    task.restore_own()
    return task
