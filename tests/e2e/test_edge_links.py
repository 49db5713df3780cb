"""Edge links: a real two-host deployment on one machine -- the SuperLink in a hub network
namespace, each SuperNode in its own, joined by tbf-shaped veth pairs -- runs WASH to the
end through the shaped links and leaves no namespace, link or process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.flwr_cli import results_file_in
from deploy.namespaces import EdgeFederation, EdgeTopology, TopologyError, main
from deploy.processes import TINY_RUN
from wash_fed.ledger import Ledger
from wash_fed.results import read_results

MBIT = 5


def root_links() -> set[str]:
    """The interfaces of the machine's own network namespace."""
    listing = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True)
    return {link["ifname"] for link in json.loads(listing.stdout)}


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (exists and is not a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_wash_runs_over_shaped_links_and_nothing_is_left(tmp_path: Path, short_tmp: Path) -> None:
    links_before = root_links()
    topology = EdgeTopology(nodes=2, mbit=MBIT)
    federation = EdgeFederation(topology, short_tmp)
    try:
        federation.__enter__()
    except TopologyError as err:
        if os.geteuid() != 0:
            pytest.skip(f"network namespaces need root: {err}")
        pytest.skip(f"this machine refuses network namespaces: {err}")
    try:
        # Two rounds (one exchange), then the final step without the messages it can skip.
        config = {
            **TINY_RUN,
            "num-server-rounds": 2,
            "test-on-server": True,
            "bn-recalibration": False,
            "output-dir": str(tmp_path / "runs"),
        }
        ended = federation.run(config, echo=False)
        sent = topology.sent_bytes()
        shaped = subprocess.run(
            ["tc", "-n", topology.node(0), "-s", "-j", "qdisc", "show", "dev", "uplink"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        started = federation.harness.descendants()
    finally:
        federation.__exit__(None, None, None)

    assert ended.completed, ended.output[-3000:]
    results = results_file_in(ended.output)
    assert results is not None
    assert read_results(results).status == "completed"
    # Every member's messages went through its shaped link: each end sent at least the
    # payload the ledger counts for that direction (plus HTTP and TCP framing).
    ledger = Ledger.read_csv(results.parent / "ledger.csv")
    for member in range(2):
        up = sum(e.bytes for e in ledger.entries if e.member == member and e.direction == "up")
        down = sum(e.bytes for e in ledger.entries if e.member == member and e.direction == "down")
        assert sent[f"{topology.node(member)}/uplink"] >= up > 0
        assert sent[f"{topology.hub}/n{member}"] >= down > 0
    (qdisc,) = json.loads(shaped)
    assert qdisc["kind"] == "tbf" and qdisc["options"]["rate"] == MBIT * 1_000_000 // 8
    assert qdisc["overlimits"] > 0, "the collected model should have had to wait for the link"
    assert started, "the run's processes should have been found"
    # Nothing is left: namespaces (and with them the links), processes, root interfaces.
    assert topology.remaining() == []
    assert federation.harness.descendants() == []
    assert not [pid for pid in started if alive(pid)]
    # Its links (``n<i>`` in the hub, ``uplink`` in each node) never reach the machine's
    # own namespace; other interfaces may come and go meanwhile (a container test beside it).
    own = {"uplink", *(f"n{i}" for i in range(topology.nodes))}
    assert not own & (root_links() - links_before)


def test_the_launcher_names_a_bad_configuration_before_building_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--members", "2", "--run-config", "shuffle-prob=1.5"]) == 2
    assert "shuffle-prob" in capsys.readouterr().err


def test_a_topology_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(TopologyError, match="need root"):
        EdgeTopology(nodes=1, mbit=10).build()


def test_a_second_sigterm_does_not_cut_the_tear_down_short(tmp_path: Path) -> None:
    """``timeout`` passes on a SIGTERM that ``pkill`` also sent its child: the child gets
    two, the second while it tears its topology down, and must finish tearing down."""
    done = tmp_path / "done"
    script = f"""
import os, signal, time
from deploy.namespaces import unwind_on_sigterm
unwind_on_sigterm()
try:
    print("ready", flush=True)
    time.sleep(60)
finally:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    open({str(done)!r}, "w").write("torn down")
"""
    project = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=project
    )
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    child.terminate()
    assert child.wait(timeout=60) == 128 + signal.SIGTERM
    assert done.read_text() == "torn down"
