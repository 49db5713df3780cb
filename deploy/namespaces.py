"""Edge links on one machine: a real multi-host Flower deployment over bandwidth-limited links.

The SuperLink (and the ServerApp, and the ``flwr`` CLI) run in a *hub* network namespace;
each SuperNode, with its ClientApps and its member worker, runs in a namespace of its own,
joined to the hub by a veth pair. Both ends of every pair are shaped with the ``tbf`` qdisc
to ``--mbit`` megabits per second, so each node has that much uplink and downlink. Only the
addresses 10.77.<i>.1 (hub) and 10.77.<i>.2 (node i) exist, and only inside namespaces made
here; nothing is added to the machine's own network. ``tbf`` limits rate, not delay: the
links have no added latency (``netem`` is not available on every kernel).

Everything is torn down at the end -- processes, namespaces and with them the links -- also
when the run fails or the launcher is interrupted. Requires root (``ip netns``).

    sudo .venv/bin/python -m deploy.namespaces --members 4 --mbit 10 \\
        --run-config 'strategy="wash" num-server-rounds=5'

Exits 0 when the run completed, 1 when it did not, 2 when the topology could not be built.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import click
from flwr.common.config import parse_config_args

from deploy.flwr_cli import FlwrError, FlwrRun, check_run_config, results_file_in, run_config_arg
from deploy.processes import FlowerHarness
from wash_fed.config import MAX_TIMEOUT, ConfigError, ConfigValue
from wash_fed.results import RunResult, read_results
from wash_fed.timing import PARTS

__all__ = [
    "EdgeFederation",
    "EdgeTopology",
    "TopologyError",
    "inside",
    "main",
    "unwind_on_sigterm",
]

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
TBF_LATENCY = "400ms"
"""The longest a packet may queue at a shaped link before it is dropped (TCP backs off)."""


class TopologyError(RuntimeError):
    """The namespaces or links could not be built (not root, no ``ip``, no netns support)."""


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise TopologyError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _tc(*args: str) -> str:
    done = subprocess.run(["tc", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise TopologyError(f"tc {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def burst_bytes(mbit: float) -> int:
    """A ``tbf`` bucket that lets the rate through at a 10 ms timer tick (at least 32 KiB)."""
    return max(32 * 1024, int(mbit * 1e6 / 8 / 100))


@dataclass
class EdgeTopology:
    """A hub namespace and ``nodes`` node namespaces, each joined to the hub by a veth pair
    shaped to ``mbit`` Mbit/s in each direction. Build it with :meth:`build`, remove it
    with :meth:`close` (both as a context manager)."""

    nodes: int
    mbit: float
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    @property
    def hub(self) -> str:
        return f"wf-{self.tag}-hub"

    def node(self, index: int) -> str:
        return f"wf-{self.tag}-{index}"

    @property
    def namespaces(self) -> list[str]:
        return [self.hub, *(self.node(i) for i in range(self.nodes))]

    def hub_address(self, index: int) -> str:
        """The hub's address on node ``index``'s link: where that node reaches the SuperLink."""
        return f"10.77.{index}.1"

    def __enter__(self) -> EdgeTopology:
        self.build()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def build(self) -> None:
        if not 0 < self.nodes <= 250:
            raise TopologyError(f"nodes={self.nodes}: choose 1..250")
        if os.geteuid() != 0:
            raise TopologyError("edge links need root: network namespaces and tc (run as root)")
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise TopologyError("edge links need iproute2's ip and tc (Debian: iproute2)")
        try:
            for namespace in self.namespaces:
                _ip("netns", "add", namespace)
                _ip("-n", namespace, "link", "set", "lo", "up")
            for i in range(self.nodes):
                self._link(i)
            self.shape(self.mbit)
        except TopologyError:
            self.close()
            raise

    def _link(self, index: int) -> None:
        hub_end, node_ns = f"n{index}", self.node(index)
        _ip("-n", self.hub, "link", "add", hub_end, "type", "veth", "peer", "name", "uplink")
        _ip("-n", self.hub, "link", "set", "uplink", "netns", node_ns)
        _ip("-n", self.hub, "addr", "add", f"{self.hub_address(index)}/30", "dev", hub_end)
        _ip("-n", node_ns, "addr", "add", f"10.77.{index}.2/30", "dev", "uplink")
        _ip("-n", self.hub, "link", "set", hub_end, "up")
        _ip("-n", node_ns, "link", "set", "uplink", "up")

    def _ends(self) -> Iterator[tuple[str, str]]:
        """(namespace, device) of every link end: the hub's (downlinks), the nodes' (uplinks)."""
        for i in range(self.nodes):
            yield self.hub, f"n{i}"
            yield self.node(i), "uplink"

    def shape(self, mbit: float) -> None:
        """Every link end to ``mbit`` Mbit/s (takes effect at once, also during a run)."""
        if not mbit > 0:
            raise TopologyError(f"mbit={mbit}: a link rate must be > 0")
        self.mbit = mbit
        for namespace, device in self._ends():
            _tc(
                "-n", namespace, "qdisc", "replace", "dev", device, "root", "tbf",
                "rate", f"{mbit}mbit", "burst", str(burst_bytes(mbit)), "latency", TBF_LATENCY,
            )  # fmt: skip

    def sent_bytes(self) -> dict[str, int]:
        """Bytes each link end has sent (``<namespace>/<device>``), from tc's statistics."""
        sent = {}
        for namespace, device in self._ends():
            stats = json.loads(_tc("-n", namespace, "-s", "-j", "qdisc", "show", "dev", device))
            sent[f"{namespace}/{device}"] = int(stats[0]["bytes"])
        return sent

    def remaining(self) -> list[str]:
        """This topology's namespaces that still exist."""
        return [n for n in self.namespaces if (NETNS_DIR / n).exists()]

    def close(self) -> None:
        """Kill every process in the namespaces, then delete them (which removes the links)."""
        for namespace in self.remaining():
            with contextlib.suppress(TopologyError):
                for pid in _ip("netns", "pids", namespace).split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
            with contextlib.suppress(TopologyError):
                _ip("netns", "delete", namespace)


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """The calling thread in network namespace ``namespace`` -- with the processes it starts
    -- and back in its own afterwards (``setns(2)``; Python 3.11 has no ``os.setns``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(NETNS_DIR / namespace, os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise TopologyError(f"setns({namespace}): {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise TopologyError(f"could not return to the own namespace: {ctypes.get_errno()}")
    finally:
        os.close(target)
        os.close(own)


class EdgeFederation:
    """A SuperLink in the hub of ``topology`` and one SuperNode (with its member worker) in
    each node namespace, all online when entered; everything stopped and removed on exit.
    Runs go through ``flwr run`` like any deployment (:meth:`run`)."""

    def __init__(self, topology: EdgeTopology, home: Path) -> None:
        self.topology = topology
        self.home = home
        self.harness = FlowerHarness(home)
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> EdgeFederation:
        with self._exit as stack:
            stack.enter_context(self.topology)
            stack.callback(self.harness.close)
            stack.enter_context(inside(self.topology.hub))
            self.harness.start_superlink(simulation=False, host="0.0.0.0")
            count = self.topology.nodes
            for i in range(count):
                self.harness.start_supernode(
                    i,
                    count,
                    worker_dir=self.home / "workers",
                    superlink=f"{self.topology.hub_address(i)}:{self.harness.api_port}",
                    netns=self.topology.node(i),
                )
            self.harness.wait_online(count)
            self._exit = stack.pop_all()
        return self

    def __exit__(self, *_: object) -> None:
        self._exit.close()

    def run(self, run_config: Mapping[str, ConfigValue], *, echo: bool = True) -> FlwrRun:
        """``flwr run`` of this project over the topology's links, with ``run_config``
        (``num-members`` is the topology's)."""
        overrides = {**run_config, "num-members": self.topology.nodes}
        return self.harness.run(overrides, echo=echo, timeout=MAX_TIMEOUT)


def unwind_on_sigterm() -> None:
    """Make SIGTERM end this process like Ctrl-C does, so that a topology in use is torn
    down on the way out (``kill``, a CI timeout). Later SIGTERMs are ignored: a second one
    (``timeout`` passing on what ``pkill`` sent it too) would cut the tear-down short and
    leave the namespaces and their processes behind."""

    def unwind(*_: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, unwind)


def time_table(results: RunResult) -> str:
    """Mean seconds per round in each part (:mod:`wash_fed.timing`), and bytes per round."""
    rounds, parts = results.rounds, results.mean_round_time()
    lines = [f"{'part':<10} {'s/round':>9}"]
    lines += [f"{part:<10} {getattr(parts, part):>9.2f}" for part in PARTS]
    per_round = sum(r.bytes_up + r.bytes_down for r in rounds) / max(len(rounds), 1)
    lines.append(
        f"{'round':<10} {results.mean_round_seconds():>9.2f}   ({per_round / 1e6:.3f} MB per round)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.namespaces",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--members", type=int, default=4, help="SuperNodes (one member each)")
    parser.add_argument("--mbit", type=float, default=10.0, help="each link's rate, each way")
    parser.add_argument("--run-config", default="", help="overrides: 'k=v ...'")
    args = parser.parse_args(argv)
    try:
        given = parse_config_args([args.run_config]) if args.run_config.strip() else {}
        config = {"output-dir": str(Path("runs").resolve()), **given}
        check_run_config(run_config_arg({**config, "num-members": args.members}))
    except (ConfigError, ValueError, click.ClickException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    home = Path(tempfile.mkdtemp(prefix="wash-fed-edge-"))
    try:
        with EdgeFederation(EdgeTopology(args.members, args.mbit), home) as federation:
            ended = federation.run(config)
    except TopologyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FlwrError as err:
        print(f"error: {err}; logs in {home}", file=sys.stderr)
        return 1
    results = results_file_in(ended.output)
    if results is not None and results.exists():
        print(f"\nover {args.mbit:g} Mbit/s links:\n{time_table(read_results(results))}")
    if not ended.completed:
        print(f"\nrun {ended.run_id}: {ended.status} ({ended.details}); logs in {home}")
        return 1
    shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    unwind_on_sigterm()
    sys.exit(main())
