"""The deploy record keeper: every change a flow makes to a deploy record goes through here.

A deploy record (a row of the store's `deploys` table) is begun `running` under the stack's
lock, and closed once: `succeeded`, `failed`, or `interrupted` (closed by a later run for a
run that died). `deploy_record` begins one and hands back a `RecordKeeper`: what the run
writes about itself (its config snapshot, unit revisions) and how it closes. A run that ends
with the record still open on an error gets it closed `failed` here; a closed record is
published (counted in the in-process registry, the stack's deploy series pushed) where the
kind of run asks for it.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from hxp.config import ConfigSnapshot, EffectiveConfig
from hxp.io.telemetry import pushgateway_url, record_deploy
from hxp.spec import Stack
from hxp.store import Store
from tasks.metrics import push_metrics


@dataclass
class RecordKeeper:
    """One deploy record this run began, until it is closed."""

    store: Store
    stack: Stack
    state_dir: str
    id: int
    config_hash: str
    #: Closing counts the record in the registry and pushes the stack's deploy series
    #: (deploys and rollbacks; a reload's record is not published).
    publish: bool = True
    closed: bool = False

    def save_snapshot(self, effective: EffectiveConfig) -> None:
        """Keep the config this run applies (its units' revisions point at it)."""
        self.store.save_snapshot(ConfigSnapshot.of(effective))

    def new_revision(self, unit: str, unit_hash: str, spec: dict[str, Any]) -> int:
        """Record the next revision of `unit`, `applied` by this run; its number."""
        return self.store.record_revision(
            self.stack.stack, unit, unit_hash, self.config_hash, self.id, spec
        )

    def revision_status(self, unit: str, revision: int, status: str) -> None:
        """Mark a revision this run recorded `good` or `rolled-back`."""
        self.store.set_revision_status(self.stack.stack, unit, revision, status)

    def succeed(self, result: dict[str, Any]) -> None:
        """Close the record `succeeded`."""
        self._close("succeeded", result)

    def fail(
        self,
        result: dict[str, Any],
        *,
        event: str | None = None,
        summary: str | None = None,
        what: str = "failed",
    ) -> None:
        """Close the record `failed`; `event`: a `deploy-failed` event's message to add;
        `summary`: the text of the run's summary artifact (`deploy #N <what>`)."""
        self._close("failed", result, event)
        if summary is not None:
            create_markdown_artifact(
                key=f"deploy-{self.stack.stack}",
                markdown=f"```\n{summary}\n```",
                description=f"deploy #{self.id} {what}",
            )

    def _close(self, status: str, result: dict[str, Any], event: str | None = None) -> None:
        self.store.finish_deploy(self.id, status, result)
        self.closed = True
        if event is not None:
            self.store.add_event(self.stack.stack, "deploy-failed", event, None, self.id)
        if self.publish:
            _publish(self.store, self.stack, self.id, self.state_dir)


@contextmanager
def deploy_record(
    store: Store,
    stack: Stack,
    state_dir: str,
    kind: str,
    config_hash: str,
    plan: dict[str, Any] | None = None,
    *,
    publish: bool = True,
    on_error: Callable[[RecordKeeper, BaseException], None] | None = None,
    closes_on: type[BaseException] = Exception,
) -> Iterator[RecordKeeper]:
    """Begin a `running` deploy record of `kind` (call it holding the stack's lock) and keep it.

    The body closes the record (`succeed` / `fail`). An error of type `closes_on` that leaves
    it open goes to `on_error` (which undoes what it can and closes it), else closes it
    `failed` with the error; the error propagates either way. Anything else (a deploy killed
    mid-run: `closes_on=Exception` leaves it `running`) is for the next run to find and roll
    back as interrupted."""
    run_id = str(flow_run.id) if flow_run.id else None
    deploy_id = store.begin_deploy(stack.stack, kind, config_hash, plan, getpass.getuser(), run_id)
    record = RecordKeeper(store, stack, state_dir, deploy_id, config_hash, publish)
    try:
        yield record
    except closes_on as exc:
        if not record.closed and on_error is not None:
            on_error(record, exc)
        if not record.closed:
            record.fail({"reason": f"{type(exc).__name__}: {exc}"})
        raise
    if not record.closed:
        raise RuntimeError(f"deploy #{deploy_id} of stack {stack.stack!r} was left open")


def close_interrupted(store: Store, stack: Stack, deploy_id: int, rollback: list[str]) -> None:
    """Close the record of a run that died mid-run (another process's record, found
    `running` under the lock) `interrupted`, with what its rollback did; count it."""
    store.finish_deploy(
        deploy_id, "interrupted", {"reason": "the orchestrator stopped", "rollback": rollback}
    )
    record_deploy(store, stack.stack, deploy_id)


def _publish(store: Store, stack: Stack, deploy_id: int, state_dir: str) -> None:
    """Count a finished deploy in the shared registry; push the stack's deploy series."""
    record_deploy(store, stack.stack, deploy_id)
    url = pushgateway_url(stack)
    if url is not None:
        try:
            push_metrics(url, state_dir, stack.stack, "deploy")
        except Exception as exc:  # a monitoring outage must not fail a deploy
            get_run_logger().warning("push to %s failed: %s", url, exc)
