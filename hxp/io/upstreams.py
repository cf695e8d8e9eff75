"""What the gateway of a stack routes to now, read from its state (read-only: the gateway's
routes change only through hxp.io.gateway.NginxGateway, which writes this file)."""

from __future__ import annotations

import json
from pathlib import Path

from hxp.gateway import Server, as_server

#: The file NginxGateway keeps its live upstreams in, under STATE/gateway/<stack>/.
UPSTREAMS_FILE = "upstreams.json"


def upstreams_path(state_dir: str | Path, stack: str) -> Path:
    return Path(state_dir) / "gateway" / stack / UPSTREAMS_FILE


def live_upstreams(state_dir: str | Path, stack: str) -> dict[str, list[Server]]:
    """The upstream servers (`address:port`) per routed unit, as the gateway last applied
    them ({} if none; a bare port from an older map is one on this machine)."""
    try:
        data = json.loads(upstreams_path(state_dir, stack).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(unit): [as_server(p) for p in servers] for unit, servers in data.items()}
