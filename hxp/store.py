"""Deployment history: config snapshots, unit revisions, deploy runs, events (SQLite, WAL).

One file under the state directory; every write is a transaction, so a crash leaves either
the old or the new record, never half of one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hxp.autoscale import counted_config
from hxp.calibration import Calibration, CalibrationKey
from hxp.config import ConfigSnapshot, EffectiveConfig
from hxp.errors import GpuAllocationError, StateDiskFullError
from hxp.gpu_alloc import Reservation
from hxp.lifecycle import INITIAL, LifecycleRecord, State, Transition, check_transition

#: decisions kept as rows per model (their counts live on in autoscale_decision_totals)
AUTOSCALE_DECISIONS_KEPT = 2000

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    content_hash TEXT PRIMARY KEY,
    stack TEXT NOT NULL,
    config TEXT NOT NULL,
    sources TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deploys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stack TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    config_hash TEXT,
    plan TEXT,
    result TEXT,
    actor TEXT,
    flow_run_id TEXT,
    started_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS revisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stack TEXT NOT NULL,
    unit TEXT NOT NULL,
    revision INTEGER NOT NULL,
    config_hash TEXT NOT NULL,
    snapshot_hash TEXT NOT NULL REFERENCES snapshots(content_hash),
    deploy_id INTEGER REFERENCES deploys(id),
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    files TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    UNIQUE (stack, unit, revision)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stack TEXT NOT NULL,
    unit TEXT,
    deploy_id INTEGER,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS gpu_reservations (
    host TEXT NOT NULL,
    gpu_index INTEGER NOT NULL,
    stack TEXT NOT NULL,
    instance TEXT NOT NULL,
    reserved_at REAL NOT NULL,
    PRIMARY KEY (host, gpu_index)
);
CREATE TABLE IF NOT EXISTS gpu_sleep (
    stack TEXT NOT NULL,
    instance TEXT NOT NULL,
    unit TEXT NOT NULL,
    host TEXT NOT NULL,
    level INTEGER NOT NULL,
    release TEXT NOT NULL,  -- hxp.sleep.SleepRelease.to_dict()
    since REAL NOT NULL,
    PRIMARY KEY (stack, instance)
);
CREATE TABLE IF NOT EXISTS health_instances (
    stack TEXT NOT NULL,
    instance TEXT NOT NULL,
    unit TEXT NOT NULL,
    status TEXT NOT NULL,
    seen TEXT NOT NULL,
    reason TEXT NOT NULL,
    since REAL NOT NULL,
    pending TEXT,
    pending_count INTEGER NOT NULL DEFAULT 0,
    port INTEGER,
    ejected INTEGER NOT NULL DEFAULT 0,
    data TEXT NOT NULL DEFAULT '{}',
    checked_at REAL NOT NULL,
    PRIMARY KEY (stack, instance)
);
CREATE TABLE IF NOT EXISTS health_units (
    stack TEXT NOT NULL,
    unit TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    since REAL NOT NULL,
    checked_at REAL NOT NULL,
    PRIMARY KEY (stack, unit)
);
CREATE TABLE IF NOT EXISTS metric_baselines (
    stack TEXT NOT NULL,
    target TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (stack, target)
);
CREATE TABLE IF NOT EXISTS metric_runs (
    stack TEXT PRIMARY KEY,
    at REAL NOT NULL,
    samples TEXT NOT NULL,
    runs INTEGER NOT NULL,
    seconds_sum REAL NOT NULL,
    seconds_buckets TEXT NOT NULL,
    errors TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lifecycle (
    stack TEXT NOT NULL,
    instance TEXT NOT NULL,
    unit TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    since REAL NOT NULL,
    crashes TEXT NOT NULL DEFAULT '[]',
    restarts_seen INTEGER,
    next_restart REAL,
    held INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stack, instance)
);
CREATE TABLE IF NOT EXISTS kv_calibrations (
    model TEXT NOT NULL,
    revision TEXT NOT NULL,
    vllm_version TEXT NOT NULL,
    gpu_name TEXT NOT NULL,
    tensor_parallel_size INTEGER NOT NULL,
    max_model_len INTEGER NOT NULL,  -- 0: vLLM's default (the model's own)
    gpu_memory_utilization REAL NOT NULL,
    kv_cache_tokens INTEGER NOT NULL,
    available_kv_bytes INTEGER NOT NULL,
    max_concurrency REAL,
    measured_at REAL NOT NULL,
    instance TEXT NOT NULL,
    PRIMARY KEY (model, revision, vllm_version, gpu_name, tensor_parallel_size, max_model_len,
                 gpu_memory_utilization)
);
CREATE TABLE IF NOT EXISTS autoscale_state (
    stack TEXT NOT NULL,
    model TEXT NOT NULL,
    replicas INTEGER NOT NULL,
    above_since REAL,
    below_since REAL,
    last_action_at REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (stack, model)
);
CREATE TABLE IF NOT EXISTS autoscale_decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stack TEXT NOT NULL,
    model TEXT NOT NULL,
    action TEXT NOT NULL,
    current INTEGER NOT NULL,
    desired INTEGER NOT NULL,
    value REAL,
    reason TEXT NOT NULL,
    outcome TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS autoscale_decisions_model ON autoscale_decisions (stack, model, id);
CREATE TABLE IF NOT EXISTS autoscale_decision_totals (
    stack TEXT NOT NULL,
    model TEXT NOT NULL,
    action TEXT NOT NULL,
    count INTEGER NOT NULL,
    first_at REAL NOT NULL,
    PRIMARY KEY (stack, model, action)
);
CREATE INDEX IF NOT EXISTS revisions_unit ON revisions (stack, unit, revision);
CREATE INDEX IF NOT EXISTS events_stack ON events (stack, at);
"""


