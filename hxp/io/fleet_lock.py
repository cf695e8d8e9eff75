"""The stack lock across machines: a Prefect global concurrency limit named after the stack.

The file lock (hxp.io.lock.stack_lock) serializes runs on one machine; orchestrators on two
machines see two different files. With a Prefect server they share one API, so a run also
takes a slot of the global concurrency limit `hxp-stack-<stack>` (limit 1, no slot decay),
created on demand. The slot is held through a lease that Prefect renews in the background
while the run lives; a run that dies stops renewing, and the server's repossessor frees the
slot once the lease has expired (LEASE_SECONDS, the shortest lease the server grants, plus
its scan interval). Who holds the lock is kept in a Prefect variable beside it, so a waiting
run can say whom it waits for, as the file lock does.

Order: the file lock first, then the limit, always; two runs never hold one each and wait.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from hxp.errors import HxpError, LockedError
from hxp.io.lock import stack_lock

LEASE_SECONDS = 60.0  # the server refuses shorter leases; renewed at 75 % of it
FIRST_TRY = 3.0  # seconds before a waiting run says whom it waits for


def limit_name(stack: str) -> str:
    """The global concurrency limit of a stack."""
    return f"hxp-stack-{stack}"


def holder_variable(stack: str) -> str:
    """The Prefect variable naming the lock's holder (letters, digits, - and _ only)."""
    return "hxp_lock_" + re.sub(r"[^a-z0-9_-]", "_", stack.lower())


def prefect_server_configured() -> bool:
    """Whether this process talks to a Prefect server (an API URL is set)."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def _ensure_limit(name: str) -> None:
    """Create the stack's limit (1 slot, no decay, active) unless it exists; a limit someone
    changed is put back to one slot."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # another machine created it meanwhile
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(
                        name=name, limit=1, active=True, slot_decay_per_second=0.0
                    )
                )
            return
        if found.limit != 1 or not found.active or found.slot_decay_per_second:
            client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=1, active=True, slot_decay_per_second=0)
            )


def _held(name: str) -> bool:
    """Whether the limit's slot is taken now (True when that cannot be read)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(name).active_slots > 0
    except Exception:  # an unreadable limit counts as held: the caller waits or refuses
        return True


def _holder_text(stack: str) -> str:
    from prefect.variables import Variable

    try:
        data: Any = Variable.get(holder_variable(stack), default=None)
    except Exception:  # naming the holder is best effort
        data = None
    if not isinstance(data, dict) or not data:
        return "another run"
    since = time.strftime("%H:%M:%S", time.localtime(float(data.get("since", 0))))
    return f"{data.get('holder')} (on {data.get('machine')}, pid {data.get('pid')}, since {since})"


def _pid_dead(pid: int) -> bool:
    """Whether a process of this machine is gone (a zombie counts as gone: it holds nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2 :].startswith("Z")


def free_if_holder_died(stack: str) -> bool:
    """Free the stack's slot when the run recorded as its holder was on this machine and has
    died (SIGKILL, power cut of the process): its lease would otherwise keep the slot until
    the server's repossessor runs, which not every server does. True when it freed the slot."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.variables import Variable

    try:
        data: Any = Variable.get(holder_variable(stack), default=None)
    except Exception:  # an unreadable record frees nothing
        return False
    if not isinstance(data, dict) or data.get("machine") != socket.gethostname():
        return False
    pid = data.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or not _pid_dead(pid):
        return False
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(
            limit_name(stack), GlobalConcurrencyLimitUpdate(active_slots=0)
        )
    with suppress(Exception):
        Variable.unset(holder_variable(stack))
    return True


def _flow_run_holder() -> Any:
    """The lease's holder: the flow run this process runs, when it runs one."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return ConcurrencyLeaseHolder(type="flow_run", id=run_id) if run_id else None


