"""A node host's link, emulated on this machine: the bridge of the network a node host's
containers sit on (all their traffic to the server host crosses it) shaped with ``tc``,
counted, and cut and restored on demand.

Download (towards the containers) is the bridge's own egress, shaped by a ``tbf`` at its
root and shared by the host's members; upload is each container's own ``eth0`` egress (in its
network namespace), shaped the same way: a redirect of the bridge's ingress through an
``ifb`` device, which would shape it as one, loses the packets on this kernel. ``netem`` is
not needed (and not in every kernel): the link has a rate and a queue, not an added delay.
Root only.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from deploy.engine import Engine
from deploy.namespaces import TBF_LATENCY, burst_bytes


class LinkError(RuntimeError):
    """A link could not be shaped, cut or read; the message has what ``tc``/``ip`` said."""


def _command(*args: str) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if done.returncode != 0:
        raise LinkError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def bridge_of(engine: Engine, network: str) -> tuple[str, str]:
    """The host interface of a network and its address there (the gateway), as podman's
    ``network inspect`` or Docker's (``br-<id>``) says."""
    (info,) = json.loads(engine.run("network", "inspect", network).stdout)
    if "network_interface" in info:  # podman
        return str(info["network_interface"]), str(info["subnets"][0]["gateway"])
    bridge = info.get("Options", {}).get("com.docker.network.bridge.name")
    return str(bridge or f"br-{info['Id'][:12]}"), str(info["IPAM"]["Config"][0]["Gateway"])


@dataclass
class HostLink:
    """The link of the node host whose containers sit on ``bridge``."""

    engine: Engine
    bridge: str

    def _in(self, container: str, *args: str) -> list[str]:
        """``args`` run in ``container``'s network namespace."""
        pid = self.engine.run("inspect", "-f", "{{.State.Pid}}", container).stdout.strip()
        return ["nsenter", "-t", pid, "-n", *args]

    @staticmethod
    def _tbf(rate: float) -> list[str]:
        return [
            "tbf",
            "rate",
            f"{rate}mbit",
            "burst",
            str(burst_bytes(rate)),
            "latency",
            TBF_LATENCY,
        ]

    def shape(self, mbit: float, containers: Sequence[str]) -> None:
        """Both directions of ``containers``' link to ``mbit`` Mbit/s, counters from zero
        (call it again after a container restarts: its namespace is a new one)."""
        self.close()
        _command("tc", "qdisc", "add", "dev", self.bridge, "root", *self._tbf(mbit))
        for container in containers:
            tc = self._in(container, "tc")
            subprocess.run([*tc, "qdisc", "del", "dev", "eth0", "root"], capture_output=True)
            _command(*tc, "qdisc", "add", "dev", "eth0", "root", *self._tbf(mbit))

    def sent(self, containers: Sequence[str]) -> tuple[int, int]:
        """Bytes (up, down) through the shapers: ``containers``' uplinks summed, the
        host's downlink."""
        up = sum(self._tbf_bytes(self._in(c, "tc")) for c in containers)
        return up, self._tbf_bytes(["tc"], self.bridge)

    @staticmethod
    def _tbf_bytes(tc: list[str], device: str = "eth0") -> int:
        stats = json.loads(_command(*tc, "-s", "-j", "qdisc", "show", "dev", device))
        return sum(int(q["bytes"]) for q in stats if q.get("kind") == "tbf")

    def ports(self) -> list[str]:
        """The host-side ends of the containers' links (the bridge's ports)."""
        listing = json.loads(_command("ip", "-j", "link", "show", "master", self.bridge))
        return [str(port["ifname"]) for port in listing]

    def cut(self) -> None:
        """Every container of the host loses its link (until :meth:`restore`)."""
        for port in self.ports():
            _command("ip", "link", "set", "dev", port, "down")

    def restore(self) -> None:
        for port in self.ports():
            _command("ip", "link", "set", "dev", port, "up")

    def close(self) -> None:
        """The host's downlink shaping removed (the uplinks go with their containers)."""
        subprocess.run(["tc", "qdisc", "del", "dev", self.bridge, "root"], capture_output=True)
