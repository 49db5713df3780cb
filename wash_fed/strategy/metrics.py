"""Prometheus metrics of a run, fed from the byte ledger and the round reports (the
ServerApp's only boundary with ``prometheus_client``).

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` histograms, base
units). Labels stay low-cardinality: ``strategy`` (a handful), ``direction`` (up, down),
``phase`` (setup, train, collect, bn, evaluate, end), ``part`` (of a round's time: train,
member, transfer, server; :mod:`wash_fed.timing`), ``model`` (member_mean, ensemble, soup,
global), ``member`` (the partition id, one per member).

The byte counter is only ever advanced by :meth:`RunMetrics.sync_ledger`, which adds the
ledger entries it has not seen yet: the exported figures are the ledger's, so the two can
never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway
from prometheus_client.exposition import start_http_server

from wash_fed.ledger import Ledger
from wash_fed.strategy.state import RoundReport
from wash_fed.timing import RoundTime

__all__ = ["RunMetrics"]


ROUND_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

_HELP: dict[str, str] = {
    "wash_fed_bytes": "Payload bytes sent, as Flower serializes the messages (the run's ledger).",
    "wash_fed_fedavg_equivalent_bytes": (
        "Bytes FedAvg would have sent for the training rounds completed so far."
    ),
    "wash_fed_rounds": "Training rounds completed.",
    "wash_fed_round_duration_seconds": (
        "Wall time of a training round, from sending to the last reply."
    ),
    "wash_fed_round_part_seconds": (
        "Rounds' wall time by part: the critical member's training, the rest of its handling, "
        "transfer (link, Flower's queues and polling), and the server."
    ),
    "wash_fed_accuracy": (
        "Test accuracy: member_mean and ensemble each evaluated round; soup and global "
        "(FedAvg) for the final model."
    ),
    "wash_fed_member_loss": "A member's mean training loss over its last round.",
    "wash_fed_member_accuracy": "A member's last reported test accuracy.",
    "wash_fed_shuffled_values": "Values that changed member in WASH shuffle events.",
}
"""Every metric's name and help text; each is labelled by ``strategy`` first."""


class RunMetrics:
    """The metrics of one run, in their own registry."""

    def __init__(self, strategy: str, registry: CollectorRegistry | None = None) -> None:
        self.strategy = strategy
        self.registry = registry or CollectorRegistry()
        self.bytes = self._counter("wash_fed_bytes", "direction", "phase")
        self.fedavg_bytes = self._counter("wash_fed_fedavg_equivalent_bytes")
        self.rounds = self._counter("wash_fed_rounds")
        self.round_seconds = Histogram(
            *self._declared("wash_fed_round_duration_seconds"),
            buckets=ROUND_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.round_part_seconds = self._counter("wash_fed_round_part_seconds", "part")
        self.accuracy = self._gauge("wash_fed_accuracy", "model")
        self.member_loss = self._gauge("wash_fed_member_loss", "member")
        self.member_accuracy = self._gauge("wash_fed_member_accuracy", "member")
        self.moved_values = self._counter("wash_fed_shuffled_values")
        self._synced = 0

    @staticmethod
    def _declared(name: str, *labels: str) -> tuple[str, str, list[str]]:
        return name, _HELP[name], ["strategy", *labels]

    def _counter(self, name: str, *labels: str) -> Counter:
        return Counter(*self._declared(name, *labels), registry=self.registry)

    def _gauge(self, name: str, *labels: str) -> Gauge:
        return Gauge(*self._declared(name, *labels), registry=self.registry)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Expose ``/metrics`` on ``port`` (a daemon thread, for as long as the process lives)."""
        start_http_server(port, addr=address, registry=self.registry)

    def sync_ledger(self, ledger: Ledger) -> None:
        """Count the ledger entries added since the last call."""
        for entry in ledger.entries[self._synced :]:
            self.bytes.labels(self.strategy, entry.direction, entry.phase).inc(entry.bytes)
        self._synced = len(ledger.entries)

    def observe_round(self, report: RoundReport, fedavg_round_bytes: int, time: RoundTime) -> None:
        """One finished training round: its duration and its parts, members' figures, what
        moved."""
        self.rounds.labels(self.strategy).inc()
        self.round_seconds.labels(self.strategy).observe(report.seconds)
        for part, seconds in time.as_dict().items():
            self.round_part_seconds.labels(self.strategy, part).inc(seconds)
        self.fedavg_bytes.labels(self.strategy).inc(fedavg_round_bytes)
        self.moved_values.labels(self.strategy).inc(report.exchange.get("moved", 0))
        for member, figures in report.metrics.items():
            if "loss" in figures:
                self.member_loss.labels(self.strategy, str(member)).set(float(figures["loss"]))
            if "test-accuracy" in figures:
                value = float(figures["test-accuracy"])
                self.member_accuracy.labels(self.strategy, str(member)).set(value)
        tested = report.member_means().get("test-accuracy")
        if tested is not None:
            self.accuracy.labels(self.strategy, "member_mean").set(tested)

    def observe_final(self, accuracies: Mapping[str, float]) -> None:
        """Final accuracies by model (``ensemble``, ``soup``, ``global``, ...)."""
        for model, value in accuracies.items():
            self.accuracy.labels(self.strategy, model).set(value)

    def push(self, gateway: str, job: str) -> None:
        """Push everything to a Pushgateway (for runs shorter than a scrape interval)."""
        push_to_gateway(gateway, job=job, registry=self.registry)
