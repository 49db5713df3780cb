"""The container engine and the images a deployment runs: a Docker that runs, or podman
(installed and configured when root on Debian), each base image taken from the engine's store,
pulled, or built as a stand-in from Debian's packages (``deploy/standins/``) where no registry
answers, and the app image ``wash-fed:latest`` from the real ``Dockerfile``.

1. **An engine.** A running Docker (with ``docker compose`` or ``docker-compose``) is used
   as it is. Otherwise, as root on Debian, podman and Debian's docker-compose are installed,
   podman is configured to run here (runc; open-files and process limits within what this
   root may set) and its Docker-compatible API is served on a socket of its own, which
   compose talks to through ``DOCKER_HOST``.
2. **Base images.** Each image a role uses is taken from the engine's store or pulled.
   Where the registry cannot be reached, a stand-in is built under the real name from
   Debian's packages, with one log line saying so. Grafana has no stand-in: without its
   image the server host runs without it.
3. **The app image** ``wash-fed:latest`` from the real ``Dockerfile`` (layers cached by
   the engine; with podman, a local package mirror that pip is configured with here is
   lent to the build read-only).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from deploy.flwr_cli import BIN, PROJECT

DEPLOY = Path(__file__).resolve().parent
STANDINS = DEPLOY / "standins"
APP_IMAGE = "wash-fed:latest"
APP_LABEL = "io.wash-fed.image=app"
TEST_STACKS = "wash-fed-test"
"""What the names of the tests' compose projects and networks begin with (and nothing else's):
a killed test run's leftovers are found by it."""
"""The Dockerfile's label: earlier builds of the app image, untagged, are pruned by it."""
STANDIN_BASE = "localhost/wash-fed-standin/debian:bookworm"
STANDIN_OF = {
    "python:3.11-slim": "python",
    "nginx:1.27-alpine": "nginx",
    "prom/prometheus:v2.53.1": "prometheus",
    "prom/pushgateway:v1.9.0": "pushgateway",
}
"""The base images that have a Debian stand-in, and its folder in deploy/standins/."""
STANDIN_LABEL = "io.wash-fed.standin"
"""A stand-in's label: the version of its folder it was built from."""
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
# Written by wash-fed's container bring-up (deploy/engine.py): runc, because crun
# fails on hosts whose cgroups are in hybrid mode; container limits within what root may
# set here (it cannot raise the open-files hard limit above 20000).
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"

[network]
network_backend = "netavark"
"""


def log(message: str) -> None:
    print(f"[deploy] {message}", file=sys.stderr, flush=True)


class StackError(RuntimeError):
    """A deployment could not be brought up (or down); the message says what failed."""


def run_command(
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


def remove_named(cli: str, prefix: str) -> list[str]:
    """Every container, volume and network whose name begins with ``prefix`` removed by
    ``cli`` (``docker`` or ``podman``; containers first: they hold the others); their names."""
    removed = []
    for kind, field_name in (("container", "Names"), ("volume", "Name"), ("network", "Name")):
        every = ["-a"] if kind == "container" else []
        fmt = f"{{{{.{field_name}}}}}"
        listed = run_command([cli, kind, "ls", *every, "--format", fmt], check=False)
        found = [name for name in listed.stdout.split() if name.startswith(prefix)]
        if found:
            run_command([cli, kind, "rm", "-f", *found], check=False, timeout=300)
        removed += found
    return removed


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
        return run_command([self.cli, *args], env=self.env, **kwargs)

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


def apt_install(packages: Sequence[str]) -> None:
    missing = [p for p in packages if not _works(["dpkg", "-s", p])]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackError(f"missing packages {' '.join(missing)} (install them as root)")
    log(f"installing {' '.join(missing)} (Debian packages)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    run_command(["apt-get", *lock, "update", "-q"], env=env, timeout=900)
    run_command(
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
        cwd=sock.parent,  # conmon needs its working directory: not a checkout that may go
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
        apt_install(PODMAN_PACKAGES)
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


def dockerfile_base() -> str:
    for line in (PROJECT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            return line.split()[1]
    raise StackError("the Dockerfile has no FROM line")


def ensure_base_images(engine: Engine, images: Iterable[str] = ()) -> set[str]:
    """The Dockerfile's base and ``images``, present in the engine's store; returns those
    that are not to be had (no registry, no stand-in)."""
    unavailable = set()
    for image in sorted({dockerfile_base(), *images}):
        if engine.has_image(image):
            if image in STANDIN_OF and _standin_outdated(engine, image):
                log(f"{image}: its stand-in changed (deploy/standins/); building it again")
                _build_standin(engine, image)
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


def standin_version(image: str) -> str:
    """A digest of the stand-in's folder: a stand-in built from other files is rebuilt."""
    folder = STANDINS / STANDIN_OF[image]
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _standin_outdated(engine: Engine, image: str) -> bool:
    """Whether ``image`` is a stand-in built from other files than the folder's now (a real,
    pulled image has no stand-in label and is kept; so is a stand-in from before labels)."""
    template = f'{{{{index .Config.Labels "{STANDIN_LABEL}"}}}}'
    found = engine.run("image", "inspect", "--format", template, image, check=False).stdout
    built_from = found.strip().replace("<no value>", "")
    return built_from not in ("", standin_version(image))


def _build_standin(engine: Engine, image: str) -> None:
    if not engine.has_image(STANDIN_BASE):
        _import_debian_base(engine)
    label = f"--label={STANDIN_LABEL}={standin_version(image)}"
    with tempfile.TemporaryDirectory() as context:
        shutil.copytree(STANDINS / STANDIN_OF[image], context, dirs_exist_ok=True)
        shutil.copy(_host_ca_bundle(), Path(context) / "host-ca.crt")
        engine.run("build", "-q", label, "-t", image, context, timeout=900)


def _host_ca_bundle() -> Path:
    for candidate in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise StackError("no CA bundle on this machine (/etc/ssl/certs/ca-certificates.crt)")


def _import_debian_base(engine: Engine) -> None:
    """A minimal Debian bookworm made here with mmdebstrap, imported as the stand-ins' base."""
    apt_install(["mmdebstrap"])
    log(f"making {STANDIN_BASE} with mmdebstrap (about a minute)")
    with tempfile.TemporaryDirectory() as folder:
        rootfs = Path(folder) / "rootfs.tar"
        run_command(["mmdebstrap", "--variant=minbase", "bookworm", str(rootfs), *DEBIAN_MIRRORS])
        engine.run("import", str(rootfs), STANDIN_BASE, timeout=600)


def _pip_mirror() -> list[str]:
    """Podman build arguments that lend the build the local package mirror pip is
    configured with here, read-only: each find-links folder, and each ``file://`` index with
    the folder it sits in (its pages link to files beside it)."""
    pip = [str(BIN / "python"), "-m", "pip", "config", "list"]
    settings: dict[str, list[str]] = {}
    for line in run_command(pip, check=False).stdout.splitlines():
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
