"""The deployment files, checked by real tools: a compose implementation (Debian's
docker-compose, or compose v2 where present), Prometheus's promtool, openssl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.cli.supernode.register import try_load_public_key

from deploy.flwr_cli import FLOWER_SETTINGS, PROJECT
from deploy.nodes import Members, NodeHost, gpu_assignment
from deploy.proxy import render_proxy_config
from deploy.stack import CERTS, server_names

ROOT = PROJECT
MEMBERS = 5
"""The all-in-one below has five members: nothing fixes the count at four."""
SUPERNODES = [f"supernode-{i}" for i in range(MEMBERS)]
SERVER = {"superlink", "proxy", "control", "prometheus", "grafana", "pushgateway"}
SERVICES = SERVER | set(SUPERNODES)


def compose_command() -> list[str]:
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail(
        "no compose implementation (Debian: apt-get install docker-compose; make test does)"
    )


def compose_config(*files: str | Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    args = [*compose_command()]
    for f in files:
        args += ["-f", str(f)]
    done = subprocess.run(
        [*args, "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def all_in_one_file(folder: Path, gpus: list[str] | None = None) -> Path:
    """The node file ``make compose-up MEMBERS=5`` writes beside the server's (what
    ``deploy.roles all-in-one`` writes: every member on the fleet network)."""
    host = NodeHost(
        Members(0, MEMBERS - 1, MEMBERS),
        "proxy:9093",
        CERTS / "ca.crt",
        CERTS / "nodes",
        gpus,
        fleet_network=True,
    )
    return host.write(folder / "all-in-one.yml", "test")


def all_in_one(folder: Path, gpus: list[str] | None = None) -> dict[str, Any]:
    services: dict[str, Any] = compose_config("docker-compose.yml", all_in_one_file(folder, gpus))[
        "services"
    ]
    return services


def test_the_server_file_is_the_server_host_alone(tmp_path: Path) -> None:
    assert set(compose_config("docker-compose.yml")["services"]) == SERVER
    services = all_in_one(tmp_path)
    assert set(services) == SERVICES
    partitions = []
    for name in SUPERNODES:
        command = " ".join(services[name]["command"])
        assert "--superlink=proxy:9093" in command and "--host=0.0.0.0" in command
        assert f"num-partitions={MEMBERS}" in command and "worker-dir=" in command
        partitions.append(int(command.split("partition-id=")[1].split()[0]))
        assert "deploy" not in services[name]  # no GPU asked for: runs anywhere
    assert partitions == list(range(MEMBERS))


def test_each_member_is_pinned_to_its_own_gpu_and_nothing_else(tmp_path: Path) -> None:
    gpus = gpu_assignment("auto", Members(0, MEMBERS - 1, MEMBERS), ["0", "1", "2", "3", "4"])
    services = all_in_one(tmp_path, gpus)
    pinned = {}
    for name, service in services.items():
        if name not in SUPERNODES:
            assert "deploy" not in service, name  # the ServerApp needs no GPU
            continue
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        pinned[name] = device["device_ids"]
    assert pinned == {name: [str(i)] for i, name in enumerate(SUPERNODES)}


def test_gpus_are_assigned_one_per_member_or_said_why_not() -> None:
    members = Members.parse("2-4", of=5)
    assert list(members.ids) == [2, 3, 4]
    assert gpu_assignment("auto", members, []) is None  # no GPU: the CPU
    assert gpu_assignment("none", members, ["0", "1", "2"]) is None
    assert gpu_assignment("auto", members, ["0", "1"]) == ["0", "1", "0"]  # shared, and logged
    assert gpu_assignment("5,6,7", members, []) == ["5", "6", "7"]
    with pytest.raises(ValueError, match="one device id per member"):
        gpu_assignment("0,1", members, [])
    for spec, of in (("3-1", 5), ("0-5", 5), ("a", 5), ("-1", 5)):
        with pytest.raises(ValueError, match="members"):
            Members.parse(spec, of)


def test_a_node_host_file_joins_by_address_on_a_network_of_its_own(tmp_path: Path) -> None:
    ca, keys = tmp_path / "ca.crt", tmp_path / "keys"
    host = NodeHost(
        Members.parse("3-4", of=5),
        "superlink.example.org:9093",
        ca,
        keys,
        ["1", "0"],
        extra_hosts=("superlink.example.org:10.251.0.1",),
        network="wash-fed-node",
    )
    assert host.missing_files() == [ca, keys / "node-3.key", keys / "node-4.key"]
    config = compose_config(host.write(tmp_path / "node.yml", "python -m deploy.roles node ..."))
    assert set(config["services"]) == {"supernode-3", "supernode-4"}
    for member, gpu in ((3, "1"), (4, "0")):
        service = config["services"][f"supernode-{member}"]
        command = " ".join(service["command"])
        assert "--superlink=superlink.example.org:9093" in command
        assert f"partition-id={member} num-partitions=5" in command
        assert mounts(service)["/certs/ca.crt"] == str(ca)
        assert mounts(service)["/certs/node.key"] == str(keys / f"node-{member}.key")
        assert "networks" not in service or set(service["networks"]) == {"default"}
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [gpu]
        assert "superlink.example.org:10.251.0.1" in str(service["extra_hosts"])
    assert config["networks"]["default"]["name"] == "wash-fed-node"
    for bad in ("superlink.example.org", "host:port"):
        with pytest.raises(ValueError, match="host:port"):
            NodeHost(Members(0, 0, 1), bad, ca, keys)


def published(service: dict[str, Any]) -> set[tuple[str, int]]:
    """(host address, host port) of each port a service publishes, in either of the forms
    compose writes them ("127.0.0.1:9095:9095/tcp" or a mapping)."""
    found = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.add((port.get("host_ip", "0.0.0.0"), int(port["published"])))
        else:
            parts = str(port).split("/")[0].split(":")
            host = parts[0] if len(parts) == 3 else "0.0.0.0"
            found.add((host, int(parts[-2])))
    return found


def test_only_the_fleet_api_is_published_beyond_the_host(tmp_path: Path) -> None:
    services = all_in_one(tmp_path)
    beyond_host = {
        (name, port)
        for name, service in services.items()
        for host, port in published(service)
        if host != "127.0.0.1"
    }
    assert beyond_host == {("proxy", 9093)}
    assert published(services["proxy"]) == {("0.0.0.0", 9093)}
    assert published(services["control"]) == {("127.0.0.1", 9095)}
    for name in ("superlink", "pushgateway", *SUPERNODES):  # metrics, Control, Runtime APIs
        assert published(services[name]) == set(), name
    template = (ROOT / "deploy/nginx/superlink.conf.template").read_text()
    listens = {
        name: (
            services[name]["environment"]["FLEET_LISTEN"],
            services[name]["environment"]["CONTROL_LISTEN"],
        )
        for name in ("proxy", "control")
    }  # each proxy keeps the listener it does not serve on its own loopback
    assert listens == {"proxy": ("9093", "127.0.0.1:9095"), "control": ("127.0.0.1:9093", "9095")}
    assert (
        template.count("location /v1/") == 2 and "/v1/runtime" not in template.split("\n\n", 1)[1]
    )
    assert "location /v1/fleet/" in template and "location /v1/control/" in template


def test_supernodes_share_a_network_with_the_fleet_proxy_alone(tmp_path: Path) -> None:
    services = all_in_one(tmp_path)
    on = {name: set(service["networks"]) for name, service in services.items()}
    assert all(on[n] == {"fleet"} for n in SUPERNODES)
    assert on["proxy"] == {"fleet", "control"} and on["control"] == {"control"}
    assert all("fleet" not in on[n] for n in SERVICES - {"proxy", *SUPERNODES})


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of each bind mount."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found[volume["target"]] = str(volume.get("source", ""))
        else:
            source, target = str(volume).split(":")[:2]
            found[target] = source
    return found


def test_every_private_key_is_mounted_only_where_it_is_used(tmp_path: Path) -> None:
    services = all_in_one(tmp_path)
    certs = ROOT / "deploy/certs"
    keys = {
        name: {s for s in mounts(service).values() if s.endswith(".key")}
        for name, service in services.items()
    }
    server_key = str(certs / "server.key")
    assert {n for n, found in keys.items() if server_key in found} == {
        "superlink",
        "proxy",
        "control",
    }
    for i, name in enumerate(SUPERNODES):
        assert keys[name] == {str(certs / "nodes" / f"node-{i}.key")}
        assert "--auth-supernode-private-key=/certs/node.key" in " ".join(services[name]["command"])
    assert not any(str(certs / "ca.key") in found for found in keys.values())
    assert not any(  # no service gets the whole folder
        source.rstrip("/") == str(certs) for s in services.values() for source in mounts(s).values()
    )


def test_the_superlink_admits_registered_supernodes_over_tls_only(tmp_path: Path) -> None:
    services = all_in_one(tmp_path)
    superlink = " ".join(services["superlink"]["command"])
    assert (
        "--enable-supernode-auth" in superlink and "--ssl-certfile=/certs/server.pem" in superlink
    )
    assert all(
        "--root-certificates=/certs/ca.crt" in " ".join(services[n]["command"]) for n in SUPERNODES
    )
    assert not any("--insecure" in " ".join(s.get("command", [])) for s in services.values())


def test_grafana_asks_for_a_login_with_the_password_in_its_file() -> None:
    # compose_config ran with nothing in the environment: plain compose commands work
    grafana = compose_config("docker-compose.yml")["services"]["grafana"]
    secret = "/run/secrets/grafana-admin-password"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == secret
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert mounts(grafana)[secret] == str(CERTS / "grafana-admin-password")


def test_prometheus_config_is_valid_and_scrapes_the_serverapp() -> None:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing (Debian package prometheus; make test installs it)")
    path = ROOT / "deploy/prometheus/prometheus.yml"
    done = subprocess.run(
        ["promtool", "check", "config", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    targets = [
        t
        for job in yaml.safe_load(path.read_text())["scrape_configs"]
        for s in job["static_configs"]
        for t in s["targets"]
    ]
    assert "superlink:9400" in targets and "pushgateway:9091" in targets


def test_grafana_datasource_and_dashboard_agree() -> None:
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (ds,) = datasource["datasources"]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/wash-fed.json").read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    assert any("per round" in t for t in titles) and any("cumulative" in t for t in titles)
    assert any("accuracy" in t.lower() for t in titles) and any("duration" in t for t in titles)
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"]
        assert all(t["datasource"]["uid"] == ds["uid"] and t["expr"] for t in panel["targets"])
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/wash-fed.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_certificate_script_makes_a_chain_that_verifies(tmp_path: Path) -> None:
    subprocess.run(
        [
            "bash",
            str(ROOT / "deploy/certs/generate.sh"),
            str(tmp_path),
            "node.example",
            "IP:10.1.2.3",
        ],
        check=True,
        capture_output=True,
    )
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "server.pem")],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    san = subprocess.run(
        [
            "openssl",
            "x509",
            "-in",
            str(tmp_path / "server.pem"),
            "-noout",
            "-ext",
            "subjectAltName",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in (
        "DNS:superlink",
        "DNS:proxy",
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "DNS:node.example",
        "IP Address:10.1.2.3",
    ):
        assert name in san
    for key in ("ca.key", "server.key"):
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o600, key
    # made again for another name: the CA is kept, so node hosts keep the CA file they have
    ca = (tmp_path / "ca.crt").read_bytes()
    subprocess.run(
        ["bash", str(ROOT / "deploy/certs/generate.sh"), str(tmp_path), "other.example"],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert "other.example" in server_names(tmp_path / "server.pem")
    assert "node.example" not in server_names(tmp_path / "server.pem")


def test_node_keys_are_private_registrable_and_kept(tmp_path: Path) -> None:
    script = ROOT / "deploy/certs/node-keys.sh"
    subprocess.run(["bash", str(script), str(tmp_path), "2"], check=True, capture_output=True)
    first = (tmp_path / "node-0.key").read_bytes()
    for i in range(2):
        assert (tmp_path / f"node-{i}.key").stat().st_mode & 0o777 == 0o600
        try_load_public_key(tmp_path / f"node-{i}.key.pub")  # what `flwr supernode register` reads
    subprocess.run(["bash", str(script), str(tmp_path), "2"], check=True, capture_output=True)
    assert (tmp_path / "node-0.key").read_bytes() == first  # still registered
    # a node host's members, e.g. 3 to 4 of 5: its keys alone
    subprocess.run(["bash", str(script), str(tmp_path), "3-4"], check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.glob("node-*.key")) == [
        f"node-{i}.key" for i in (0, 1, 3, 4)
    ]


def test_the_proxy_config_is_valid_nginx(tmp_path: Path) -> None:
    if shutil.which("nginx") is None:
        pytest.fail("nginx is missing (Debian package nginx-light; make test installs it)")
    subprocess.run(["bash", str(ROOT / "deploy/certs/generate.sh"), str(tmp_path)], check=True)
    config = render_proxy_config(
        tmp_path / "proxy",
        superlink="127.0.0.1:1",
        fleet="127.0.0.1:2",
        control="127.0.0.1:3",
        certificates=tmp_path,
    )
    done = subprocess.run(
        ["nginx", "-t", "-p", str(config.parent), "-c", str(config)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_dockerfile_keeps_flower_offline_and_quiet() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for name, value in FLOWER_SETTINGS.items():  # what every Flower process of ours runs with
        assert f"{name}={value}" in text
    assert "USER app" in text
