"""The store on a full disk (found by the fault campaign's state-disk-full fault): a write that
does not fit fails with a clear StateDiskFullError naming the state directory (the CLI prints
it as `error: ...`, exit 1), leaves nothing half-written and leaves the connection usable: once
space is freed the same Store writes again and the database passes SQLite's integrity check.
Real SQLite on a real, small tmpfs (root)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from hxp.errors import StateDiskFullError
from hxp.io.chaos import fill, free, mount_small_fs, unmount
from hxp.store import Store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root)")


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    mount_small_fs(state, size_mib=4)
    try:
        yield state
    finally:
        unmount(state)


def test_a_full_disk_fails_the_write_clearly_and_the_store_recovers(small_state: Path) -> None:
    store = Store(small_state)
    first = store.begin_deploy("s", "apply", "h1", {"actions": []})
    store.add_event("s", "started", "before the disk filled", deploy_id=first)
    fill(small_state)

    def write_until_full() -> None:
        for i in range(200):  # the first pages may still fit in free space inside the file
            store.add_event("s", "note", "x" * 4000 + str(i), deploy_id=first)

    with pytest.raises(StateDiskFullError) as err:
        write_until_full()
    assert str(small_state) in str(err.value)
    assert "disk is full" in str(err.value)
    assert "free space" in str(err.value)
    # what was committed before is all there, readable while the disk is full
    assert store.deploys("s")[0].status == "running"
    assert [e["kind"] for e in store.events("s", first)][:1] == ["started"]

    free(small_state)
    store.finish_deploy(first, "failed", {"error": "disk full"})  # the same connection
    second = store.begin_deploy("s", "apply", "h2", {"actions": []})
    store.finish_deploy(second, "succeeded", {})
    assert [(d.id, d.status) for d in store.deploys("s")] == [
        (second, "succeeded"),
        (first, "failed"),
    ]
    store.close()
    with sqlite3.connect(small_state / "hxp.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_after_a_checkpoint_the_first_write_on_a_full_disk_fails(small_state: Path) -> None:
    """Why the campaign empties the log before its state-disk-full run: a write-ahead log that
    earlier writes grew and a checkpoint emptied is reused from its start, so writes made after
    the disk filled still fit and the apply never meets the full disk. `Store.checkpoint()`
    truncates the log: the next write needs new space."""
    store = Store(small_state)
    first = store.begin_deploy("s", "apply", "h1", {"actions": []})
    for i in range(40):  # an earlier apply's writes: the log grows by about 40 pages
        store.add_event("s", "note", "x" * 4000 + str(i), deploy_id=first)
    assert store.path.with_name("hxp.sqlite3-wal").stat().st_size > 40 * 4096
    other = sqlite3.connect(store.path)  # what SQLite's automatic checkpoint does now and then
    assert other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 0
    other.close()

    fill(small_state)
    store.add_event("s", "note", "fits in the reused log", deploy_id=first)  # the unmet fault
    free(small_state)

    assert store.checkpoint()
    assert store.path.with_name("hxp.sqlite3-wal").stat().st_size == 0
    fill(small_state)
    with pytest.raises(StateDiskFullError):
        store.add_event("s", "note", "needs new space", deploy_id=first)
    free(small_state)
    store.finish_deploy(first, "failed", {"error": "disk full"})
    assert store.deploys("s")[0].status == "failed"