@dataclass(frozen=True)
class Revision:
    """One version of one unit as it was applied."""

    stack: str
    unit: str
    revision: int
    config_hash: str
    snapshot_hash: str
    deploy_id: int | None
    status: str
    spec: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class DeployRecord:
    id: int
    stack: str
    kind: str
    status: str
    config_hash: str | None
    actor: str | None
    flow_run_id: str | None
    started_at: float
    finished_at: float | None
    result: dict[str, Any] | None


def default_state_dir() -> Path:
    """$HXP_STATE_DIR, else $XDG_STATE_HOME/hxp, else ~/.local/state/hxp."""
    if os.environ.get("HXP_STATE_DIR"):
        return Path(os.environ["HXP_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "hxp"


class Store:
    """The SQLite store under a state directory.

    The schema is set up once per Store; each thread that uses it gets one connection of its
    own, opened (and its PRAGMAs set) on first use and kept for the Store's life, so a run that
    keeps one Store pays for that once. SQLite connections are not shared between threads: each
    thread's transactions stay its own, and WAL lets them read while another writes."""

    def __init__(self, state_dir: str | Path | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.state_dir / "hxp.sqlite3"
        self._local = threading.local()
        # Two processes or threads opening a new store at once: switching the journal to WAL
        # answers "database is locked" at once instead of waiting, so try again briefly.
        for attempt in range(50):
            try:
                with self._connect() as db:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.executescript(SCHEMA)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.05 * (attempt + 1))

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (opened on its first use; closed with `close`, when the
        thread ends, or when the Store goes)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        try:
            yield db
        except sqlite3.OperationalError as exc:
            if not _disk_full(exc):
                raise
            raise StateDiskFullError(
                f"state directory {self.state_dir}: its disk is full, the store could not be "
                f"written ({exc}); nothing was corrupted: free space there and apply again"
            ) from exc

    def checkpoint(self) -> bool:
        """Copy the write-ahead log into the database and truncate the log to zero bytes
        (PRAGMA wal_checkpoint(TRUNCATE)); False when a reader or writer kept it from finishing.
        Every write after it grows the log, so its space is taken from the disk anew."""
        with self._connect() as db:
            busy, _log, _done = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return bool(busy == 0)

    def close(self) -> None:
        """Close the calling thread's connection (a later call opens a new one)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None:
            self._local.db = None
            db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk does): roll back only what
                # is still open, so the error that ended the transaction is the one raised
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    # ---------------------------------------------------------------- snapshots

    def save_snapshot(self, snapshot: ConfigSnapshot) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO snapshots VALUES (?, ?, ?, ?, ?)",
                (
                    snapshot.content_hash,
                    snapshot.stack,
                    json.dumps(snapshot.config, sort_keys=True),
                    json.dumps(list(snapshot.sources)),
                    snapshot.created_at,
                ),
            )

    def snapshot(self, content_hash: str) -> ConfigSnapshot | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM snapshots WHERE content_hash = ?", (content_hash,)
            ).fetchone()
        return _snapshot(row) if row else None

    def latest_snapshot(self, stack: str) -> ConfigSnapshot | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT s.* FROM deploys d JOIN snapshots s ON s.content_hash = d.config_hash "
                "WHERE d.stack = ? AND d.status = 'succeeded' ORDER BY d.id DESC LIMIT 1",
                (stack,),
            ).fetchone()
        return _snapshot(row) if row else None

    # ---------------------------------------------------------------- deploy runs

    def begin_deploy(
        self,
        stack: str,
        kind: str,
        config_hash: str | None,
        plan: dict[str, Any] | None = None,
        actor: str | None = None,
        flow_run_id: str | None = None,
    ) -> int:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO deploys (stack, kind, status, config_hash, plan, actor, flow_run_id,"
                " started_at) VALUES (?, ?, 'running', ?, ?, ?, ?, ?)",
                (
                    stack,
                    kind,
                    config_hash,
                    json.dumps(plan) if plan is not None else None,
                    actor,
                    flow_run_id,
                    time.time(),
                ),
            )
            deploy_id = cur.lastrowid
        assert deploy_id is not None
        return deploy_id

    def finish_deploy(self, deploy_id: int, status: str, result: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE deploys SET status = ?, result = ?, finished_at = ? WHERE id = ?",
                (status, json.dumps(result, sort_keys=True, default=str), time.time(), deploy_id),
            )

    def deploys(self, stack: str, limit: int = 20) -> list[DeployRecord]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM deploys WHERE stack = ? ORDER BY id DESC LIMIT ?", (stack, limit)
            ).fetchall()
        return [_deploy(r) for r in rows]

    def deploy_plan(self, deploy_id: int) -> dict[str, Any] | None:
        """The plan a deploy recorded when it began (hxp.plan.Plan.to_dict), None if none."""
        with self._connect() as db:
            row = db.execute("SELECT plan FROM deploys WHERE id = ?", (deploy_id,)).fetchone()
        if row is None or row["plan"] is None:
            return None
        plan: dict[str, Any] = json.loads(row["plan"])
        return plan

    def unfinished_deploys(self, stack: str) -> list[DeployRecord]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM deploys WHERE stack = ? AND status = 'running' ORDER BY id",
                (stack,),
            ).fetchall()
        return [_deploy(r) for r in rows]

    # ---------------------------------------------------------------- revisions

    def next_revision(self, stack: str, unit: str) -> int:
        with self._connect() as db:
            row = db.execute(
                "SELECT COALESCE(MAX(revision), 0) FROM revisions WHERE stack = ? AND unit = ?",
                (stack, unit),
            ).fetchone()
        return int(row[0]) + 1

    def record_revision(
        self,
        stack: str,
        unit: str,
        config_hash: str,
        snapshot_hash: str,
        deploy_id: int | None,
        spec: dict[str, Any],
        status: str = "applied",
        files: dict[str, str] | None = None,
        revision: int | None = None,
    ) -> int:
        with self.transaction() as db:
            if revision is None:
                row = db.execute(
                    "SELECT COALESCE(MAX(revision), 0) FROM revisions WHERE stack = ? AND unit = ?",
                    (stack, unit),
                ).fetchone()
                revision = int(row[0]) + 1
            db.execute(
                "INSERT INTO revisions (stack, unit, revision, config_hash, snapshot_hash,"
                " deploy_id, status, spec, files, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    stack,
                    unit,
                    revision,
                    config_hash,
                    snapshot_hash,
                    deploy_id,
                    status,
                    json.dumps(spec, sort_keys=True),
                    json.dumps(files or {}, sort_keys=True),
                    time.time(),
                ),
            )
        return revision

    def set_revision_status(self, stack: str, unit: str, revision: int, status: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE revisions SET status = ? WHERE stack = ? AND unit = ? AND revision = ?",
                (status, stack, unit, revision),
            )

    def revisions(self, stack: str, unit: str | None = None) -> list[Revision]:
        query = "SELECT * FROM revisions WHERE stack = ?"
        args: list[Any] = [stack]
        if unit is not None:
            query += " AND unit = ?"
            args.append(unit)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY unit, revision", args).fetchall()
        return [_revision(r) for r in rows]

    def last_good(self, stack: str, unit: str, before: int | None = None) -> Revision | None:
        """The newest revision of a unit that deployed and passed its gate."""
        query = "SELECT * FROM revisions WHERE stack = ? AND unit = ? AND status = 'good'"
        args: list[Any] = [stack, unit]
        if before is not None:
            query += " AND revision < ?"
            args.append(before)
        with self._connect() as db:
            row = db.execute(query + " ORDER BY revision DESC LIMIT 1", args).fetchone()
        return _revision(row) if row else None

    # ---------------------------------------------------------------- events

    def add_event(
        self,
        stack: str,
        kind: str,
        message: str,
        unit: str | None = None,
        deploy_id: int | None = None,
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO events (stack, unit, deploy_id, kind, message, at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (stack, unit, deploy_id, kind, message, time.time()),
            )

    def events(self, stack: str, deploy_id: int | None = None) -> list[dict[str, Any]]:
        query = "SELECT * FROM events WHERE stack = ?"
        args: Sequence[Any] = (stack,)
        if deploy_id is not None:
            query += " AND deploy_id = ?"
            args = (stack, deploy_id)
        with self._connect() as db:
            return [dict(r) for r in db.execute(query + " ORDER BY id", args).fetchall()]

    # ---------------------------------------------------------------- GPU reservations

    def reserve(self, host: str, stack: str, instance: str, gpus: Sequence[int]) -> None:
        """Make `gpus` on `host` the instance's reservation (replacing what it held there);
        a GPU another instance holds is refused."""
        with self.transaction() as db:
            rows = db.execute(
                "SELECT gpu_index, stack, instance FROM gpu_reservations WHERE host = ?", (host,)
            ).fetchall()
            clash = [r for r in rows if r[0] in set(gpus) and (r[1], r[2]) != (stack, instance)]
            if clash:
                held = ", ".join(f"GPU {r[0]} by {r[1]}/{r[2]}" for r in clash)
                raise GpuAllocationError(f"host {host!r}: {held} already reserved")
            db.execute(
                "DELETE FROM gpu_reservations WHERE host = ? AND stack = ? AND instance = ?",
                (host, stack, instance),
            )
            now = time.time()
            db.executemany(
                "INSERT INTO gpu_reservations VALUES (?, ?, ?, ?, ?)",
                [(host, g, stack, instance, now) for g in gpus],
            )

    def release(self, stack: str, instance: str, host: str | None = None) -> list[Reservation]:
        """Drop the instance's reservations (on one host, or everywhere); returns what it held."""
        with self.transaction() as db:
            rows = db.execute(
                "SELECT * FROM gpu_reservations WHERE stack = ? AND instance = ?",
                (stack, instance),
            ).fetchall()
            rows = [r for r in rows if host is None or r["host"] == host]
            db.executemany(
                "DELETE FROM gpu_reservations WHERE host = ? AND gpu_index = ?",
                [(r["host"], r["gpu_index"]) for r in rows],
            )
        return [_reservation(r) for r in rows]

    def reservations(self, host: str | None = None) -> list[Reservation]:
        """Every GPU reservation (of one host), by host and GPU."""
        query = "SELECT * FROM gpu_reservations"
        args: tuple[Any, ...] = ()
        if host is not None:
            query += " WHERE host = ?"
            args = (host,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY host, gpu_index", args).fetchall()
        return [_reservation(r) for r in rows]

    def record_sleep(
        self, stack: str, unit: str, instance: str, host: str, release: dict[str, Any]
    ) -> None:
        """Beside its reservation: the instance sleeps, and what it freed (hxp.sleep)."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO gpu_sleep VALUES (?, ?, ?, ?, ?, ?, ?)",
                (stack, instance, unit, host, int(release["level"]), json.dumps(release),
                 time.time()),
            )  # fmt: skip

    def clear_sleep(self, stack: str, instance: str) -> bool:
        """The instance is awake (or gone): its memory is its own again. True if it slept."""
        with self.transaction() as db:
            gone = db.execute(
                "DELETE FROM gpu_sleep WHERE stack = ? AND instance = ?", (stack, instance)
            )
            return gone.rowcount > 0

    def sleeping(self, stack: str) -> dict[str, dict[str, Any]]:
        """The stack's sleeping instances: unit, host, level, since and what each freed."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM gpu_sleep WHERE stack = ?", (stack,)).fetchall()
        return {
            r["instance"]: {
                "unit": r["unit"],
                "host": r["host"],
                "level": r["level"],
                "since": r["since"],
                **json.loads(r["release"]),
            }
            for r in rows
        }

    # ---------------------------------------------------------------- metrics aggregation

    def stacks(self) -> list[str]:
        """Every stack the store has deploys, revisions or aggregations of."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT stack FROM deploys UNION SELECT stack FROM revisions"
                " UNION SELECT stack FROM metric_runs ORDER BY stack"
            ).fetchall()
        return [r[0] for r in rows]

    def event_units(
        self, stack: str, kinds: Sequence[str]
    ) -> list[tuple[int | None, str, str, float]]:
        """(deploy id, unit or '', kind, at) of the stack's events of these kinds, oldest first."""
        marks = ",".join("?" * len(kinds))
        with self._connect() as db:
            rows = db.execute(
                f"SELECT deploy_id, COALESCE(unit, ''), kind, at FROM events"  # noqa: S608
                f" WHERE stack = ? AND kind IN ({marks}) ORDER BY id",
                (stack, *kinds),
            ).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def metric_baselines(self, stack: str) -> dict[str, dict[str, Any]]:
        """Each target's previous scrape (hxp.metrics.Baseline as JSON)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT target, data FROM metric_baselines WHERE stack = ?", (stack,)
            ).fetchall()
        return {r[0]: json.loads(r[1]) for r in rows}

    def save_aggregation(
        self,
        stack: str,
        baselines: dict[str, dict[str, Any]],
        targets: Sequence[str],
        samples: list[Any],
        seconds: float,
        bounds: Sequence[float],
        errors: dict[str, int],
    ) -> None:
        """One aggregation run: new baselines (targets gone from `targets` are dropped; dead ones
        keep their old baseline), the published samples, the cumulative duration histogram and
        error counts (for hxp exporter), in one transaction."""
        with self.transaction() as db:
            marks = ",".join("?" * len(targets))
            db.execute(
                f"DELETE FROM metric_baselines WHERE stack = ? AND target NOT IN ({marks})",  # noqa: S608
                (stack, *targets),
            )
            db.executemany(
                "INSERT OR REPLACE INTO metric_baselines VALUES (?, ?, ?)",
                [(stack, t, json.dumps(b)) for t, b in baselines.items()],
            )
            row = db.execute("SELECT * FROM metric_runs WHERE stack = ?", (stack,)).fetchone()
            runs, total = (row["runs"], row["seconds_sum"]) if row else (0, 0.0)
            buckets: dict[str, int] = json.loads(row["seconds_buckets"]) if row else {}
            counts: dict[str, int] = json.loads(row["errors"]) if row else {}
            for bound in bounds:
                if seconds <= bound:
                    buckets[repr(float(bound))] = buckets.get(repr(float(bound)), 0) + 1
            for key, n in errors.items():
                counts[key] = counts.get(key, 0) + n
            db.execute(
                "INSERT OR REPLACE INTO metric_runs VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    stack,
                    time.time(),
                    json.dumps(samples),
                    runs + 1,
                    total + seconds,
                    json.dumps(buckets, sort_keys=True),
                    json.dumps(counts, sort_keys=True),
                ),
            )

    def aggregation_state(self, stack: str) -> dict[str, Any] | None:
        """The stack's last aggregation (at, samples) and its cumulative run figures."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM metric_runs WHERE stack = ?", (stack,)).fetchone()
        if row is None:
            return None
        return {
            "at": row["at"],
            "samples": json.loads(row["samples"]),
            "runs": row["runs"],
            "seconds_sum": row["seconds_sum"],
            "seconds_buckets": {float(k): v for k, v in json.loads(row["seconds_buckets"]).items()},
            "errors": json.loads(row["errors"]),
        }

    # ---------------------------------------------------------------- health sweeps

    def health_state(self, stack: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The last sweep's instances (hxp.health.InstanceHealth) and units (UnitRecord)."""
        from hxp.health import InstanceHealth, Status, UnitRecord

        with self._connect() as db:
            rows = db.execute("SELECT * FROM health_instances WHERE stack = ?", (stack,))
            instances = {
                r["instance"]: InstanceHealth(
                    instance=r["instance"],
                    unit=r["unit"],
                    status=Status(r["status"]),
                    seen=Status(r["seen"]),
                    reason=r["reason"],
                    since=r["since"],
                    checked_at=r["checked_at"],
                    pending=Status(r["pending"]) if r["pending"] else None,
                    count=r["pending_count"],
                    port=r["port"],
                    ejected=bool(r["ejected"]),
                    data=tuple(sorted(json.loads(r["data"]).items())),
                )
                for r in rows.fetchall()
            }
            rows = db.execute("SELECT * FROM health_units WHERE stack = ?", (stack,))
            units = {
                r["unit"]: UnitRecord(
                    r["unit"], Status(r["status"]), r["reason"], r["since"], r["checked_at"]
                )
                for r in rows.fetchall()
            }
        return instances, units

    def save_health(
        self,
        stack: str,
        instances: Sequence[Any],
        units: Sequence[Any],
        events: Sequence[tuple[str, str, str]] = (),
    ) -> None:
        """Replace the stack's health state with one sweep's (InstanceHealth, UnitHealth), and
        add its (unit, kind, message) events, in one transaction."""
        now = time.time()
        with self.transaction() as db:
            db.execute("DELETE FROM health_instances WHERE stack = ?", (stack,))
            db.execute("DELETE FROM health_units WHERE stack = ?", (stack,))
            db.executemany(
                "INSERT INTO health_instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        stack,
                        i.instance,
                        i.unit,
                        i.status.value,
                        i.seen.value,
                        i.reason,
                        i.since,
                        i.pending.value if i.pending else None,
                        i.count,
                        i.port,
                        int(i.ejected),
                        json.dumps(dict(i.data)),
                        i.checked_at,
                    )
                    for i in instances
                ],
            )
            db.executemany(
                "INSERT INTO health_units VALUES (?,?,?,?,?,?)",
                [(stack, u.unit, u.status.value, u.reason, u.since, now) for u in units],
            )
            db.executemany(
                "INSERT INTO events (stack, unit, deploy_id, kind, message, at)"
                " VALUES (?, ?, NULL, ?, ?, ?)",
                [(stack, unit, kind, message, now) for unit, kind, message in events],
            )

    def set_ejected(self, stack: str, instances: Sequence[str], ejected: bool) -> None:
        """Mark instances as taken out of (or put back into) the gateway by a sweep."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE health_instances SET ejected = ? WHERE stack = ? AND instance = ?",
                [(int(ejected), stack, i) for i in instances],
            )

    # ---------------------------------------------------------------- lifecycle states

    def lifecycle(self, stack: str) -> dict[str, LifecycleRecord]:
        """Every recorded instance's lifecycle state, by instance name."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM lifecycle WHERE stack = ?", (stack,)).fetchall()
        return {r["instance"]: _lifecycle(r) for r in rows}

    def asleep(self, stack: str) -> dict[str, str]:
        """The stack's instances recorded asleep (`hxp sleep`), each with its model."""
        rows = self.lifecycle(stack).values()
        return {r.instance: r.unit for r in rows if r.state is State.SLEEPING}

    def transition(
        self,
        stack: str,
        unit: str,
        instance: str,
        target: State,
        reason: str,
        *,
        held: bool | None = None,
        crashes: Sequence[float] | None = None,
        next_restart: float | None = None,
    ) -> Transition | None:
        """Move an instance to `target` if the state machine allows it (else
        IllegalTransitionError, nothing written), recording a `lifecycle` event, in one
        transaction. None when it is already there."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute(
                "SELECT * FROM lifecycle WHERE stack = ? AND instance = ?", (stack, instance)
            ).fetchone()
            record = _lifecycle(row) if row else None
            current = record.state if record else INITIAL
            if current == target and record is not None:
                return None
            if current != target:
                check_transition(instance, current, target)
            keep_crashes = record.crashes if record else ()
            db.execute(
                "INSERT OR REPLACE INTO lifecycle VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    stack,
                    instance,
                    unit,
                    target.value,
                    reason,
                    now,
                    json.dumps(list(crashes if crashes is not None else keep_crashes)),
                    record.restarts_seen if record else None,
                    next_restart,
                    int(held if held is not None else (record.held if record else False)),
                ),
            )
            if current is State.SLEEPING and target is not State.SLEEPING:
                # Awake, stopped or failed: the memory it had freed is no longer free.
                db.execute(
                    "DELETE FROM gpu_sleep WHERE stack = ? AND instance = ?", (stack, instance)
                )
            if current == target:  # first record of an instance that is stopped: no move
                return None
            change = Transition(stack, unit, instance, current, target, reason, now)
            db.execute(
                "INSERT INTO events (stack, unit, deploy_id, kind, message, at)"
                " VALUES (?, ?, NULL, 'lifecycle', ?, ?)",
                (stack, unit, change.message(), now),
            )
        return change

    def note_crashes(
        self,
        stack: str,
        instance: str,
        crashes: Sequence[float],
        restarts_seen: int | None,
        next_restart: float | None = None,
    ) -> None:
        """The supervisor's bookkeeping of an instance (no state change)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE lifecycle SET crashes = ?, restarts_seen = ?, next_restart = ?"
                " WHERE stack = ? AND instance = ?",
                (json.dumps(list(crashes)), restarts_seen, next_restart, stack, instance),
            )

    def note_restarts(self, stack: str, instance: str, restarts_seen: int | None) -> None:
        """A new baseline for the backend's restart counter (hxp has just started the
        instance itself, which resets that counter); nothing else changes."""
        with self.transaction() as db:
            db.execute(
                "UPDATE lifecycle SET restarts_seen = ? WHERE stack = ? AND instance = ?",
                (restarts_seen, stack, instance),
            )

    def clear_supervision(self, stack: str, instance: str) -> None:
        """An operator's start: forget the crash history and lift a crash-loop hold."""
        with self.transaction() as db:
            db.execute(
                "UPDATE lifecycle SET crashes = '[]', next_restart = NULL, held = 0"
                " WHERE stack = ? AND instance = ?",
                (stack, instance),
            )

    def forget_lifecycle(self, stack: str, instance: str, reason: str) -> str | None:
        """Drop an instance's record (it no longer exists); its unit, None when there was none."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT unit FROM lifecycle WHERE stack = ? AND instance = ?", (stack, instance)
            ).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM lifecycle WHERE stack = ? AND instance = ?", (stack, instance))
            db.execute("DELETE FROM gpu_sleep WHERE stack = ? AND instance = ?", (stack, instance))
            db.execute(
                "INSERT INTO events (stack, unit, deploy_id, kind, message, at)"
                " VALUES (?, ?, NULL, 'lifecycle', ?, ?)",
                (stack, row["unit"], f"{instance}: forgotten ({reason})", time.time()),
            )
        return str(row["unit"])

    # ---------------------------------------------------------------- KV calibration

    def record_kv_calibration(self, calibration: Calibration) -> bool:
        """Keep the first measurement of a combination; True when this one was stored."""
        k = calibration.key
        with self._connect() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO kv_calibrations VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (k.model, k.revision, k.vllm_version, k.gpu_name, k.tensor_parallel_size,
                 k.max_model_len or 0, k.gpu_memory_utilization, calibration.kv_cache_tokens,
                 calibration.available_kv_bytes, calibration.max_concurrency,
                 calibration.measured_at, calibration.instance),
            )  # fmt: skip
            return cur.rowcount == 1

    def kv_calibration(self, key: CalibrationKey) -> Calibration | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM kv_calibrations WHERE model=? AND revision=? AND vllm_version=? "
                "AND gpu_name=? AND tensor_parallel_size=? AND max_model_len=? "
                "AND gpu_memory_utilization=?",
                (key.model, key.revision, key.vllm_version, key.gpu_name,
                 key.tensor_parallel_size, key.max_model_len or 0, key.gpu_memory_utilization),
            ).fetchone()  # fmt: skip
        if row is None:
            return None
        return Calibration(
            key=key,
            kv_cache_tokens=row["kv_cache_tokens"],
            available_kv_bytes=row["available_kv_bytes"],
            max_concurrency=row["max_concurrency"],
            measured_at=row["measured_at"],
            instance=row["instance"],
        )

    # ---------------------------------------------------------------- autoscaler

    def autoscale_states(self, stack: str) -> dict[str, dict[str, Any]]:
        """model -> the autoscaler's kept state (replicas, above_since, below_since,
        last_action_at, updated_at)."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM autoscale_state WHERE stack = ?", (stack,)).fetchall()
        cols = ("replicas", "above_since", "below_since", "last_action_at", "updated_at")
        return {r["model"]: {k: r[k] for k in cols} for r in rows}

    def autoscale_counts(self, stack: str) -> dict[str, int]:
        """model -> the replica count the autoscaler chose last."""
        return {m: int(v["replicas"]) for m, v in self.autoscale_states(stack).items()}

    def save_autoscale_state(
        self,
        stack: str,
        model: str,
        replicas: int,
        above_since: float | None,
        below_since: float | None,
        last_action_at: float | None,
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO autoscale_state (stack, model, replicas, above_since, below_since,"
                " last_action_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (stack, model) DO UPDATE SET replicas = excluded.replicas,"
                " above_since = excluded.above_since, below_since = excluded.below_since,"
                " last_action_at = excluded.last_action_at, updated_at = excluded.updated_at",
                (stack, model, replicas, above_since, below_since, last_action_at, time.time()),
            )

    def add_autoscale_decision(
        self,
        stack: str,
        model: str,
        action: str,
        current: int,
        desired: int,
        value: float | None,
        reason: str,
        outcome: str = "",
    ) -> int:
        """Record one decision (one per model and pass, holds included). Its count goes into
        the totals the exporter's counters read; the rows themselves are kept for the last
        AUTOSCALE_DECISIONS_KEPT decisions of the model (a pass every 15 s made ~5,800 rows a
        day per model, and the exporter read them all on every scrape)."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO autoscale_decisions (stack, model, action, current, desired, value,"
                " reason, outcome, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (stack, model, action, current, desired, value, reason, outcome, time.time()),
            )
            # The first total of a key counts the rows already there (a store written before
            # the totals existed); after that, one more each.
            db.execute(
                "INSERT INTO autoscale_decision_totals (stack, model, action, count, first_at)"
                " SELECT ?, ?, ?, COUNT(*), MIN(at) FROM autoscale_decisions"
                " WHERE stack = ? AND model = ? AND action = ?"
                " ON CONFLICT (stack, model, action) DO UPDATE SET count = count + 1",
                (stack, model, action, stack, model, action),
            )
            row_id = int(cur.lastrowid or 0)
            db.execute(
                "DELETE FROM autoscale_decisions WHERE stack = ? AND model = ? AND id <= ?",
                (stack, model, row_id - AUTOSCALE_DECISIONS_KEPT),
            )
            return row_id

    def autoscale_decision_totals(self, stack: str) -> list[dict[str, Any]]:
        """Every decision ever recorded, counted per (model, action), with the first's time."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT model, action, count, first_at FROM autoscale_decision_totals"
                " WHERE stack = ? ORDER BY model, action",
                (stack,),
            ).fetchall()
        return [dict(r) for r in rows]

    def autoscale_decisions(self, stack: str, model: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT * FROM autoscale_decisions WHERE stack = ?"
        args: tuple[Any, ...] = (stack,)
        if model is not None:
            query += " AND model = ?"
            args = (stack, model)
        with self._connect() as db:
            return [dict(r) for r in db.execute(query + " ORDER BY id", args).fetchall()]


def _disk_full(exc: sqlite3.Error) -> bool:
    """SQLITE_FULL ("database or disk is full"), or an I/O error of a write on a full disk."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)


def _lifecycle(row: sqlite3.Row) -> LifecycleRecord:
    return LifecycleRecord(
        stack=row["stack"],
        unit=row["unit"],
        instance=row["instance"],
        state=State(row["state"]),
        reason=row["reason"],
        since=row["since"],
        crashes=tuple(json.loads(row["crashes"])),
        restarts_seen=row["restarts_seen"],
        next_restart=row["next_restart"],
        held=bool(row["held"]),
    )


def _reservation(row: sqlite3.Row) -> Reservation:
    return Reservation(
        host=row["host"],
        gpu_index=row["gpu_index"],
        stack=row["stack"],
        instance=row["instance"],
        reserved_at=row["reserved_at"],
    )


def _snapshot(row: sqlite3.Row) -> ConfigSnapshot:
    return ConfigSnapshot(
        stack=row["stack"],
        content_hash=row["content_hash"],
        config=json.loads(row["config"]),
        sources=tuple(json.loads(row["sources"])),
        created_at=row["created_at"],
    )


def _deploy(row: sqlite3.Row) -> DeployRecord:
    return DeployRecord(
        id=row["id"],
        stack=row["stack"],
        kind=row["kind"],
        status=row["status"],
        config_hash=row["config_hash"],
        actor=row["actor"],
        flow_run_id=row["flow_run_id"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        result=json.loads(row["result"]) if row["result"] else None,
    )


def _revision(row: sqlite3.Row) -> Revision:
    return Revision(
        stack=row["stack"],
        unit=row["unit"],
        revision=row["revision"],
        config_hash=row["config_hash"],
        snapshot_hash=row["snapshot_hash"],
        deploy_id=row["deploy_id"],
        status=row["status"],
        spec=json.loads(row["spec"]),
        created_at=row["created_at"],
    )


def counted_at(state_dir: str | Path | None, effective: EffectiveConfig) -> EffectiveConfig:
    """The configuration as it runs: each autoscaled model at the count the autoscaler chose
    last (kept in the store of `state_dir`), not the stack's `replicas`
    (hxp.autoscale.counted_config). Every run that acts on what runs (deploy, plan,
    start/stop/restart, sleep/wake, down, the health sweep, metrics) takes its stack through
    here; a stack without an autoscaled model opens no store."""
    if all(m.autoscale is None for m in effective.stack.models.values()):
        return effective
    counts = Store(state_dir).autoscale_counts(effective.stack.stack)
    return counted_config(effective, counts)
