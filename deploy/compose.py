"""The compose deployment brought up for real on this machine: ``docker-compose.yml`` and the
real ``Dockerfile``, run by whatever container engine is here.

    python -m deploy.compose up      # make compose-up
    python -m deploy.compose down    # make compose-down (containers, networks, volumes)

``up`` does, in order, only what is missing:

1. **An engine.** A running Docker (with ``docker compose`` or ``docker-compose``) is used
   as it is. Otherwise, as root on Debian, podman and Debian's docker-compose are installed,
   podman is configured to run here (runc; open-files and process limits within what this
   root may set) and its Docker-compatible API is served on a socket of its own, which
   compose talks to through ``DOCKER_HOST``.
2. **Base images.** Each image the stack uses is taken from the engine's store or pulled.
   Where the registry cannot be reached, a stand-in is built under the real name from
   Debian's packages (``deploy/standins/``), with one log line saying so. Grafana has no
   stand-in: without its image the stack runs without it.
3. **The app image** ``wash-fed:latest`` from the real ``Dockerfile`` (layers cached by
   the engine; with podman, a local package mirror that pip is configured with here is
   lent to the build read-only).
4. **Certificates and keys** (``deploy/certs/``), made once and kept.
5. **The stack**: SuperLink, the two proxies, Prometheus, the Pushgateway (and Grafana
   where it can run); then every SuperNode's public key is registered through the control
   proxy and the SuperNodes start; ``up`` returns when they are online. GPU reservations
   (``deploy/docker-compose.gpu.yml``) are added when ``nvidia-smi`` lists a GPU.

The ``flwr`` connection ``wash-fed-compose`` (control proxy, the stack's CA) is written to
``$FLWR_HOME/config.toml``: ``flwr run . wash-fed-compose --stream`` then runs on the
stack.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from deploy.flwr_cli import BIN, PROJECT, FlowerCli, FlwrError

DEPLOY = Path(__file__).resolve().parent
COMPOSE_FILE = PROJECT / "docker-compose.yml"
GPU_FILE = DEPLOY / "docker-compose.gpu.yml"
CERTS = DEPLOY / "certs"
STANDINS = DEPLOY / "standins"
APP_IMAGE = "wash-fed:latest"
APP_LABEL = "io.wash-fed.image=app"
"""The Dockerfile's label: earlier builds of the app image, untagged, are pruned by it."""
CONNECTION = "wash-fed-compose"
CONTROL_ADDRESS = "127.0.0.1:9095"
PROMETHEUS_URL = "http://127.0.0.1:9090"
STANDIN_BASE = "localhost/wash-fed-standin/debian:bookworm"
STANDIN_OF = {
    "python:3.11-slim": "python",
    "nginx:1.27-alpine": "nginx",
    "prom/prometheus:v2.53.1": "prometheus",
    "prom/pushgateway:v1.9.0": "pushgateway",
}
"""The base images that have a Debian stand-in, and its folder in deploy/standins/."""
DEBIAN_MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
PODMAN_PACKAGES = [
    "podman", "runc", "conmon", "netavark", "aardvark-dns", "iptables", "uidmap", "catatonit",
    "slirp4netns", "fuse-overlayfs", "mmdebstrap", "docker-compose",
]  # fmt: skip
PODMAN_CONF = Path("/etc/containers/containers.conf")
PODMAN_SETTINGS = """\
# Written by wash-fed's compose bring-up (deploy/compose.py): runc, because crun
# fails on hosts whose cgroups are in hybrid mode; container limits within what root may
# set here (it cannot raise the open-files hard limit above 20000).
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"

[network]
network_backend = "netavark"
"""
SUPERNODES = [f"supernode-{i}" for i in range(4)]
CORE_SERVICES = ["superlink", "proxy", "control", "pushgateway", "prometheus"]


def log(message: str) -> None:
    print(f"[compose] {message}", file=sys.stderr, flush=True)


class StackError(RuntimeError):
    """The stack could not be brought up (or down); the message says what failed."""


