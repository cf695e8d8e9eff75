"""How the orchestrator reaches a host and a unit: the one place that decides it (pure).

A host with an `address` is reached there; a host without one is this machine (loopback).
A unit's endpoint is its host's address and its routed port. A health check a unit declares
against loopback (`http://127.0.0.1:PORT/health`, a TCP check on 127.0.0.1) means "on the
unit's own host": the backend runs it there as written (a container's healthcheck), and the
orchestrator, probing from elsewhere, sends it to the host's address instead.

Everything that reaches a unit from the orchestrator (gateway upstreams, readiness gates,
drains, health sweeps, the synthetic completion, Prometheus targets) goes through here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from hxp.spec import HealthSpec, HostSpec, Stack, is_loopback_address


class UnitInstance(Protocol):
    """What reaching an instance needs of hxp.units.UnitInstance (which imports this module
    for where a server it launches listens)."""

    @property
    def name(self) -> str: ...
    @property
    def host_spec(self) -> HostSpec: ...
    @property
    def route_port(self) -> int | None: ...


LOOPBACK = "127.0.0.1"


def address_of(host: HostSpec) -> str:
    """Where the orchestrator (and every other host) reaches `host`: its address, else
    loopback (a local host is this machine)."""
    return host.address or LOOPBACK


def host_address(stack: Stack, host: str) -> str:
    """`address_of` for the stack's host named `host`."""
    return address_of(stack.hosts[host])


def is_loopback(address: str) -> bool:
    return is_loopback_address(address)


def netloc(address: str, port: int) -> str:
    """`address:port`, an IPv6 address in brackets (a URL's netloc, an nginx `server`)."""
    bare = address.strip("[]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def endpoint(inst: UnitInstance) -> tuple[str, int] | None:
    """(address, port) where the orchestrator and the gateway reach the instance: its host's
    address and its routed port (`http`, else the first); None for a unit without ports."""
    port = inst.route_port
    return None if port is None else (address_of(inst.host_spec), port)


def server(inst: UnitInstance) -> str:
    """The instance as a gateway upstream server: `address:port`."""
    found = endpoint(inst)
    assert found is not None, f"{inst.name} is routed but declares no port"
    return netloc(*found)


def base_url(inst: UnitInstance, port: int | None = None) -> str:
    """`http://address:port` of the instance (its routed port unless `port` is given)."""
    chosen = port if port is not None else inst.route_port
    assert chosen is not None, f"{inst.name} declares no port"
    return f"http://{netloc(address_of(inst.host_spec), chosen)}"


def reach_url(url: str, host: HostSpec) -> str:
    """A URL the unit declares on its own host, as the orchestrator reaches it: a loopback
    hostname becomes the host's address (anything else is left as written)."""
    if host.address is None:
        return url
    parts = urlsplit(url)
    if parts.hostname is None or not is_loopback(parts.hostname):
        return url
    bare = host.address.strip("[]")
    where = netloc(bare, parts.port) if parts.port else (f"[{bare}]" if ":" in bare else bare)
    if parts.username or parts.password:
        auth = parts.netloc.rsplit("@", 1)[0]
        where = f"{auth}@{where}"
    return urlunsplit(parts._replace(netloc=where))


def reach_health(health: HealthSpec | None, host: HostSpec) -> HealthSpec | None:
    """The unit's checks as the orchestrator runs them: HTTP and TCP checks against loopback
    go to the host's address (a `command` check runs on the host through its runner)."""
    if health is None or host.address is None:
        return health
    changes: dict[str, object] = {}
    if health.http is not None:
        url = reach_url(health.http.url, host)
        if url != health.http.url:
            changes["http"] = health.http.model_copy(update={"url": url})
    if health.tcp is not None and is_loopback(health.tcp.host):
        changes["tcp"] = health.tcp.model_copy(update={"host": host.address})
    return health.model_copy(update=changes) if changes else health


def listen_address(host: HostSpec) -> str:
    """The address a server hxp launches on `host` listens on: loopback on a local host (as
    before), every interface on a host other machines reach by address."""
    return LOOPBACK if host.address is None else "0.0.0.0"  # noqa: S104 - reached by address


def reach_target(host: HostSpec) -> tuple[str, int] | None:
    """Where the orchestrator checks that `host` answers at all: its sshd (`address`,
    `ssh_port`). A host with an address is a machine of the fleet, reached over SSH (or run by
    an agent on it, which the fleet reaches the same way); None for this machine (no address,
    or a loopback one), which is always reachable."""
    if host.address is None or is_loopback(host.address):
        return None
    return host.address.strip("[]"), host.ssh_port


def hosts_touched(stack: Stack, units: Iterable[str] | None = None) -> list[str]:
    """The hosts a deploy of `units` (all when None) must reach: the hosts those units run on,
    and the gateway's host when one of them is routed; sorted."""
    wanted = list(stack.units()) if units is None else list(units)
    hosts = {stack.unit(u).host for u in wanted}
    gateway = stack.gateway
    if gateway is not None and any(u in gateway.routes for u in wanted):
        hosts.add(gateway.host)
    return sorted(hosts)


#: A worker is taken as gone when it missed this many heartbeats in a row (Prefect's own rule
#: for marking a worker offline).
WORKER_MISSED_HEARTBEATS = 3
DEFAULT_WORKER_HEARTBEAT = 30.0


def worker_absence(
    pool: str, workers: Iterable[tuple[str, str, float | None, float | None]], now: float
) -> str | None:
    """Why an agent host's work pool has no worker to run its part of a deploy, or None when
    one is online. `workers`: (name, Prefect status, last heartbeat as epoch seconds, its
    heartbeat interval) of each worker of the pool. An agent host is reached through its
    worker, not its sshd: a deploy whose host part nobody picks up would wait for ever."""
    seen = list(workers)
    latest: float | None = None
    for _name, status, beat, interval in seen:
        if beat is None:
            continue
        latest = beat if latest is None else max(latest, beat)
        limit = WORKER_MISSED_HEARTBEATS * (interval or DEFAULT_WORKER_HEARTBEAT)
        if status.upper() == "ONLINE" and now - beat <= limit:
            return None
    if not seen:
        return f"no worker has ever polled work pool {pool}"
    if latest is None:
        return f"no worker of work pool {pool} is online"
    return f"no worker of work pool {pool} is online (last heartbeat {now - latest:.0f}s ago)"
