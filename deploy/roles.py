"""wash-fed's deployment roles, one command each (docs/deployment.md):

    # on the server host: SuperLink + ServerApp, proxies, Prometheus, Pushgateway, Grafana
    python -m deploy.roles server --name superlink.example.org
    # on each node host: members i..j of N, one SuperNode each (one GPU each where there are GPUs)
    python -m deploy.roles node --superlink superlink.example.org:9093 --ca ca.crt \\
        --members 0-2 --of 5
    # on the server host, with the public keys each node host printed
    python -m deploy.roles register node-0.key.pub node-1.key.pub node-2.key.pub
    # everything on this machine (make compose-up): the same pieces, N members
    python -m deploy.roles all-in-one --members 4
    # on the server host: a run's folder (results, ledger, final model) out of the SuperLink
    python -m deploy.roles fetch <run id> [--to runs]
    # taken down (containers, networks, volumes)
    python -m deploy.roles down {server,node,all-in-one} [--project NAME]

Each role makes what it is missing first (:mod:`deploy.engine`: an engine, the images; the
server host's certificate for its names; a node host's private keys, which never leave it)
and prints what the other machines need: the server host its Fleet address and CA file, a
node host the public keys to register. A node host's SuperNodes keep trying to join until
their keys are registered.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from deploy.engine import (
    Engine,
    StackError,
    apt_install,
    build_app_image,
    ensure_base_images,
    ensure_engine,
    log,
    run_command,
    stop_service,
)
from deploy.flwr_cli import FlowerCli, FlwrError
from deploy.nodes import Members, NodeHost, gpu_assignment, service_name, visible_gpus
from deploy.stack import (
    CERTS,
    CONNECTION,
    DEFAULT_FLEET_PORT,
    HOSTS,
    SERVER_FILE,
    Stack,
    ensure_grafana_password,
    ensure_server_certificate,
    register_keys,
    server_images,
    start_server,
)

NODE_KEYS = CERTS / "nodes"
SERVER_PROJECT = "wash-fed"
NODE_PROJECT = "wash-fed-node"
RUNS_IN_SUPERLINK = "/app/runs"
"""Where runs write by default in the SuperLink's container (``output-dir`` "runs", from
the app's folder /app), on the ``runs`` volume."""


def node_file(project: str) -> Path:
    return HOSTS / f"{project}.yml"


def make_node_keys(members: Members, folder: Path = NODE_KEYS) -> list[Path]:
    """This host's key pairs for ``members`` (kept where they exist); the public keys."""
    apt_install(["openssh-client"])
    run_command([str(CERTS / "node-keys.sh"), str(folder), f"{members.first}-{members.last}"])
    return [folder / f"node-{m}.key.pub" for m in members.ids]


def prepare_server(names: Sequence[str]) -> tuple[Engine, list[str]]:
    """The engine, the server's images and the app image, its certificate for ``names``
    and Grafana's password file; the services left out (their image is not to be had)."""
    engine = ensure_engine()
    images = server_images()
    unavailable = ensure_base_images(engine, images.values())
    build_app_image(engine)
    ensure_server_certificate(names)
    ensure_grafana_password()
    without = sorted(service for service, image in images.items() if image in unavailable)
    if without:
        log(f"left out (no image to be had): {', '.join(without)}")
    return engine, without


def server_up(
    names: Sequence[str], project: str, fleet_port: int, flwr_home: Path | None = None
) -> Stack:
    """The server host, up; prints what node hosts need."""
    engine, without = prepare_server(names)
    env = {"WASH_FED_FLEET_PORT": str(fleet_port)}
    stack = Stack(engine, project, [SERVER_FILE], flwr_home, env, without)
    start_server(stack)
    address = f"{names[0].removeprefix('IP:') if names else '<this host>'}:{fleet_port}"
    log(f"server host up. Node hosts join with --superlink {address} --ca <{CERTS}/ca.crt>")
    log("register their public keys here: python -m deploy.roles register <node-i.key.pub>...")
    log(f"then run: flwr run . {CONNECTION} --stream")
    return stack


def node_up(host: NodeHost, project: str, command: str) -> Stack:
    """A node host's SuperNodes, up (its compose file written first); prints the public keys
    to register on the server host."""
    engine = ensure_engine()
    ensure_base_images(engine)
    build_app_image(engine)
    public = make_node_keys(host.members, host.keys)
    missing = host.missing_files()
    if missing:
        raise StackError(f"missing: {', '.join(map(str, missing))}")
    file = host.write(node_file(project), command)
    log(f"compose file for {host.members}: {file}")
    stack = Stack(engine, project, [file])
    stack.compose("up", "-d", "--no-build", timeout=600)
    keys = " ".join(map(str, public))
    log(f"{host.members} started; they join once the server host has run:")
    log(f"python -m deploy.roles register {keys}")
    return stack


def all_in_one(
    members: int, gpus: str = "auto", project: str = SERVER_PROJECT, flwr_home: Path | None = None
) -> tuple[Stack, NodeHost]:
    """The server host and a node host of every member on this machine, as one project,
    prepared (images, certificates, keys, the node file); nothing started yet."""
    if members < 1:
        raise ValueError(f"--members {members}: need at least one")
    engine, without = prepare_server([])
    host = _all_in_one_host(members, gpus)
    make_node_keys(host.members, host.keys)
    command = f"python -m deploy.roles all-in-one --members {members} --gpus {gpus}"
    file = host.write(node_file(project), command)
    return Stack(engine, project, [SERVER_FILE, file], flwr_home, without=without), host