class QuietLockWaits(logging.Filter):
    """Drops Prefect's ERROR line for a slot acquisition that timed out: the stack lock tries
    in short slices on purpose (FIRST_TRY, then up to 15 s), and each slice that ends without
    the slot made Prefect's service log `Service 'ConcurrencySlotAcquisitionWithLeaseService'
    failed to process item (...TimeoutError)` to the operator's terminal while the waiting run
    had already said whom it waits for. Every other failure of that service still shows."""

    SERVICE = "ConcurrencySlotAcquisitionWithLeaseService"

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) < 2 or args[0] != self.SERVICE:
            return True
        return "TimeoutError" not in repr(args[1])


_QUIET = QuietLockWaits()


def quiet_lock_waits() -> None:
    """Install QuietLockWaits on Prefect's concurrency logger (once)."""
    log = logging.getLogger("prefect._internal.concurrency")
    if _QUIET not in log.filters:
        log.addFilter(_QUIET)


@contextmanager
def prefect_stack_lock(
    stack: str,
    holder: str,
    wait: bool = True,
    timeout: float = 3600.0,
    on_wait: Callable[[str], object] | None = None,
) -> Iterator[None]:
    """Hold the stack's global concurrency limit slot; wait for it (up to `timeout`, saying
    once whom it waits for) or fail fast with LockedError."""
    from prefect.concurrency.sync import concurrency
    from prefect.variables import Variable

    name = limit_name(stack)
    quiet_lock_waits()
    try:
        _ensure_limit(name)
    except Exception as exc:
        raise HxpError(
            f"cannot set up the stack lock {name!r} on the Prefect server: {exc}"
        ) from exc
    deadline = time.monotonic() + timeout
    announced = False
    held = ExitStack()
    while True:
        # Short tries after the first: a holder that dies meanwhile is noticed and freed.
        budget = FIRST_TRY if not announced else min(max(deadline - time.monotonic(), 0.1), 15.0)
        try:
            held.enter_context(
                concurrency(
                    name,
                    timeout_seconds=budget,
                    lease_duration=LEASE_SECONDS,
                    strict=True,
                    holder=_flow_run_holder(),
                    raise_on_lease_renewal_failure=False,  # a blip must not kill a deploy
                )
            )
            break
        except TimeoutError:
            if not _held(name) and time.monotonic() < deadline:
                continue  # a slow server, not a holder: try again, nothing to say
            if free_if_holder_died(stack):
                if on_wait is not None:
                    on_wait(f"the lock of stack {stack!r} was held by a run that died: freed")
                continue
            who = _holder_text(stack)
            if not wait or time.monotonic() > deadline:
                raise LockedError(f"stack {stack!r} is locked by {who}") from None
            if not announced and on_wait is not None:
                on_wait(f"waiting for the lock of stack {stack!r}, held by {who}")
            announced = True
    with held:
        record = {
            "holder": holder,
            "machine": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
        }
        with suppress(Exception):  # naming the holder is best effort
            Variable.set(holder_variable(stack), record, overwrite=True)
        try:
            yield
        finally:
            with suppress(Exception):
                Variable.unset(holder_variable(stack))


@contextmanager
def run_lock(
    state_dir: str | Path,
    stack: str,
    holder: str,
    wait: bool = True,
    timeout: float = 3600.0,
    on_wait: Callable[[str], object] | None = None,
) -> Iterator[None]:
    """The lock a deploy (or another run that changes the stack) holds: this machine's file
    lock, then, with a Prefect server, the stack's global concurrency limit."""
    with stack_lock(state_dir, stack, holder, wait=wait, timeout=timeout, on_wait=on_wait):
        if not prefect_server_configured():
            yield
            return
        with prefect_stack_lock(stack, holder, wait=wait, timeout=timeout, on_wait=on_wait):
            yield


__all__ = [
    "LEASE_SECONDS",
    "free_if_holder_died",
    "holder_variable",
    "limit_name",
    "prefect_stack_lock",
    "run_lock",
]
