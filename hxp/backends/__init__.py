"""Backends: the only code that touches hosts, behind one Protocol (hxp.backends.base)."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hxp.backends.base import Backend
from hxp.errors import BackendError
from hxp.plan import ObservedUnit
from hxp.spec import HostSpec, Stack


def backend_for(host_name: str, host: HostSpec, state_dir: str | Path) -> Backend:
    """The backend that drives `host`."""
    match host.backend:
        case "process":
            if host.runner != "local":
                raise BackendError(
                    f"host {host_name!r}: the process backend runs only on the local machine "
                    "(use a worker on that host)"
                )
            from hxp.backends.process import ProcessBackend

            return ProcessBackend(state_dir)
        case "docker":
            from hxp.backends.docker import DockerBackend

            return DockerBackend(host_name, host, state_dir)
        case "systemd":
            from hxp.backends.systemd import SystemdBackend

            return SystemdBackend(host_name, host, state_dir)


def stack_backends(stack: Stack, state_dir: str | Path) -> dict[str, Backend]:
    """One backend per host; local process hosts share one (they are the same machine)."""
    out: dict[str, Backend] = {}
    for name, host in sorted(stack.hosts.items()):
        out[name] = backend_for(name, host, state_dir)
    return out


def observe_all(
    stack: Stack, state_dir: str | Path, hosts: Iterable[str] | None = None
) -> dict[str, ObservedUnit]:
    """Every instance of the stack any of its hosts (or only `hosts`) runs, tagged with its
    host. Hosts are asked side by side (each answer is SSH or Docker round trips); a host
    whose backend fails raises, as the first failing host in name order."""
    from hxp.units import expand_units

    owners = {u.name: u.host for u in expand_units(stack)}
    wanted = None if hosts is None else set(hosts)
    chosen: dict[str, Backend] = {}
    visited: set[tuple[str, str, str]] = set()
    for name, backend in stack_backends(stack, state_dir).items():
        if wanted is not None and name not in wanted:
            continue
        host = stack.hosts[name]
        key = (host.backend, host.address or "local", host.container or "")
        if key in visited:
            continue
        visited.add(key)
        chosen[name] = backend
    if len(chosen) > 1:
        with ThreadPoolExecutor(max_workers=min(16, len(chosen))) as pool:
            answers = list(pool.map(lambda b: b.observe(stack.stack), chosen.values()))
    else:
        answers = [b.observe(stack.stack) for b in chosen.values()]
    seen: dict[str, ObservedUnit] = {}
    for name, answer in zip(chosen, answers, strict=True):
        for instance, unit in answer.items():
            owner = unit.host or owners.get(instance, name)
            seen[instance] = ObservedUnit(**{**unit.__dict__, "host": owner})
    return seen