def start_all_in_one(stack: Stack, host: NodeHost) -> None:
    """The server's services, the members' keys registered, then their SuperNodes; returns
    when every SuperNode is online."""
    start_server(stack)
    register_keys(stack, [host.key(m).with_suffix(".key.pub") for m in host.members.ids])
    nodes = [service_name(m) for m in host.members.ids]
    log(f"starting {', '.join(nodes)}")
    stack.compose("up", "-d", "--no-build", *nodes, timeout=600)
    stack.wait_online(len(nodes), timeout=180)
    run = f'flwr run . {CONNECTION} --stream --run-config "num-members={len(nodes)}"'
    log(f"{len(nodes)} SuperNodes online; run: {run}")


@contextlib.contextmanager
def all_in_one_running(
    members: int, project: str, flwr_home: Path | None = None
) -> Iterator[Stack]:
    """:func:`all_in_one`, started, and taken down afterwards (or as soon as it fails), its
    node file removed with it."""
    stack, host = all_in_one(members, "auto", project, flwr_home)
    try:
        start_all_in_one(stack, host)
        yield stack
    finally:
        stack.down()
        node_file(project).unlink(missing_ok=True)
        if stack.engine.service_pid is not None:
            stop_service()


def _all_in_one_host(members: int, gpus: str) -> NodeHost:
    span = Members(0, members - 1, members)
    return NodeHost(
        span,
        superlink=f"proxy:{DEFAULT_FLEET_PORT}",
        ca=CERTS / "ca.crt",
        keys=NODE_KEYS,
        gpus=gpu_assignment(gpus, span, visible_gpus()),
        fleet_network=True,
    )


def stack_of(role: str, project: str | None, flwr_home: Path | None = None) -> Stack:
    """The compose project a role brought up (for ``down`` and the tests)."""
    project = project or (NODE_PROJECT if role == "node" else SERVER_PROJECT)
    files = {
        "server": [SERVER_FILE],
        "node": [node_file(project)],
        "all-in-one": [SERVER_FILE, node_file(project)],
    }[role]
    return Stack(ensure_engine(), project, [f for f in files if f.exists()], flwr_home)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    server = roles.add_parser("server", help="the server host")
    server.add_argument(
        "--name", action="append", default=[], help="a name (or IP:a.b.c.d) node hosts use"
    )
    server.add_argument("--fleet-port", type=int, default=DEFAULT_FLEET_PORT)
    server.add_argument("--project", default=SERVER_PROJECT)
    node = roles.add_parser("node", help="a node host: members i..j of N")
    node.add_argument("--superlink", required=True, help="the Fleet API, host:port")
    node.add_argument("--ca", type=Path, required=True, help="the server host's ca.crt")
    node.add_argument("--members", required=True, help="this host's members: 3, or 0-2")
    node.add_argument("--of", type=int, required=True, help="the federation's member count")
    node.add_argument("--gpus", default="auto", help="auto (one visible GPU each), none, or 0,1,2")
    node.add_argument(
        "--add-host", action="append", default=[], help="name:address, for a name DNS lacks"
    )
    node.add_argument("--network", help="an existing network to join (default: the project's own)")
    node.add_argument("--keys", type=Path, default=NODE_KEYS, help="this host's key folder")
    node.add_argument("--project", default=NODE_PROJECT)
    register = roles.add_parser("register", help="admit node hosts' public keys")
    register.add_argument("keys", type=Path, nargs="+")
    one = roles.add_parser("all-in-one", help="everything on this machine")
    one.add_argument("--members", type=int, default=4)
    one.add_argument("--gpus", default="auto")
    fetch = roles.add_parser("fetch", help="copy a run's folder out of the SuperLink")
    fetch.add_argument("run_id")
    fetch.add_argument("--to", type=Path, default=Path("runs"), help="the folder to copy it into")
    fetch.add_argument("--output-dir", default=RUNS_IN_SUPERLINK, help="the run's output-dir")
    fetch.add_argument("--project", default=SERVER_PROJECT)
    down = roles.add_parser("down", help="a role's containers, networks and volumes removed")
    down.add_argument("which", choices=["server", "node", "all-in-one"])
    down.add_argument("--project")
    return parser


def run(args: argparse.Namespace, command: str) -> None:
    if args.role == "server":
        server_up(args.name, args.project, args.fleet_port)
    elif args.role == "node":
        members = Members.parse(args.members, args.of)
        host = NodeHost(
            members,
            args.superlink,
            args.ca,
            args.keys,
            gpu_assignment(args.gpus, members, visible_gpus()),
            tuple(args.add_host),
            args.network,
        )
        node_up(host, args.project, command)
    elif args.role == "register":
        register_keys(FlowerCli(None, CONNECTION), args.keys)
    elif args.role == "all-in-one":
        start_all_in_one(*all_in_one(args.members, args.gpus))
    elif args.role == "fetch":
        stack = stack_of("server", args.project)
        target = stack.fetch_run(args.output_dir, args.run_id, args.to)
        log(f"run {args.run_id}: {target} (results.json, ledger.csv, final_model.pt)")
    else:
        stack_of(args.which, args.project).down()
        stop_service()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        run(args, shlex.join(["python", "-m", "deploy.roles", *argv]))
    except (StackError, FlwrError, ValueError) as err:
        log(f"failed: {err}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
