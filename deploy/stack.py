"""A compose project on this machine (:class:`Stack`) and the server host's pieces: its
certificates made for the names node hosts reach it by, Grafana's password file, its services
started and the ``flwr`` connection ``wash-fed-compose`` (control proxy, the stack's CA)
written to ``$FLWR_HOME/config.toml``, so that ``flwr run . wash-fed-compose --stream`` runs
there. :mod:`deploy.roles` puts them together, one command per role.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509

from deploy.engine import DEPLOY, Engine, StackError, apt_install, log, run_command
from deploy.flwr_cli import PROJECT, FlowerCli

SERVER_FILE = PROJECT / "docker-compose.yml"
"""The server host's services (the SuperNodes are node hosts', :mod:`deploy.nodes`)."""
HOSTS = DEPLOY / "hosts"
"""Where the node hosts' compose files are written (``<project>.yml``; kept out of git)."""
CERTS = DEPLOY / "certs"
GRAFANA_PASSWORD = CERTS / "grafana-admin-password"
GRAFANA_UID = 472
"""The Grafana image's user, who reads the password file (mode 600)."""
CONNECTION = "wash-fed-compose"
CONTROL_ADDRESS = "127.0.0.1:9095"
PROMETHEUS_URL = "http://127.0.0.1:9090"
DEFAULT_FLEET_PORT = 9093
SERVER_SERVICES = ["superlink", "proxy", "control", "pushgateway", "prometheus", "grafana"]


