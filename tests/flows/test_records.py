"""The deploy record keeper (flows/records.py) on a real store: a record is begun `running`
and closed exactly once; an error closes it `failed` (or goes to the run's own handler); a
kill-like error leaves it `running` for the next run when the kind of run says so."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flows.records import RecordKeeper, close_interrupted, deploy_record
from hxp.config import EffectiveConfig, load_config
from hxp.store import Store
from tests.support.stacks import web_stack

Setup = tuple[Store, EffectiveConfig, str]


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    path, _ = web_stack(tmp_path)
    state = str(tmp_path / "state")
    return Store(state), load_config([path], {}), state


def run(setup: Setup, body: Callable[[RecordKeeper], None], **kw: Any) -> RecordKeeper:
    """Run `body` under a new record (kind `deploy` unless given, not published)."""
    store, effective, state = setup
    kind = kw.pop("kind", "deploy")
    with deploy_record(
        store, effective.stack, state, kind, effective.content_hash, publish=False, **kw
    ) as record:
        body(record)
    return record


def test_a_record_is_begun_running_and_closed_with_its_result(setup: Setup) -> None:
    store, effective, _ = setup
    revs: list[int] = []

    def body(record: RecordKeeper) -> None:
        assert [(d.id, d.status) for d in store.unfinished_deploys("t")] == [(record.id, "running")]
        record.save_snapshot(effective)
        revs.append(record.new_revision("api", "h-api", {"image": "x"}))
        record.revision_status("api", revs[0], "good")
        record.succeed({"changes": True})

    record = run(setup, body, kind="reload")
    [row] = store.deploys("t")
    assert (row.id, row.kind, row.status, row.result) == (
        record.id,
        "reload",
        "succeeded",
        {"changes": True},
    )
    assert row.config_hash == effective.content_hash
    [revision] = store.revisions("t", "api")
    assert (revision.revision, revision.status, revision.deploy_id) == (revs[0], "good", record.id)
    assert store.snapshot(effective.content_hash) is not None


def boom(record: RecordKeeper) -> None:
    raise ValueError("boom")


def test_an_error_closes_the_record_failed_and_propagates(setup: Setup) -> None:
    with pytest.raises(ValueError, match="boom"):
        run(setup, boom)
    [row] = setup[0].deploys("t")
    assert (row.status, row.result) == ("failed", {"reason": "ValueError: boom"})


def test_the_runs_own_handler_closes_the_record_and_adds_its_event(setup: Setup) -> None:
    store = setup[0]
    seen: list[BaseException] = []

    def handler(record: RecordKeeper, exc: BaseException) -> None:
        seen.append(exc)
        record.fail({"reason": "handled", "rollback": []}, event="unexpected error: boom")

    with pytest.raises(ValueError, match="boom"):
        run(setup, boom, on_error=handler)
    assert [str(e) for e in seen] == ["boom"]
    [row] = store.deploys("t")
    assert (row.status, row.result) == ("failed", {"reason": "handled", "rollback": []})
    events = [(e["kind"], e["message"]) for e in store.events("t", row.id)]
    assert events == [("deploy-failed", "unexpected error: boom")]


def test_a_record_closed_before_the_error_is_left_as_it_was(setup: Setup) -> None:
    called: list[BaseException] = []

    def fails_then_raises(record: RecordKeeper) -> None:
        record.fail({"reason": "unit api failed"})
        raise RuntimeError("the summary")

    with pytest.raises(RuntimeError, match="the summary"):
        run(setup, fails_then_raises, on_error=lambda r, e: called.append(e))
    assert called == []
    assert setup[0].deploys("t")[0].result == {"reason": "unit api failed"}


def killed(record: RecordKeeper) -> None:
    raise KeyboardInterrupt


def test_a_kill_leaves_a_deploy_running_but_closes_a_reload(setup: Setup) -> None:
    store, effective, _ = setup
    with pytest.raises(KeyboardInterrupt):
        run(setup, killed)
    with pytest.raises(KeyboardInterrupt):
        run(setup, killed, kind="reload", closes_on=BaseException)
    assert [(d.kind, d.status) for d in store.deploys("t")] == [
        ("reload", "failed"),
        ("deploy", "running"),
    ]
    [left] = store.unfinished_deploys("t")
    close_interrupted(store, effective.stack, left.id, ["api: restored revision 1, healthy"])
    assert store.deploys("t")[1].status == "interrupted"
    assert store.deploys("t")[1].result == {
        "reason": "the orchestrator stopped",
        "rollback": ["api: restored revision 1, healthy"],
    }


def test_a_body_that_returns_with_the_record_open_is_a_bug_said_out_loud(setup: Setup) -> None:
    with pytest.raises(RuntimeError, match="was left open"):
        run(setup, lambda record: None)
