"""The deployment files, checked by real tools: a compose implementation (Debian's
docker-compose, or compose v2 where present), Prometheus's promtool, openssl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SUPERNODES = [f"supernode-{i}" for i in range(4)]


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


def compose_config(*files: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    args = [*compose_command()]
    for f in files:
        args += ["-f", f]
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


def test_compose_file_is_valid_and_has_the_whole_topology() -> None:
    config = compose_config("docker-compose.yml")
    services = config["services"]
    assert set(services) == {"superlink", *SUPERNODES, "prometheus", "grafana", "pushgateway"}
    num_members = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"
    ]["num-members"]
    partitions = []
    for name in SUPERNODES:
        service = services[name]
        command = " ".join(service["command"])
        assert "--superlink=superlink:9093" in command and "--host=0.0.0.0" in command
        assert f"num-partitions={num_members}" in command
        partitions.append(int(service["environment"]["PARTITION_ID"]))
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device["count"] == 1
    assert sorted(partitions) == list(range(num_members))
    superlink = services["superlink"]
    assert {p["target"] for p in superlink["ports"]} == {9093, 9400}
    assert "deploy" not in superlink  # the ServerApp needs no GPU


def test_every_member_lives_in_a_worker_with_its_own_volume() -> None:
    services = compose_config("docker-compose.yml")["services"]
    volumes = []
    for name in SUPERNODES:
        service = services[name]
        command = " ".join(service["command"])
        assert "worker-dir='/var/lib/wash-fed/member'" in command
        assert "$${NODE_DATA:-}" in command or "${NODE_DATA:-}" in command  # a node's own data
        assert service["init"] is True  # reaps the worker when it exits with its run
        (own,) = [v for v in service["volumes"] if ":/var/lib/wash-fed" in str(v)]
        volumes.append(str(own).split(":")[0])
    assert len(set(volumes)) == len(SUPERNODES), "members would share checkpoints"
    assert "chown app /app/runs /var/lib/wash-fed" in (ROOT / "Dockerfile").read_text()


def test_tls_is_the_default_and_insecure_an_explicit_choice() -> None:
    secure = compose_config("docker-compose.yml")["services"]
    assert "--ssl-certfile=/certs/server.pem" in " ".join(secure["superlink"]["command"])
    assert all(
        "--root-certificates=/certs/ca.crt" in " ".join(secure[n]["command"]) for n in SUPERNODES
    )
    assert not any("--insecure" in " ".join(s.get("command", [])) for s in secure.values())
    plain = compose_config(
        "docker-compose.yml", env={"SUPERLINK_TLS": "--insecure", "SUPERNODE_TLS": "--insecure"}
    )["services"]
    assert all("--insecure" in " ".join(plain[n]["command"]) for n in ["superlink", *SUPERNODES])


def test_cpu_override_drops_every_gpu_reservation() -> None:
    class ResetLoader(yaml.SafeLoader):
        pass

    ResetLoader.add_constructor("!reset", lambda loader, node: "RESET")
    override = yaml.load((ROOT / "deploy/docker-compose.cpu.yml").read_text(), Loader=ResetLoader)
    assert {name: s["deploy"] for name, s in override["services"].items()} == dict.fromkeys(
        SUPERNODES, "RESET"
    )


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
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "DNS:node.example",
        "IP Address:10.1.2.3",
    ):
        assert name in san


def test_dockerfile_keeps_flower_offline_and_quiet() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for setting in (
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1",
        "FLWR_TELEMETRY_ENABLED=0",
        "FLWR_DISABLE_UPDATE_CHECK=1",
    ):
        assert setting in text
    assert "USER app" in text
