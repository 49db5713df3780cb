"""What a stranger on the compose stack's fleet network can reach: run inside a container of
the test's own on that network (python fleet_stranger.py), it prints one JSON object. Only
the stack's own names and its network's gateway (the host) are probed."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request

CA = "/certs/ca.crt"
SERVICES = ("proxy", "superlink", "control", "prometheus", "pushgateway", "grafana")


def status(url: str) -> int | str:
    """The HTTP status a POST to ``url`` gets over TLS (the stack's CA), or why none came."""
    context = ssl.create_default_context(cafile=CA)
    request = urllib.request.Request(url, method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, context=context, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, urllib.error.URLError) as err:
        return type(err).__name__


def address(name: str) -> str | None:
    try:
        return str(socket.getaddrinfo(name, None)[0][4][0])
    except OSError:
        return None


def connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError:
        return False
    return True


def gateway() -> str:
    """The default route's gateway: the host, as this network sees it."""
    with open("/proc/net/route") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                return socket.inet_ntoa(int(fields[2], 16).to_bytes(4, "little"))
    raise RuntimeError("no default route")


def main() -> None:
    host = gateway()
    print(
        json.dumps(
            {
                "fleet": status("https://proxy:9093/v1/fleet/get-run"),
                "control_on_fleet_port": status("https://proxy:9093/v1/control/list-runs"),
                "runtime_on_fleet_port": status("https://proxy:9093/v1/runtime/pull-messages"),
                "proxy_control_port_open": connects("proxy", 9095),
                "resolves": {name: address(name) for name in SERVICES},
                "host_loopback_ports_open": {
                    port: connects(host, port) for port in (9095, 9090, 3000)
                },
            }
        )
    )


if __name__ == "__main__":
    main()
