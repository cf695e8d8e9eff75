"""Every broken stack file in tests/data/bad is rejected by `hxp validate` with exit 2.

Each file is broken in exactly one way. Its first lines say what stderr must contain
(`# expect: <substring>`, one per line: the field path, or the file name for file-level errors);
files that cannot carry a comment (empty, not UTF-8) are listed in expectations.yaml.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hxp_cli import main

BAD_DIR = Path(__file__).resolve().parents[1] / "data" / "bad"
BAD_FILES = sorted(BAD_DIR.glob("[0-9][0-9]-*.yaml"))
EXPECT_RE = re.compile(r"^# expect: (.+)$")
# Raw control characters (other than the newline between lines) must never reach the terminal.
CONTROL_RE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


def _clean_environ() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HXP__") and k not in ("HXP_DEBUG", "HXP_STACK_FILE")
    }


@pytest.fixture(autouse=True)
def _no_hxp_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Overrides or HXP_DEBUG in the caller's environment must not change the outcome."""
    for key in set(os.environ) - set(_clean_environ()):
        monkeypatch.delenv(key)


def _expectations(path: Path) -> list[str]:
    table = yaml.safe_load((BAD_DIR / "expectations.yaml").read_text())
    if path.name in table:
        return list(table[path.name])
    expects = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = EXPECT_RE.match(line)
        if m is None:
            break
        expects.append(m.group(1))
    return expects


def _validate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["validate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_corpus_is_big_enough() -> None:
    assert len(BAD_FILES) >= 30


def test_every_bad_file_has_an_expectation() -> None:
    assert [p.name for p in BAD_FILES if not _expectations(p)] == []
    table = yaml.safe_load((BAD_DIR / "expectations.yaml").read_text())
    assert sorted(table) == sorted(set(table) & {p.name for p in BAD_FILES})


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.name for p in BAD_FILES])
def test_bad_file_exits_2_with_a_clear_message(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _validate(capsys, "-f", str(path))
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert err.startswith("error:"), err
    assert "Traceback" not in out + err
    assert "internal error" not in err
    # One `error:` per line: a hostile key or value cannot forge or hide lines.
    assert all(line.startswith("error:") for line in err.splitlines()), err
    assert not CONTROL_RE.search(err), repr(err)
    for expected in _expectations(path):
        assert expected in err, f"{expected!r} not in stderr:\n{err}"


def test_file_over_the_size_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "huge-stack.yaml"
    padding = "# " + "x" * 1021 + "\n"  # 1 KiB per line
    path.write_text("stack: demo\nhosts:\n  local: {backend: process}\n" + padding * (5 * 1024))
    assert path.stat().st_size > 5 * 1024 * 1024
    code, out, err = _validate(capsys, "-f", str(path))
    assert code == 2
    assert err.startswith("error:")
    assert "huge-stack.yaml" in err
    assert "too large" in err
    assert "Traceback" not in out + err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "no-such-stack.yaml"
    code, out, err = _validate(capsys, "-f", str(path))
    assert code == 2
    assert err.startswith("error:")
    assert "no-such-stack.yaml" in err
    assert "Traceback" not in out + err


def test_real_entry_point_exits_2_without_traceback() -> None:
    path = BAD_DIR / "18-cycle-three.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "hxp_cli", "validate", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=_clean_environ(),
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:")
    assert "a -> b -> c -> a" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    path = BAD_DIR / "29-duration-word.yaml"
    code = main(["--debug", "validate", "-f", str(path)])
    _, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" in err
    assert "services.cache.health.interval" in err


def test_binary_file_exits_2_from_the_installed_script(tmp_path: Path) -> None:
    """A file with NUL bytes (here a stack file saved as UTF-16, which is also valid UTF-8)
    is bad input like any other: exit 2, the file named, no traceback."""
    path = tmp_path / "utf16-stack.yaml"
    path.write_bytes("stack: demo\nhosts: {local: {backend: process}}\n".encode("utf-16-le"))
    script = Path(sys.executable).parent / "hxp"
    proc = subprocess.run(
        [str(script), "validate", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=_clean_environ(),
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {path}:1 "), proc.stderr
    assert "not a text file" in proc.stderr
    assert "internal error" not in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
