"""The monitoring edge: promtool/amtool checks, config installs, and the HTTP APIs of
Prometheus, Alertmanager and Grafana.

A config change goes: write to a staging directory, `promtool check config` / `amtool
check-config` there, install over the live files (the old ones kept), `POST /-/reload`. A
rejected reload puts the old files back (the server never stopped using them) and raises.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from hxp.errors import MonitoringError
from hxp.io.checks import CheckResult
from hxp.monitoring import (
    ALERT_RULES,
    ALERTMANAGER_CONFIG,
    PROMETHEUS_CONFIG,
    RECORDING_RULES,
    Binaries,
    MonitoringFile,
)

_TIMEOUT = 60
_GRAFANA_VARIABLE_RE = re.compile(r"\$(?:\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)")
_INTERVAL_VARIABLES = ("$__rate_interval", "$__interval", "$__range")


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=_TIMEOUT, check=False)


def find_binaries() -> Binaries:
    """Debian's names first (prometheus-alertmanager), then upstream's (alertmanager)."""

    def pick(*names: str) -> str:
        for name in names:
            found = shutil.which(name)
            if found is not None:
                return found
        return names[0]

    return Binaries(
        prometheus=pick("prometheus"),
        alertmanager=pick("prometheus-alertmanager", "alertmanager"),
        pushgateway=pick("prometheus-pushgateway", "pushgateway"),
    )


def query_for_promtool(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by values PromQL accepts."""
    for var in _INTERVAL_VARIABLES:
        expr = expr.replace(var, "5m")
    return _GRAFANA_VARIABLE_RE.sub("hxp_lint_variable", expr)


def check_queries_with_promtool(queries: Iterable[tuple[str, str]], workdir: Path) -> CheckResult:
    """Parse expressions with Prometheus' own parser (as recording rules in a scratch file)."""
    result = CheckResult("promtool: dashboard queries parse")
    tool = shutil.which("promtool")
    if tool is None:
        result.skipped = "promtool not installed (Debian package prometheus)"
        return result
    items = list(queries)
    rules = [
        {"record": f"hxp_lint:query_{i}", "expr": query_for_promtool(expr)}
        for i, (_, expr) in enumerate(items)
    ]
    path = workdir / "dashboard-queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "hxp-lint", "rules": rules}]}))
    out = _run([tool, "check", "rules", str(path)])
    if out.returncode != 0:
        text = (out.stdout + out.stderr).strip()
        for i, (where, _) in enumerate(items):  # name the query a message points at
            text = text.replace(f"hxp_lint:query_{i}", where)
        result.problems.append(text)
    path.unlink(missing_ok=True)
    return result


def check_monitoring_dir(root: Path) -> list[CheckResult]:
    """promtool check config (rule files included), amtool check-config, dashboard queries."""
    import json

    from hxp.dashboards import dashboard_queries

    results: list[CheckResult] = []
    promtool, amtool = shutil.which("promtool"), shutil.which("amtool")
    config = CheckResult("promtool check config")
    if promtool is None:
        config.skipped = "promtool not installed (Debian package prometheus)"
    else:
        out = _run([promtool, "check", "config", str(root / PROMETHEUS_CONFIG)])
        if out.returncode != 0:
            config.problems.append((out.stdout + out.stderr).strip())
    results.append(config)
    if (root / ALERTMANAGER_CONFIG).exists():
        am = CheckResult("amtool check-config")
        if amtool is None:
            am.skipped = "amtool not installed (Debian package prometheus-alertmanager)"
        else:
            out = _run([amtool, "check-config", str(root / ALERTMANAGER_CONFIG)])
            if out.returncode != 0:
                am.problems.append((out.stdout + out.stderr).strip())
        results.append(am)
    boards = [json.loads(p.read_text()) for p in sorted(root.glob("grafana/dashboards/*.json"))]
    if boards:
        with tempfile.TemporaryDirectory(prefix="hxp-promql-") as tmp:
            results.append(check_queries_with_promtool(dashboard_queries(boards), Path(tmp)))
    return results


# --------------------------------------------------------------------------- config installs


@dataclass
class Install:
    """What an install changed, and what it replaced (to put back on a rejected reload)."""

    root: Path
    changed: list[str] = field(default_factory=list)
    previous: dict[str, tuple[bytes, int] | None] = field(default_factory=dict)

    def restore(self) -> None:
        """Put every replaced file back; remove those that did not exist before."""
        for rel, old in self.previous.items():
            path = self.root / rel
            if old is None:
                path.unlink(missing_ok=True)
            else:
                _write_atomic(path, *old)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_files(root: Path, files: Iterable[MonitoringFile]) -> Install:
    """Write files under `root` (atomically, each with its mode); record what they replaced."""
    result = Install(root)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for f in files:
        path = (root / f.path).resolve()
        if root.resolve() not in path.parents:
            raise MonitoringError(f"refusing to write outside {root}: {f.path}")
        data = f.content.encode("utf-8")
        old = (path.read_bytes(), stat.S_IMODE(path.stat().st_mode)) if path.exists() else None
        if old == (data, f.mode):
            continue
        result.previous[f.path] = old
        result.changed.append(f.path)
        _write_atomic(path, data, f.mode)
    return result