def _run(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """``args`` run in the project's folder, output captured; StackError with the end of
    what it printed if it fails (unless ``check`` is false)."""
    done = subprocess.run(
        list(args),
        env=dict(env) if env is not None else None,
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        what = (done.stderr or done.stdout or "").strip()[-3000:]
        raise StackError(f"{' '.join(args[:4])} ... exited {done.returncode}: {what}")
    return done


# --- the engine -----------------------------------------------------------------------


@dataclass
class Engine:
    """A container engine and the compose that drives it."""

    cli: str
    """``docker`` or ``podman``: builds images, runs the test's own containers."""
    compose: list[str]
    """``docker compose`` or ``docker-compose``."""
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    """The environment for both (``DOCKER_HOST`` where compose talks to podman)."""
    service_pid: int | None = None
    """The podman API service this bring-up started (stopped by :func:`stop_service`)."""

    def run(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return _run([self.cli, *args], env=self.env, **kwargs)

    def has_image(self, name: str) -> bool:
        return self.run("image", "inspect", name, check=False).returncode == 0


def _works(args: Sequence[str]) -> bool:
    try:
        return subprocess.run(list(args), capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _compose() -> list[str]:
    if shutil.which("docker") and _works(["docker", "compose", "version"]):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise StackError("no compose: install Docker Compose, or Debian's docker-compose package")


def _apt_install(packages: Sequence[str]) -> None:
    missing = [p for p in packages if not _works(["dpkg", "-s", p])]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackError(f"missing packages {' '.join(missing)} (install them as root)")
    log(f"installing {' '.join(missing)} (Debian packages)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    _run(["apt-get", *lock, "update", "-q"], env=env, timeout=900)
    _run(
        ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *missing],
        env=env,
        timeout=1800,
    )


def podman_socket() -> Path:
    return Path(os.environ.get("XDG_RUNTIME_DIR", "/run")) / "wash-fed-podman" / "podman.sock"


def _serve_podman(env: dict[str, str]) -> int | None:
    """Podman's Docker-compatible API on :func:`podman_socket` (started unless it answers);
    the pid of the service started, if any."""
    sock = podman_socket()
    env["DOCKER_HOST"] = f"unix://{sock}"
    if _api_answers(sock):
        return None
    sock.parent.mkdir(parents=True, exist_ok=True)
    sock.unlink(missing_ok=True)
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        stdout=subprocess.DEVNULL,
        stderr=open(sock.parent / "service.log", "ab"),  # noqa: SIM115 - the child keeps it
        start_new_session=True,
    )
    (sock.parent / "service.pid").write_text(str(service.pid))
    deadline = time.monotonic() + 30
    while not _api_answers(sock):
        if service.poll() is not None or time.monotonic() > deadline:
            raise StackError(f"podman's API service did not start: {sock.parent}/service.log")
        time.sleep(0.2)
    return service.pid


def _api_answers(sock: Path) -> bool:
    if not sock.exists():
        return False
    try:
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, timeout=5) as client:
            return client.get("http://d/_ping").is_success
    except httpx.HTTPError:
        return False


def ensure_engine() -> Engine:
    """A Docker that runs, or podman (installed and configured when root on Debian)."""
    if shutil.which("docker") and _works(["docker", "info"]):
        return Engine("docker", _compose())
    if not shutil.which("podman") or not shutil.which("docker-compose"):
        _apt_install(PODMAN_PACKAGES)
    if not PODMAN_CONF.exists():
        log(f"configuring podman for this host: {PODMAN_CONF} (runc, container limits)")
        PODMAN_CONF.parent.mkdir(parents=True, exist_ok=True)
        PODMAN_CONF.write_text(PODMAN_SETTINGS)
    env = dict(os.environ)
    pid = _serve_podman(env)
    return Engine("podman", _compose(), env, pid)


def stop_service() -> None:
    """Stop the podman API service a bring-up started (if it is still running)."""
    pid_file = podman_socket().parent / "service.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(pid_file.read_text()), 15)
    pid_file.unlink(missing_ok=True)


# --- images ---------------------------------------------------------------------------


def compose_images() -> set[str]:
    """Every image the compose file names (the app image aside)."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return {s["image"] for s in services.values() if s.get("image", APP_IMAGE) != APP_IMAGE}


def dockerfile_base() -> str:
    for line in (PROJECT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            return line.split()[1]
    raise StackError("the Dockerfile has no FROM line")


def ensure_base_images(engine: Engine) -> set[str]:
    """The images the stack needs, present in the engine's store; returns those that are
    not to be had (no registry, no stand-in)."""
    unavailable = set()
    for image in sorted({dockerfile_base(), *compose_images()}):
        if engine.has_image(image):
            continue
        if engine.run("pull", "-q", image, check=False, timeout=300).returncode == 0:
            continue
        if image not in STANDIN_OF:
            log(f"{image}: not present, the registry cannot be reached and it has no stand-in")
            unavailable.add(image)
            continue
        log(f"{image}: the registry cannot be reached; building a stand-in from Debian packages")
        _build_standin(engine, image)
    return unavailable


def _build_standin(engine: Engine, image: str) -> None:
    if not engine.has_image(STANDIN_BASE):
        _import_debian_base(engine)
    with tempfile.TemporaryDirectory() as context:
        shutil.copytree(STANDINS / STANDIN_OF[image], context, dirs_exist_ok=True)
        shutil.copy(_host_ca_bundle(), Path(context) / "host-ca.crt")
        engine.run("build", "-q", "-t", image, context, timeout=900)


def _host_ca_bundle() -> Path:
    for candidate in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise StackError("no CA bundle on this machine (/etc/ssl/certs/ca-certificates.crt)")


def _import_debian_base(engine: Engine) -> None:
    """A minimal Debian bookworm made here with mmdebstrap, imported as the stand-ins' base."""
    _apt_install(["mmdebstrap"])
    log(f"making {STANDIN_BASE} with mmdebstrap (about a minute)")
    with tempfile.TemporaryDirectory() as folder:
        rootfs = Path(folder) / "rootfs.tar"
        _run(["mmdebstrap", "--variant=minbase", "bookworm", str(rootfs), *DEBIAN_MIRRORS])
        engine.run("import", str(rootfs), STANDIN_BASE, timeout=600)


def _pip_mirror() -> list[str]:
    """Podman build arguments that lend the build the local package mirror pip is
    configured with here, read-only: each find-links folder, and each ``file://`` index with
    the folder it sits in (its pages link to files beside it)."""
    pip = [str(BIN / "python"), "-m", "pip", "config", "list"]
    settings: dict[str, list[str]] = {}
    for line in _run(pip, check=False).stdout.splitlines():
        key, _, value = line.partition("=")
        settings[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"").split()
    links = [v for v in settings.get("find-links", []) if v.startswith("/")]
    indexes = [v for v in settings.get("extra-index-url", []) if v.startswith("file:///")]
    folders = [*links, *(str(Path(v.removeprefix("file://")).parent) for v in indexes)]
    args = [f"--volume={folder}:{folder}:ro" for folder in dict.fromkeys(folders)]
    if links:
        args.append(f"--build-arg=PIP_FIND_LINKS={' '.join(links)}")
    if indexes:
        args.append(f"--build-arg=PIP_EXTRA_INDEX_URL={' '.join(indexes)}")
    return args


def build_app_image(engine: Engine) -> float:
    """``wash-fed:latest`` from the Dockerfile; the seconds it took."""
    start = time.monotonic()
    extra = _pip_mirror() if engine.cli == "podman" else []
    if extra:
        log("lending the build this machine's local package mirror (read-only)")
    log(f"building {APP_IMAGE} from the Dockerfile (cached layers are reused)")
    engine.run("build", *extra, "-t", APP_IMAGE, str(PROJECT), timeout=3600)
    # The builds this one replaced, untagged now: only ours (the Dockerfile's label).
    engine.run("image", "prune", "--force", f"--filter=label={APP_LABEL}", check=False)
    seconds = time.monotonic() - start
    log(f"{APP_IMAGE} built in {seconds:.0f} s")
    return seconds


# --- certificates, compose, registration ------------------------------------------------


def ensure_certificates() -> None:
    if not (CERTS / "server.pem").exists():
        _apt_install(["openssl"])
        _run([str(CERTS / "generate.sh")])
    if not all((CERTS / "nodes" / f"node-{i}.key").exists() for i in range(len(SUPERNODES))):
        _apt_install(["openssh-client"])
        _run([str(CERTS / "node-keys.sh")])


def gpus_present() -> bool:
    return bool(shutil.which("nvidia-smi")) and _works(["nvidia-smi", "-L"])


class Stack(FlowerCli):
    """One compose project of ``docker-compose.yml`` on this machine, and the ``flwr`` CLI
    of its ``wash-fed-compose`` connection (``flwr_home``: the CLI's Flower home; default
    ``$FLWR_HOME`` or ``~/.flwr``)."""

    def __init__(
        self,
        engine: Engine,
        project: str = "wash-fed",
        flwr_home: Path | None = None,
        *,
        gpu: bool = False,
        without: Sequence[str] = (),
    ) -> None:
        super().__init__(flwr_home, CONNECTION)
        self.engine = engine
        self.project = project
        self.gpu = gpu
        self.without = set(without)
        """Services left out (their image is not to be had)."""

    def compose(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        files = ["-f", str(COMPOSE_FILE)] + (["-f", str(GPU_FILE)] if self.gpu else [])
        command = [*self.engine.compose, "-p", self.project, *files, *args]
        return _run(command, env=self.compose_env(), **kwargs)

    def compose_env(self) -> dict[str, str]:
        env = {**self.engine.env}
        if "GRAFANA_ADMIN_PASSWORD" not in env:
            env["GRAFANA_ADMIN_PASSWORD"] = _grafana_password()
        return env

    def describe(self) -> str:
        return self.logs("superlink", "control", *SUPERNODES)

    def up(self) -> None:
        """Everything but the SuperNodes, then their keys registered, then the SuperNodes."""
        started = time.monotonic()
        services = [s for s in [*CORE_SERVICES, "grafana"] if s not in self.without]
        log(f"starting {', '.join(services)}")
        self.compose("up", "-d", "--no-build", *services, timeout=600)
        self.write_connection(CONTROL_ADDRESS, CERTS / "ca.crt")
        log(f"flwr connection {CONNECTION!r} written to {self.home / 'config.toml'}")
        self.wait_for_control()
        for i in range(len(SUPERNODES)):
            self.register(CERTS / "nodes" / f"node-{i}.key.pub")
        log(f"starting {', '.join(SUPERNODES)}")
        self.compose("up", "-d", "--no-build", *SUPERNODES, timeout=600)
        self.wait_online(len(SUPERNODES), timeout=180)
        log(f"{len(SUPERNODES)} SuperNodes online; run: flwr run . {CONNECTION} --stream")
        log(f"stack up in {time.monotonic() - started:.0f} s")

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

    def logs(self, *services: str, lines: int = 20) -> str:
        """The last ``lines`` of each service's log, for an error message."""
        done = self.compose("logs", "--tail", str(lines), *services, check=False)
        return (done.stdout + done.stderr)[-4000:]

    def in_superlink(self, command: str) -> str:
        """What ``sh -c command`` prints in the SuperLink's container (where results are)."""
        return self.compose("exec", "-T", "superlink", "sh", "-c", command, timeout=120).stdout

    def fetch_run(self, output_dir: str, run_id: str, target: Path) -> Path:
        """The folder of run ``run_id`` under ``output_dir`` in the SuperLink's container,
        copied to ``target``."""
        (folder,) = self.in_superlink(f"ls -d {output_dir}/*-{run_id}").split()
        superlink = self.compose("ps", "-q", "superlink").stdout.strip()
        self.engine.run("cp", f"{superlink}:{folder}", str(target), timeout=300)
        return target

    def down(self) -> None:
        """Containers, networks and volumes of the project removed."""
        self.compose("down", "-v", "--remove-orphans", check=False, timeout=600)


def _grafana_password() -> str:
    """Grafana's admin password for a bring-up that was given none: made once, mode 600."""
    path = CERTS / "grafana-admin-password"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(18))
        path.chmod(0o600)
        log(f"Grafana's admin password (none was given): {path}")
    return path.read_text().strip()


@contextlib.contextmanager
def stack_up(project: str = "wash-fed", flwr_home: Path | None = None) -> Iterator[Stack]:
    """The whole bring-up (:func:`bring_up`), and the project taken down afterwards, or
    as soon as the bring-up fails."""
    stack = prepare(project, flwr_home)
    try:
        stack.up()
        yield stack
    finally:
        stack.down()
        if stack.engine.service_pid is not None:
            stop_service()


def bring_up(project: str = "wash-fed", flwr_home: Path | None = None) -> Stack:
    """Everything :mod:`deploy.compose` says, in order; the stack, up."""
    stack = prepare(project, flwr_home)
    stack.up()
    return stack


def prepare(project: str, flwr_home: Path | None) -> Stack:
    """The engine, base images, the app's image and certificates; no container started."""
    engine = ensure_engine()
    unavailable = ensure_base_images(engine)
    build_app_image(engine)
    ensure_certificates()
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    without = {name for name, s in services.items() if s.get("image") in unavailable}
    if without:
        log(f"left out (no image to be had): {', '.join(sorted(without))}")
    return Stack(engine, project, flwr_home, gpu=gpus_present(), without=sorted(without))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--project", default="wash-fed", help="the compose project name")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            bring_up(args.project)
        else:
            Stack(ensure_engine(), args.project).down()
            stop_service()
    except (StackError, FlwrError) as err:
        log(f"failed: {err}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
