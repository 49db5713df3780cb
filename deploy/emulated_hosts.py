"""A deployment across machines, emulated on this one with the roles' own commands
(docs/deployment.md): a server host (``python -m deploy.roles server --name <name>``) and
node hosts (``python -m deploy.roles node --superlink <name>:9093 ... --members i-j --of N``),
each node host a compose project of its own on a network of its own that shares nothing with
the server host's networks and reaches it only through the published Fleet port, by the name
its certificate carries, over a link shaped with ``tc`` (:mod:`deploy.links`). Each node
host's keys are made in a folder of its own and registered with ``deploy.roles register``.

The multi-host test and ``benchmarks/edge_time.py --deployment hosts`` run through it.
Everything it started (containers, networks, volumes, shaping) is removed when it closes,
whatever happened. Root on Linux only (networks, ``tc``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.engine import TEST_STACKS, Engine, StackError, ensure_engine
from deploy.flwr_cli import PROJECT
from deploy.links import HostLink, bridge_of
from deploy.nodes import service_name
from deploy.roles import node_file
from deploy.stack import CERTS, DEFAULT_FLEET_PORT, SERVER_FILE, Stack

SERVER_PROJECT = f"{TEST_STACKS}-hosts"
SERVER_NAME = "superlink.test"
"""The server host's public name, which node hosts reach it by (their ``--add-host``)."""


@dataclass(frozen=True)
class HostPlan:
    """One node host to emulate: its project and network ``name``, its members, the subnet
    of its network and its link's rate (Mbit/s, both ways)."""

    name: str
    members: range
    subnet: str
    mbit: float


TWO_HOSTS = (
    HostPlan(f"{TEST_STACKS}-host-a", range(0, 3), "10.251.1.0/24", 20.0),
    HostPlan(f"{TEST_STACKS}-host-b", range(3, 5), "10.251.2.0/24", 10.0),
)
"""Five members split 3 + 2, host B's link half as fast as host A's."""


@dataclass
class EmulatedHost:
    """One emulated node host: its plan, compose project and link."""

    plan: HostPlan
    stack: Stack
    link: HostLink

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def members(self) -> range:
        return self.plan.members

    def containers(self) -> list[str]:
        return [self.stack.container(service_name(m)) for m in self.members]

    def shape(self, mbit: float | None = None) -> None:
        """Its link at ``mbit`` (default: the plan's rate), counters from zero."""
        self.link.shape(self.plan.mbit if mbit is None else mbit, self.containers())


def roles(home: Path, *args: str) -> str:
    """``python -m deploy.roles args`` as the docs give it, with ``home`` as the Flower
    home; what it logged. StackError with the end of its log when it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "deploy.roles", *args],
        cwd=PROJECT,
        env={**os.environ, "FLWR_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise StackError(f"deploy.roles {args[0]} failed:\n{done.stderr[-4000:]}")
    return done.stderr


@dataclass(frozen=True)
class NodeJoin:
    """What ``deploy.roles node`` is given beyond its members: the server's name it uses,
    the CA file it trusts and the compose project it is (default: its network's name)."""

    name: str = SERVER_NAME
    ca: Path = CERTS / "ca.crt"
    project: str | None = None


def join(
    home: Path, engine: Engine, network: str, members: str, of: int, keys: Path, how: NodeJoin
) -> Stack:
    """``deploy.roles node`` for members ``members`` of ``of`` on the test's own network
    ``network`` (made before: compose's own networks are isolated from the server's, unlike
    two machines'), reaching the server host by ``how.name`` at the network's gateway."""
    project = how.project or network
    gateway = bridge_of(engine, network)[1]
    roles(
        home, "node", "--superlink", f"{how.name}:{DEFAULT_FLEET_PORT}", "--ca", str(how.ca),
        "--members", members, "--of", str(of), "--add-host", f"{how.name}:{gateway}",
        "--network", network, "--keys", str(keys), "--project", project,
    )  # fmt: skip
    return Stack(engine, project, [node_file(project)])


class EmulatedDeployment:
    """The server host and the planned node hosts, up and registered, every member online
    and every link shaped, from ``__enter__`` to ``close``. ``keys`` holds one folder of keys
    per node host; ``home`` is the Flower home of the server host's ``flwr`` connection."""

    def __init__(self, home: Path, keys: Path, plans: Sequence[HostPlan] = TWO_HOSTS) -> None:
        self.home = home
        self.keys = keys
        self.plans = list(plans)
        self.members = sum(len(plan.members) for plan in self.plans)
        self.engine = ensure_engine()
        self.server = Stack(self.engine, SERVER_PROJECT, [SERVER_FILE], home)
        self.hosts: list[EmulatedHost] = []

    def __enter__(self) -> EmulatedDeployment:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def start(self) -> None:
        roles(self.home, "server", "--name", SERVER_NAME, "--project", SERVER_PROJECT)
        for plan in self.plans:
            self.engine.run("network", "create", "--subnet", plan.subnet, plan.name)
            keys = self.keys / plan.name
            keys.mkdir(parents=True, exist_ok=True)
            members = f"{plan.members[0]}-{plan.members[-1]}"
            stack = join(self.home, self.engine, plan.name, members, self.members, keys, NodeJoin())
            link = HostLink(self.engine, bridge_of(self.engine, plan.name)[0])
            self.hosts.append(EmulatedHost(plan, stack, link))
            roles(self.home, "register", *(str(keys / f"node-{m}.key.pub") for m in plan.members))
        self.server.wait_online(self.members, timeout=180)
        self.shape()

    def shape(self, scale: float = 1.0) -> None:
        """Every host's link at ``scale`` times its planned rate, counters from zero."""
        for host in self.hosts:
            host.shape(scale * host.plan.mbit)

    def close(self) -> None:
        """Everything started removed: shaping, node hosts, the server host, the networks."""
        for host in self.hosts:
            host.link.close()
            host.stack.down()
            node_file(host.stack.project).unlink(missing_ok=True)
        self.server.down()
        for plan in self.plans:
            self.engine.run("network", "rm", "-f", plan.name, check=False)
