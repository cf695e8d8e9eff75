"""The nginx gateway's configuration, from the stack and the replicas that are live (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hxp.endpoints import LOOPBACK, netloc
from hxp.render import Renderer
from hxp.spec import GatewaySpec

Server = str  # an upstream server, `address:port` (hxp.endpoints.server)


def as_server(server: str | int) -> Server:
    """A server as the gateway keeps it: `address:port`; a bare port is one on this machine
    (what a gateway's map held before addresses)."""
    if isinstance(server, int):
        return netloc(LOOPBACK, server)
    return server


def server_port(server: Server) -> int:
    """The port of an `address:port` server."""
    return int(server.rsplit(":", 1)[1])


@dataclass(frozen=True)
class Route:
    unit: str  # the route's name: its unit, or the unit several hosts' parts are part of
    port: int
    servers: tuple[Server, ...]
    units: tuple[str, ...] = ()  # the routed units it balances over (default: `unit` alone)


def gateway_routes(
    spec: GatewaySpec,
    live: Mapping[str, Sequence[str | int]],
    names: Mapping[str, str] | None = None,
) -> list[Route]:
    """One route per gateway port, its upstream the `address:port` of the live replicas of
    every unit routed there (a bare port: one on this machine). Units share a port when they
    are the parts of one unit declared on several hosts; `names`: unit -> that unit's name."""
    names = names or {}
    by_port: dict[int, list[str]] = {}
    for unit, port in sorted(spec.routes.items()):
        by_port.setdefault(port, []).append(unit)
    routes = []
    for port, units in sorted(by_port.items(), key=lambda item: item[1][0]):
        shared = {names.get(u, u) for u in units}
        name = shared.pop() if len(shared) == 1 else units[0]
        servers = sorted({as_server(s) for u in units for s in live.get(u, ())})
        routes.append(Route(name, port, tuple(servers), tuple(units)))
    return routes


def render_gateway(
    stack: str,
    spec: GatewaySpec,
    live: Mapping[str, Sequence[str | int]],
    prefix: str,
    renderer: Renderer | None = None,
    names: Mapping[str, str] | None = None,
) -> str:
    """nginx.conf for the stack's gateway, with every path under `prefix` (`names`: as for
    gateway_routes)."""
    renderer = renderer or Renderer()
    rendered = renderer.render(
        "nginx/gateway.conf.j2",
        stack=stack,
        routes=gateway_routes(spec, live, names),
        prefix=prefix,
        bind=spec.bind,
    )
    return rendered.content