class Stack(FlowerCli):
    """One compose project of ``files`` on this machine, and the ``flwr`` CLI of its
    ``wash-fed-compose`` connection (``flwr_home``: the CLI's Flower home; default
    ``$FLWR_HOME`` or ``~/.flwr``)."""

    def __init__(
        self,
        engine: Engine,
        project: str,
        files: Sequence[Path],
        flwr_home: Path | None = None,
        env: dict[str, str] | None = None,
        without: Sequence[str] = (),
    ) -> None:
        super().__init__(flwr_home, CONNECTION)
        self.engine = engine
        self.project = project
        self.files = list(files)
        self.compose_env = {**engine.env, **(env or {})}
        """The environment compose interpolates the files with (e.g. the Fleet port)."""
        self.without = list(without)
        """Services left out (their image is not to be had)."""

    def compose(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        files = [arg for path in self.files for arg in ("-f", str(path))]
        command = [*self.engine.compose, "-p", self.project, *files, *args]
        return run_command(command, env=self.compose_env, **kwargs)

    def services(self) -> list[str]:
        """Every service the files define."""
        return self.compose("config", "--services").stdout.split()

    def describe(self) -> str:
        return self.logs(*self.services())

    def logs(self, *services: str, lines: int = 20) -> str:
        """The last ``lines`` of each service's log, for an error message."""
        done = self.compose("logs", "--tail", str(lines), *services, check=False)
        return (done.stdout + done.stderr)[-4000:]

    def container(self, service: str) -> str:
        """The id of ``service``'s container."""
        return self.compose("ps", "-q", service).stdout.strip()

    def in_superlink(self, command: str) -> str:
        """What ``sh -c command`` prints in the SuperLink's container (where results are)."""
        return self.compose("exec", "-T", "superlink", "sh", "-c", command, timeout=120).stdout

    def fetch_run(self, output_dir: str, run_id: str, target: Path) -> Path:
        """The folder of run ``run_id`` under ``output_dir`` in the SuperLink's container,
        copied to ``target`` (into it, under its own name, where ``target`` is a folder)."""
        found = self.in_superlink(f"ls -d {output_dir}/*-{run_id} 2>/dev/null || true").split()
        if len(found) != 1:
            raise StackError(f"no run {run_id} under {output_dir} in the SuperLink's container")
        if target.is_dir():
            target = target / Path(found[0]).name
        self.engine.run("cp", f"{self.container('superlink')}:{found[0]}", str(target), timeout=300)
        return target

    def wait_for_round(self, runs: str, rounds_done: int, timeout: float) -> None:
        """Until a run in progress under ``runs`` (in the SuperLink's container) has
        ``rounds_done`` rounds in its results.json."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for folder in self.in_superlink(f"ls -d {runs}/*/ 2>/dev/null || true").split():
                with contextlib.suppress(json.JSONDecodeError, StackError):
                    results = json.loads(self.in_superlink(f"cat {folder}results.json"))
                    if results["status"] == "running" and len(results["rounds"]) >= rounds_done:
                        return
            time.sleep(2)
        raise StackError(f"no run reached round {rounds_done} within {timeout:g} s")

    def wait_for_control(self, timeout: float = 120) -> None:
        """Until the SuperLink answers through the control proxy (Flower's CLI answers
        ``success: false`` while the proxy gets no SuperLink)."""
        deadline = time.monotonic() + timeout
        while not self.answers():
            if time.monotonic() > deadline:
                raise StackError(
                    "the SuperLink did not answer through the control proxy:\n"
                    + self.logs("superlink", "control")
                )
            time.sleep(2)

    def down(self) -> None:
        """Containers, networks and volumes of the project removed."""
        self.compose("down", "-v", "--remove-orphans", check=False, timeout=600)


def server_names(certificate: Path) -> set[str]:
    """The DNS names and addresses (``IP:a.b.c.d``) a certificate is valid for."""
    names = x509.load_pem_x509_certificate(certificate.read_bytes()).extensions
    san = names.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    return dns | {f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)}


def ensure_server_certificate(names: Sequence[str] = ()) -> None:
    """The CA and a SuperLink certificate valid for ``names`` too (host names, or addresses
    written ``IP:a.b.c.d``). A certificate that lacks one of them is made again from the
    same CA, so node hosts keep the CA file they have."""
    certificate = CERTS / "server.pem"
    if certificate.exists() and set(names) <= server_names(certificate):
        return
    apt_install(["openssl"])
    run_command([str(CERTS / "generate.sh"), str(CERTS), *names])
    log(f"SuperLink certificate made for {', '.join(sorted(server_names(certificate)))}")


def ensure_grafana_password() -> Path:
    """Grafana's admin password file, made once (mode 600, readable by Grafana's user): the
    compose file mounts it, so plain compose commands need nothing in the environment."""
    if not GRAFANA_PASSWORD.exists():
        GRAFANA_PASSWORD.write_text(secrets.token_urlsafe(18))
        GRAFANA_PASSWORD.chmod(0o600)
        log(f"Grafana's admin password: {GRAFANA_PASSWORD}")
    if os.geteuid() == 0:
        os.chown(GRAFANA_PASSWORD, GRAFANA_UID, -1)
    return GRAFANA_PASSWORD


def server_images() -> dict[str, str]:
    """The base image of each of the server host's services (the app's aside)."""
    services = yaml.safe_load(SERVER_FILE.read_text())["services"]
    return {name: s["image"] for name, s in services.items() if "build" not in s}


def start_server(stack: Stack) -> None:
    """The server host's services (those the stack is without left out), then the ``flwr``
    connection, then until the SuperLink answers through the control proxy."""
    services = [s for s in SERVER_SERVICES if s not in stack.without]
    log(f"starting {', '.join(services)}")
    stack.compose("up", "-d", "--no-build", *services, timeout=600)
    stack.write_connection(CONTROL_ADDRESS, CERTS / "ca.crt")
    log(f"flwr connection {CONNECTION!r} written to {stack.home / 'config.toml'}")
    stack.wait_for_control()


def register_keys(cli: FlowerCli, public_keys: Sequence[Path]) -> None:
    """Each public key registered with the SuperLink (its SuperNode may then join)."""
    for key in public_keys:
        if not key.is_file():
            raise StackError(f"{key}: no such public key file")
        cli.register(key)
        log(f"registered {key}")
