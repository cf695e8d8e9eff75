"""One store per run: a Store opens one SQLite connection per thread that uses it (its PRAGMAs
set once), not one per call; a run context keeps one Store for all its tasks and threads."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from hxp.config import load_config
from hxp.store import Store
from tasks.instances import RunContext

DEMO = Path(__file__).parents[2] / "examples" / "demo" / "stack.yaml"
CALLS = 30
THREADS = 4


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread id of every sqlite3.connect made while the test runs."""
    seen: list[int] = []
    real = sqlite3.connect

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", counting)
    return seen


def test_a_store_opens_one_connection_per_thread(tmp_path: Path, connects: list[int]) -> None:
    store = Store(tmp_path)
    for i in range(CALLS):
        store.add_event("s", "note", f"main {i}")
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(CALLS):
                store.add_event("s", "note", f"thread {n} {i}")
                store.events("s")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert len(store.events("s")) == CALLS * (THREADS + 1)  # every write kept
    assert len(connects) == 1 + THREADS  # this thread's, and one per worker thread
    assert len(set(connects)) == 1 + THREADS


def test_a_run_context_keeps_one_store(tmp_path: Path, connects: list[int]) -> None:
    stack = load_config([DEMO]).stack
    ctx = RunContext(stack, str(tmp_path))
    assert not ctx.is_deploy
    stores = {id(ctx.store()) for _ in range(CALLS)}
    for i in range(CALLS):
        ctx.event("note", f"event {i}")
    assert len(stores) == 1
    assert len(connects) == 1
    assert [e["deploy_id"] for e in ctx.store().events(stack.stack)] == [None] * CALLS
    deploy = RunContext(stack, str(tmp_path), 7, "h")
    assert deploy.is_deploy
    assert deploy.label == f"deploy #7 of {stack.stack}"
