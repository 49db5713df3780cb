"""The compose stack's nginx proxy in front of the SuperLink, rendered for a local nginx: the
same template (``deploy/nginx/superlink.conf.template``) filled in as the nginx image does,
so the local harness and the tests run the very rules the containers run."""

from __future__ import annotations

import os
import string
from pathlib import Path

__all__ = ["PROXY_TEMPLATE", "render_proxy_config"]

PROXY_TEMPLATE = Path(__file__).resolve().parent / "nginx" / "superlink.conf.template"


def render_proxy_config(
    root: Path, *, superlink: str, fleet: str, control: str, certificates: Path
) -> Path:
    """An nginx configuration under ``root`` that serves compose's proxy in the foreground,
    with its logs in ``root``. Addresses are ``host:port``; returns the file to pass to
    ``nginx -c``."""
    root.mkdir(parents=True, exist_ok=True)
    values = {
        "SUPERLINK_ADDRESS": superlink,
        "FLEET_LISTEN": fleet,
        "CONTROL_LISTEN": control,
        "CERTS": str(certificates),
        "SUPERLINK_RESOLVER": "127.0.0.1",  # asked for names only; the address is one
    }
    # As envsubst does: only these placeholders; nginx's own $variables stay.
    rendered = string.Template(PROXY_TEMPLATE.read_text()).safe_substitute(values)
    if "${" in rendered:
        raise ValueError(f"{PROXY_TEMPLATE} has a placeholder this renderer does not fill")
    (root / "superlink.conf").write_text(rendered)
    # As root, nginx's workers would run as `nobody`, who cannot enter a private temp folder.
    user = "user root;\n" if os.geteuid() == 0 else ""
    config = root / "nginx.conf"
    config.write_text(
        f"{user}daemon off;\npid {root}/nginx.pid;\nerror_log {root}/error.log info;\n"
        f"events {{}}\nhttp {{\n    access_log {root}/access.log;\n"
        f"    include {root}/superlink.conf;\n}}\n"
    )
    return config
