"""A per-stack file lock so two deploys of one stack never interleave.

flock is released by the kernel when its holder dies, so a killed deploy never leaves a
stale lock; the file also names the holder so a waiting run can say whom it waits for.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hxp.errors import LockedError


@contextmanager
def stack_lock(
    state_dir: str | Path,
    stack: str,
    holder: str,
    wait: bool = True,
    timeout: float = 3600.0,
    on_wait: object = None,
) -> Iterator[None]:
    """Hold the stack's lock; wait for it (up to `timeout`) or fail fast with LockedError."""
    locks = Path(state_dir) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"{stack}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                who = _holder(path)
                if not wait or time.monotonic() > deadline:
                    raise LockedError(f"stack {stack!r} is locked by {who}") from None
                if not announced and callable(on_wait):
                    on_wait(f"waiting for the lock of stack {stack!r}, held by {who}")
                    announced = True
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps({"holder": holder, "pid": os.getpid(), "since": time.time()}).encode(),
            0,
        )
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another run"
    if not data:
        return "another run"
    since = time.strftime("%H:%M:%S", time.localtime(data.get("since", 0)))
    return f"{data.get('holder')} (pid {data.get('pid')}, since {since})"
