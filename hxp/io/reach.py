"""Whether a host answers at all: one TCP connect to its sshd, under a short timeout.

Used twice: by the health sweep (a host that does not answer, and whose every probe fails, is
`unreachable`: hxp.health.unreachable_hosts) and by a deploy's preflight (a deploy that must
reach a host that does not answer fails before it changes anything anywhere). Where a host is
reached is decided in hxp.endpoints.reach_target; a connect is the cheapest thing that tells a
dead link or a host that is down (refused, no route, no answer) from a live one, and it opens no
SSH session (no login, no key).
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from hxp.endpoints import hosts_touched, reach_target
from hxp.errors import HostUnreachableError
from hxp.spec import Stack

#: Seconds one connect may take. A live host on a fleet's network answers a connect within
#: milliseconds; a dead link answers never (the sweep must not wait for ssh's own 10 s).
REACH_TIMEOUT = 2.0
_MAX_THREADS = 32


@dataclass(frozen=True)
class Reach:
    """One host's answer: whether its sshd accepted a connection, and if not why."""

    host: str
    address: str
    port: int
    ok: bool
    reason: str = ""
    seconds: float = 0.0


def why_not(exc: OSError, timeout: float) -> str:
    """An operator's reason for a failed connect."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    names = {
        errno.EHOSTUNREACH: "no route to host",
        errno.ENETUNREACH: "network unreachable",
        errno.EHOSTDOWN: "host is down",
    }
    return names.get(exc.errno or 0, exc.strerror or str(exc))


def connect(host: str, address: str, port: int, timeout: float = REACH_TIMEOUT) -> Reach:
    """One TCP connect to `address:port`, closed at once."""
    started = time.monotonic()
    try:
        with socket.create_connection((address, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = f"{why_not(exc, timeout)} (ssh port {port})"
        return Reach(host, address, port, False, reason, time.monotonic() - started)
    return Reach(host, address, port, True, "", time.monotonic() - started)


def reach_hosts(
    stack: Stack, hosts: Iterable[str] | None = None, timeout: float = REACH_TIMEOUT
) -> dict[str, Reach]:
    """Connect to every named host of `stack` (all when None) that has an address, at once; a
    host on this machine is left out (always reachable). Takes at most about `timeout`."""
    targets = []
    for name in sorted(set(stack.hosts if hosts is None else hosts)):
        found = reach_target(stack.hosts[name])
        if found is not None:
            targets.append((name, *found))
    if not targets:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(targets), _MAX_THREADS)) as pool:
        answers = list(pool.map(lambda t: connect(t[0], t[1], t[2], timeout), targets))
    return {r.host: r for r in answers}


def preflight(
    stack: Stack,
    units: Iterable[str] | None = None,
    timeout: float = REACH_TIMEOUT,
    skip: Iterable[str] = (),
) -> list[str]:
    """Before a deploy changes anything: every host it must reach (hxp.endpoints.hosts_touched)
    answers, or HostUnreachableError names the first one that does not (by name). Hosts in
    `skip` are reached otherwise (an agent host: through its worker). Returns the hosts
    checked."""
    touched = [h for h in hosts_touched(stack, units) if h not in set(skip)]
    answers = reach_hosts(stack, touched, timeout)
    for name in sorted(answers):
        r = answers[name]
        if not r.ok:
            raise HostUnreachableError(name, r.address, r.reason)
    return sorted(answers)
