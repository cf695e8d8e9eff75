"""The validate-stack flow against a real (test) Prefect server."""

from __future__ import annotations

from pathlib import Path

import pytest

from hxp.errors import StackValidationError

ROOT = Path(__file__).parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def test_demo_stack_validates_and_leaves_an_artifact() -> None:
    from prefect.artifacts import Artifact

    from flows.validate_stack import validate_stack

    result = validate_stack([str(ROOT / "examples/demo/stack.yaml")], targets=["systemd", "k8s"])
    assert result["stack"] == "demo"
    assert result["order"] == ["store", "cache", "api", "chat"]
    assert result["checks"]["systemd"] == {
        "systemd-analyze verify": True,
        "systemd-analyze security": True,
    }
    assert sorted(result["files"]["k8s"]) == [
        "api.yaml",
        "cache.yaml",
        "chat.yaml",
        "kustomization.yaml",
        "store.yaml",
    ]
    artifact = Artifact.get("validate-demo")
    assert artifact is not None
    assert "store → cache → api → chat" in str(artifact.data)


def test_invalid_override_fails_the_flow_with_the_field_named() -> None:
    from flows.validate_stack import validate_stack

    with pytest.raises(StackValidationError, match=r"services\.cache\.replicas"):
        validate_stack(
            [str(ROOT / "examples/demo/stack.yaml")],
            overrides=["services.cache.replicas=many"],
            verify=False,
        )
