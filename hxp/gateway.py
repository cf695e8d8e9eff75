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
    unit: str
    port: int
    servers: tuple[Server, ...]


def gateway_routes(spec: GatewaySpec, live: Mapping[str, Sequence[str | int]]) -> list[Route]:
    """One route per routed unit, its upstream the `address:port` of the unit's live replicas
    (a bare port: one on this machine)."""
    return [
        Route(unit, port, tuple(sorted(as_server(s) for s in live.get(unit, ()))))
        for unit, port in sorted(spec.routes.items())
    ]


def render_gateway(
    stack: str,
    spec: GatewaySpec,
    live: Mapping[str, Sequence[str | int]],
    prefix: str,
    renderer: Renderer | None = None,
) -> str:
    """nginx.conf for the stack's gateway, with every path under `prefix`."""
    renderer = renderer or Renderer()
    rendered = renderer.render(
        "nginx/gateway.conf.j2",
        stack=stack,
        routes=gateway_routes(spec, live),
        prefix=prefix,
        bind=spec.bind,
    )
    return rendered.content
