"""Prometheus's HTTP query API (instant and range queries, typed answers), and a real
``prometheus`` (Debian's binary) started on loopback to scrape one target: what the tests and
the bytes cross-check hold the ServerApp's metrics against."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from deploy.processes import free_port

__all__ = ["LocalPrometheus", "PrometheusApi", "Sample", "Series"]


@dataclass(frozen=True)
class Sample:
    """One series of an instant query's answer: its labels and its value."""

    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Series:
    """One series of a range query's answer: its labels and its ``(time, value)`` points."""

    labels: dict[str, str]
    points: list[tuple[float, float]]


class PrometheusApi:
    """The query API of the Prometheus at ``url`` (``http://host:port``)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str) -> list[Sample]:
        """An instant query: one sample per series (none when nothing matched)."""
        return [
            Sample(row["metric"], float(row["value"][1]))
            for row in self._api("query", {"query": promql})
        ]

    def query_range(self, promql: str, start: float, end: float, step: float) -> list[Series]:
        """A range query: one series of ``(time, value)`` points per labels."""
        params: dict[str, str | float] = {
            "query": promql,
            "start": start,
            "end": end,
            "step": step,
        }
        return [
            Series(row["metric"], [(float(t), float(v)) for t, v in row["values"]])
            for row in self._api("query_range", params)
        ]

    def _api(self, endpoint: str, params: Mapping[str, str | float]) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/{endpoint}", params=params, timeout=30)
        response.raise_for_status()
        body = response.json()
        if body["status"] != "success":
            raise RuntimeError(f"Prometheus answered {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


class LocalPrometheus(PrometheusApi):
    """A real ``prometheus`` on loopback, scraping ``127.0.0.1:<target_port>`` every second,
    its files under ``root``. As a context manager it stops itself."""

    def __init__(self, root: Path, target_port: int) -> None:
        port = free_port()
        super().__init__(f"http://127.0.0.1:{port}")
        root.mkdir(parents=True, exist_ok=True)
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: wash-fed\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        )
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=open(root / "prometheus.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.close()
        raise RuntimeError(f"prometheus did not become ready; its log: {root / 'prometheus.log'}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)

    def __enter__(self) -> LocalPrometheus:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
