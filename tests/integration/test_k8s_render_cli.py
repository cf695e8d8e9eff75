"""`hxp render --target k8s` end to end: kubernetes-validate, then the API server's rules.

A manifest the schema accepts but the API server refuses (the gpu-fleet `chat` Deployment as hxp
rendered it before: maxUnavailable 0 and maxSurge 0) fails the render with the rule named; the
examples pass both checks. Slow: kubernetes-validate runs once per file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hxp.render import builtin_templates_dir
from tests.support.render_data import EXAMPLES, REPO

pytestmark = pytest.mark.slow

RULES_PASSED = "passed Kubernetes v1.30.3 API server rules"
SCHEMA_PASSED = "passed kubernetes-validate --strict -k 1.30.0"


def _env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HXP__") and k not in ("HXP_DEBUG", "HXP_STACK_FILE")
    }


def _render(stack_file: Path, out: Path) -> subprocess.CompletedProcess[str]:
    argv = ["render", "-f", str(stack_file), "--target", "k8s", "--out", str(out)]
    return subprocess.run(
        [sys.executable, "-m", "hxp_cli", *argv],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_pass_the_schema_and_the_api_server_rules(name: str, tmp_path: Path) -> None:
    proc = _render(EXAMPLES[name], tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert SCHEMA_PASSED in lines, proc.stdout
    assert RULES_PASSED in lines, proc.stdout
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    kustomization = yaml.safe_load((tmp_path / "out" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [n for n in written if n != "kustomization.yaml"]


def test_the_old_zero_and_zero_rollout_passes_the_schema_but_not_the_rules(
    tmp_path: Path,
) -> None:
    """An operator template that renders the old strategy (maxUnavailable 0, maxSurge 0)."""
    templates = tmp_path / "templates"
    (templates / "k8s").mkdir(parents=True)
    builtin = (builtin_templates_dir() / "k8s" / "unit.yaml.j2").read_text()
    old = builtin.replace(
        "      maxUnavailable: {{ k8s.max_unavailable }}\n",
        "      maxUnavailable: {{ 0 if unit.replicas > 1 else 1 }}\n",
    ).replace(
        "      maxSurge: {{ k8s.max_surge }}\n",
        "      maxSurge: {{ 0 if unit.gpu_count else 1 }}\n",
    )
    assert old != builtin
    (templates / "k8s" / "unit.yaml.j2").write_text(old)
    data = yaml.safe_load(EXAMPLES["gpu-fleet"].read_text())
    data["templates_dir"] = str(templates)
    stack_file = tmp_path / "stack.yaml"
    stack_file.write_text(yaml.safe_dump(data))
    proc = _render(stack_file, tmp_path / "out")
    assert proc.returncode != 0
    assert SCHEMA_PASSED in proc.stdout.splitlines(), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    problems = [line for line in proc.stderr.splitlines() if "API server rules" in line]
    assert len(problems) == 1, proc.stderr
    assert (
        "chat.yaml: Deployment/fleet-chat spec.strategy.rollingUpdate.maxUnavailable"
        in (problems[0])
    )
    assert "rule deployment-strategy" in problems[0]
    assert "pkg/apis/apps/validation/validation.go" in problems[0]
