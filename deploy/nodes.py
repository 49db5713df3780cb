"""A node host's compose file: one SuperNode (with its member worker) for each of members
``i..j`` of ``N``, each pinned to one GPU where the host has GPUs, joining a SuperLink given
by address and CA file. Compose has no loops, so the file is written out, one service per
member, for the user to read and keep (``python -m deploy.roles node`` writes it).

Each service mounts only its own private key (``node-<i>.key``, made on this host), the CA
file and the data; its member's checkpoints live on a volume of its own, so a SuperNode (or
the whole host) restarted mid-run resumes its member.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploy.engine import APP_IMAGE, log

MEMBER_VOLUME_PATH = "/var/lib/wash-fed"
"""Where a SuperNode's member worker keeps its folder (``worker-dir``) and checkpoints."""
DATA = "${WASH_FED_DATA:-~/.cache/wash-fed/data}:/data:ro"
"""The data folder (``make data``), mounted read-only; compose fills the path in."""


def service_name(member: int) -> str:
    return f"supernode-{member}"


@dataclass(frozen=True)
class Members:
    """Members ``first..last`` (both included) of a federation of ``of`` members."""

    first: int
    last: int
    of: int

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last < self.of:
            raise ValueError(
                f"members {self.first}-{self.last} of {self.of}: need 0 <= first <= last < of"
            )

    @classmethod
    def parse(cls, spec: str, of: int) -> Members:
        """``"2"`` (one member) or ``"0-2"`` (a range, both ends included) of ``of``."""
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", spec.strip())
        if match is None:
            raise ValueError(f"members {spec!r}: write one member (3) or a range (0-2)")
        first = int(match[1])
        return cls(first, int(match[2] or first), of)

    @property
    def ids(self) -> range:
        return range(self.first, self.last + 1)

    def __str__(self) -> str:
        return f"members {self.first}-{self.last} of {self.of}"


def visible_gpus() -> list[str]:
    """The indices ``nvidia-smi`` lists on this host (none without a driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    return done.stdout.split() if done.returncode == 0 else []


def gpu_assignment(spec: str, members: Members, visible: Sequence[str]) -> list[str] | None:
    """One GPU device id per member (in member order), or ``None`` for the CPU.

    ``spec``: ``"none"`` (the CPU), ``"auto"`` (the ``visible`` GPUs, one per member; where
    there are fewer GPUs than members they are shared in turn, and a log line says so; the
    CPU where there are none) or device ids ``"0,1,2"``, exactly one per member.
    """
    count = len(members.ids)
    if spec == "none":
        return None
    if spec == "auto":
        if not visible:
            return None
        if len(visible) < count:
            log(f"{count} members share {len(visible)} GPUs ({members})")
        return [visible[i % len(visible)] for i in range(count)]
    ids = [part.strip() for part in spec.split(",")]
    if len(ids) != count or not all(ids):
        raise ValueError(f"--gpus {spec!r}: give one device id per member ({count} for {members})")
    return ids


@dataclass(frozen=True)
class NodeHost:
    """What a node host runs: its members' SuperNodes, joining ``superlink``."""

    members: Members
    superlink: str
    """The Fleet API's ``host:port`` as this host reaches it; the SuperLink's certificate
    must name ``host``."""
    ca: Path
    """The server host's CA certificate (``deploy/certs/ca.crt`` there)."""
    keys: Path
    """The folder of this host's private keys, ``node-<i>.key`` for each member."""
    gpus: list[str] | None = None
    """One device id per member (:func:`gpu_assignment`), or ``None``: the CPU."""
    extra_hosts: tuple[str, ...] = ()
    """``name:address`` lines for names this host's DNS does not know."""
    network: str | None = None
    """An existing network for the SuperNodes (one the engine does not isolate, or one
    with the host's own routing) instead of the compose project's own."""
    fleet_network: bool = False
    """On the server host's own ``fleet`` network (the all-in-one) instead of a network of
    its own."""

    def __post_init__(self) -> None:
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--superlink {self.superlink!r}: give the Fleet API as host:port")
        if self.gpus is not None and len(self.gpus) != len(self.members.ids):
            raise ValueError(f"{len(self.gpus)} GPUs for {self.members}: need one per member")

    def key(self, member: int) -> Path:
        return self.keys / f"node-{member}.key"

    def missing_files(self) -> list[Path]:
        """The CA file and private keys this host needs and does not have."""
        needed = [self.ca, *(self.key(m) for m in self.members.ids)]
        return [path for path in needed if not path.is_file()]

    def service(self, member: int, index: int) -> dict[str, Any]:
        node_config = (
            f"partition-id={member} num-partitions={self.members.of} "
            f"worker-dir='{MEMBER_VOLUME_PATH}/member'"
        )
        service: dict[str, Any] = {
            "image": APP_IMAGE,
            "restart": "unless-stopped",
            "init": True,
            # NODE_DATA (optional) gives the node its own data instead of its partition of
            # /data (docs/deployment.md); $$ leaves it to the container's shell.
            "command": [
                "sh",
                "-c",
                "exec flower-supernode --root-certificates=/certs/ca.crt"
                " --auth-supernode-private-key=/certs/node.key"
                f" --superlink={self.superlink} --host=0.0.0.0 --port=9094"
                f' --node-config="{node_config} $${{NODE_DATA:-}}"',
            ],
            "volumes": [
                DATA,
                f"{self.ca.resolve()}:/certs/ca.crt:ro",
                f"{self.key(member).resolve()}:/certs/node.key:ro",
                f"member-{member}:{MEMBER_VOLUME_PATH}",
            ],
        }
        if self.extra_hosts:
            service["extra_hosts"] = list(self.extra_hosts)
        if self.gpus is not None:
            device = {"driver": "nvidia", "device_ids": [self.gpus[index]], "capabilities": ["gpu"]}
            service["deploy"] = {"resources": {"reservations": {"devices": [device]}}}
        if self.fleet_network:
            service["networks"] = ["fleet"]
        return service

    def compose(self) -> dict[str, Any]:
        """The compose file's content."""
        services = {service_name(m): self.service(m, i) for i, m in enumerate(self.members.ids)}
        config: dict[str, Any] = {
            "services": services,
            "volumes": {f"member-{m}": {} for m in self.members.ids},
        }
        if self.network is not None:
            config["networks"] = {"default": {"external": True, "name": self.network}}
        return config

    def write(self, path: Path, command: str) -> Path:
        """The compose file at ``path``, headed by what it is and the command that wrote it."""
        devices = "the CPU" if self.gpus is None else f"GPUs {', '.join(self.gpus)}"
        header = (
            f"# wash-fed node host: {self.members}, joining {self.superlink}, on {devices}.\n"
            f"# Written by: {command}\n"
            "# Keep it, or write it again with that command (docs/deployment.md).\n"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + yaml.safe_dump(self.compose(), sort_keys=False, width=120))
        return path
