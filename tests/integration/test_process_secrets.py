"""Secrets on the process backend, with real processes: the value reaches the program's
environment through a 0600 file, and nowhere else under the state directory."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import httpx
import pytest

from hxp.backends.base import Commit, Create, Remove, Restore, UnitRef, Update
from hxp.backends.process import ProcessBackend
from hxp.backends.supervisor import SECRETS_FILE
from hxp.errors import BackendError
from hxp.units import UnitInstance, expand_units
from tests.support.secret_stack import TOKEN, files_containing, secret_stack
from tests.support.stacks import free_port


def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def api(tmp_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    (unit,) = expand_units(secret_stack(port), {"api"})
    backend = ProcessBackend(tmp_path / "state")
    yield unit, backend, port
    for name in backend.observe("sec"):
        backend.apply(Remove(UnitRef("sec", name, name)))


def test_the_secret_reaches_the_program_and_only_a_0600_file(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    unit, backend, port = api
    backend.apply(Create(unit, "h1", 1, {"HF_TOKEN": TOKEN}))
    wait_for(lambda: serving(port))  # the program checked the value's digest
    directory = tmp_path / "state" / "process" / "sec" / "api"
    assert mode(directory) == 0o700
    assert mode(directory / "spec.json") == 0o600
    assert mode(directory / SECRETS_FILE) == 0o600
    assert (directory / SECRETS_FILE).read_text() == f"HF_TOKEN={TOKEN}\n"
    assert files_containing(tmp_path, TOKEN) == [f"state/process/sec/api/{SECRETS_FILE}"]
    assert TOKEN not in "\n".join(backend.logs(UnitRef.of(unit)))


def test_update_keeps_the_old_secret_for_restore_and_remove_deletes_it(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    unit, backend, port = api
    ref = UnitRef.of(unit)
    backend.apply(Create(unit, "h1", 1, {"HF_TOKEN": TOKEN}))
    wait_for(lambda: serving(port))
    backend.apply(Update(unit, "h2", 2, {"HF_TOKEN": "another"}))  # the new version rejects it
    directory = tmp_path / "state" / "process" / "sec" / "api"
    assert (directory / "previous" / SECRETS_FILE).read_text() == f"HF_TOKEN={TOKEN}\n"
    assert mode(directory / "previous" / SECRETS_FILE) == 0o600
    wait_for(lambda: not backend.observe("sec")["api"].running or serving(port), 5)
    assert not serving(port)
    backend.apply(Restore(ref))
    wait_for(lambda: serving(port))
    assert (directory / SECRETS_FILE).read_text() == f"HF_TOKEN={TOKEN}\n"
    backend.apply(Commit(ref))
    backend.apply(Remove(ref))
    assert files_containing(tmp_path, TOKEN) == []


def test_a_secret_without_a_value_is_refused_before_anything_starts(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    unit, backend, _ = api
    with pytest.raises(BackendError, match=r"secret_env \['HF_TOKEN'\] has no value"):
        backend.apply(Create(unit, "h1", 1))
    assert backend.observe("sec") == {}


def test_a_value_with_a_newline_is_refused_without_showing_it(api) -> None:  # type: ignore[no-untyped-def]
    unit, backend, _ = api
    with pytest.raises(BackendError, match="HF_TOKEN contains a newline") as info:
        backend.apply(Create(unit, "h1", 1, {"HF_TOKEN": "line1\nline2"}))
    assert "line1" not in str(info.value)


def test_secrets_never_show_in_an_actions_repr(api) -> None:  # type: ignore[no-untyped-def]
    unit, _, _ = api
    action: UnitInstance | Create = Create(unit, "h1", 1, {"HF_TOKEN": TOKEN})
    assert TOKEN not in repr(action)
    assert TOKEN not in repr(Update(unit, "h1", 1, {"HF_TOKEN": TOKEN}))
