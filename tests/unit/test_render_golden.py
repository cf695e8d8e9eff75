"""Golden-file tests: every template's output for every example, byte for byte.

The expected output lives in `tests/golden/<example>/<target>/<file>` (examples: the stacks
under examples/; targets: systemd, compose, k8s). A mismatch fails with a unified diff.

After an intended change to a template, the renderer or an example (or a version bump, since
each file's header names the hxp version), regenerate the files, review the diff and commit it:

    HXP_UPDATE_GOLDEN=1 .venv/bin/pytest -q tests/unit/test_render_golden.py
    git diff tests/golden/

With `HXP_UPDATE_GOLDEN=1` the tests rewrite the golden files (and delete stale ones) instead of
comparing.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from hxp.render import TARGETS, RenderedFile, Target, render_stack
from hxp.spec import Stack

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
UPDATE = os.environ.get("HXP_UPDATE_GOLDEN") == "1"


def _render(stack: Stack, target: Target) -> dict[str, RenderedFile]:
    files = render_stack(stack, target)
    by_path = {f.path: f for f in files}
    assert len(by_path) == len(files), f"two {target} files share a path"
    return by_path


def _update(golden_dir: Path, rendered: dict[str, RenderedFile]) -> None:
    golden_dir.mkdir(parents=True, exist_ok=True)
    for stale in golden_dir.iterdir():
        if stale.name not in rendered:
            stale.unlink()
    for path, f in rendered.items():
        (golden_dir / path).write_bytes(f.content.encode("utf-8"))


def _diff(expected: str, actual: str, name: str) -> str:
    return "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=f"golden/{name}",
            tofile=f"rendered/{name}",
        )
    )


@pytest.mark.parametrize("target", TARGETS)
def test_render_matches_golden(example: tuple[str, Stack], target: Target) -> None:
    name, stack = example
    golden_dir = GOLDEN / name / target
    rendered = _render(stack, target)
    assert rendered, f"{name} renders no {target} files"
    if UPDATE:
        _update(golden_dir, rendered)
        return
    assert golden_dir.is_dir(), (
        f"no golden files in {golden_dir}; create them with HXP_UPDATE_GOLDEN=1 (see module doc)"
    )
    expected_names = sorted(p.name for p in golden_dir.iterdir())
    assert sorted(rendered) == expected_names, (
        f"{name}/{target}: rendered files {sorted(rendered)} != golden files {expected_names} "
        "(HXP_UPDATE_GOLDEN=1 regenerates them)"
    )
    mismatches = []
    for path, f in sorted(rendered.items()):
        expected = (golden_dir / path).read_bytes()
        actual = f.content.encode("utf-8")
        if expected != actual:
            diff = _diff(expected.decode("utf-8"), f.content, f"{name}/{target}/{path}")
            mismatches.append(diff or f"{path}: differs only in bytes not shown by a line diff")
    assert not mismatches, (
        "rendered output differs from the golden files "
        "(HXP_UPDATE_GOLDEN=1 regenerates them, see module doc):\n" + "\n".join(mismatches)
    )


@pytest.mark.parametrize("target", TARGETS)
def test_golden_files_name_their_template(example: tuple[str, Stack], target: Target) -> None:
    """Each output file says which template (and version) made it."""
    _, stack = example
    for f in render_stack(stack, target):
        first = f.content.splitlines()[0]
        assert first.startswith("# Rendered by hxp "), first
        assert f"from {f.template} (template version {f.template_version})" in first