def write_secret_files(directory: Path, values: Mapping[str, str]) -> list[Path]:
    """One file per secret, mode 0600, in a 0700 directory; the value never reaches a log."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)
    written = []
    for name, value in sorted(values.items()):
        path = directory / name
        _write_atomic(path, value.encode("utf-8"), 0o600)
        written.append(path)
    return written


# --------------------------------------------------------------------------- HTTP APIs


def _client(base_url: str, timeout: float, transport: httpx.BaseTransport | None) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=timeout, transport=transport)


@dataclass
class LifecycleApi:
    """`/-/ready` and `/-/reload`, which Prometheus and Alertmanager share."""

    base_url: str
    name: str
    timeout: float = 5.0
    transport: httpx.BaseTransport | None = None

    def ready(self) -> bool:
        try:
            with _client(self.base_url, self.timeout, self.transport) as c:
                return c.get("/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def reload(self) -> None:
        """Apply the config on disk; a refusal raises with the server's own words."""
        try:
            with _client(self.base_url, self.timeout, self.transport) as c:
                r = c.post("/-/reload")
        except httpx.HTTPError as exc:
            raise MonitoringError(f"{self.name} at {self.base_url}: reload failed: {exc}") from None
        if r.status_code != 200:
            raise MonitoringError(
                f"{self.name} at {self.base_url} rejected the new config "
                f"(HTTP {r.status_code}): {r.text.strip()}"
            )

    def get_json(self, path: str) -> Any:
        with _client(self.base_url, self.timeout, self.transport) as c:
            r = c.get(path)
            r.raise_for_status()
            return r.json()


@dataclass(frozen=True)
class TargetState:
    job: str
    instance: str
    health: str
    error: str
    labels: Mapping[str, str]


def prometheus_targets(api: LifecycleApi) -> list[TargetState]:
    data = api.get_json("/api/v1/targets?state=active")["data"]["activeTargets"]
    return [
        TargetState(
            t["labels"].get("job", t.get("scrapePool", "")),
            t["labels"].get("instance", ""),
            t.get("health", "unknown"),
            t.get("lastError", ""),
            t["labels"],
        )
        for t in data
    ]


def prometheus_rule_groups(api: LifecycleApi) -> dict[str, int]:
    """Loaded rule group -> number of rules."""
    groups = api.get_json("/api/v1/rules")["data"]["groups"]
    return {g["name"]: len(g.get("rules") or []) for g in groups}


def prometheus_alertmanagers(api: LifecycleApi) -> list[str]:
    data = api.get_json("/api/v1/alertmanagers")["data"]
    return [a["url"] for a in data.get("activeAlertmanagers") or []]


def prometheus_alerts(api: LifecycleApi) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = api.get_json("/api/v1/alerts")["data"]["alerts"]
    return alerts


def prometheus_config_text(api: LifecycleApi) -> str:
    text: str = api.get_json("/api/v1/status/config")["data"]["yaml"]
    return text


def wait_until(check: Any, timeout: float, interval: float = 0.25) -> Any:
    """Call `check` until it returns something truthy or the time is up; the last result."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# --------------------------------------------------------------------------- Grafana


@dataclass(frozen=True)
class GrafanaPush:
    """What a push through Grafana's HTTP API did."""

    datasource: str
    dashboards: tuple[str, ...]


def push_grafana(
    url: str,
    token: str,
    datasource: Mapping[str, Any],
    dashboards: Sequence[Mapping[str, Any]],
    folder_uid: str | None = None,
    timeout: float = 10.0,
    transport: httpx.BaseTransport | None = None,
) -> GrafanaPush:
    """Create the datasource (`POST /api/datasources`; 409: it exists already) and put every
    dashboard (`POST /api/dashboards/db`, overwrite). The token never reaches a message."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    pushed: list[str] = []
    with httpx.Client(
        base_url=url.rstrip("/"), timeout=timeout, headers=headers, transport=transport
    ) as c:
        r = c.post("/api/datasources", json=dict(datasource))
        if r.status_code == 409:
            ds_state = "exists"
        elif r.status_code == 200:
            ds_state = "created"
        else:
            raise MonitoringError(
                f"Grafana {url}: creating datasource {datasource.get('uid')!r} failed "
                f"(HTTP {r.status_code}): {r.text.strip()[:300]}"
            )
        for board in dashboards:
            body: dict[str, Any] = {
                "dashboard": {**board, "id": None},
                "overwrite": True,
                "message": "hxp deploy_monitoring",
            }
            if folder_uid is not None:
                body["folderUid"] = folder_uid
            r = c.post("/api/dashboards/db", json=body)
            if r.status_code != 200:
                raise MonitoringError(
                    f"Grafana {url}: dashboard {board.get('uid')!r} was refused "
                    f"(HTTP {r.status_code}): {r.text.strip()[:300]}"
                )
            pushed.append(str(board.get("uid")))
    return GrafanaPush(ds_state, tuple(pushed))


__all__ = [
    "ALERT_RULES",
    "RECORDING_RULES",
    "GrafanaPush",
    "Install",
    "LifecycleApi",
    "TargetState",
    "check_monitoring_dir",
    "check_queries_with_promtool",
    "find_binaries",
    "install_files",
    "prometheus_alertmanagers",
    "prometheus_alerts",
    "prometheus_config_text",
    "prometheus_rule_groups",
    "prometheus_targets",
    "push_grafana",
    "query_for_promtool",
    "wait_until",
    "write_secret_files",
]
