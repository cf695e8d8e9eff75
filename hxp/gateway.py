"""The nginx gateway's configuration, from the stack and the replicas that are live (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hxp.render import Renderer
from hxp.spec import GatewaySpec


@dataclass(frozen=True)
class Route:
    unit: str
    port: int
    servers: tuple[int, ...]


def gateway_routes(spec: GatewaySpec, live: Mapping[str, Sequence[int]]) -> list[Route]:
    """One route per routed unit, its upstream the ports of the unit's live replicas."""
    return [
        Route(unit, port, tuple(sorted(live.get(unit, ()))))
        for unit, port in sorted(spec.routes.items())
    ]


def render_gateway(
    stack: str,
    spec: GatewaySpec,
    live: Mapping[str, Sequence[int]],
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
