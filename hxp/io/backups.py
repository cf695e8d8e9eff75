"""Backups of the files hxp overwrites (service config files, the gateway's nginx.conf,
monitoring files, applied stack files), so `hxp config restore` can bring one back.

Each backup is a folder STATE/backups/<stack>/<id>/ (mode 0700) holding `file` (the old
content, its mode kept) and `meta.json` (original path, reason, time). Only the newest
KEEP_PER_PATH backups of a path are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

KEEP_PER_PATH = 20


@dataclass(frozen=True)
class Backup:
    """One kept version of a file."""

    id: str
    stack: str
    path: str  # where the file lived (and goes back to)
    stored: Path
    reason: str
    at: float
    size: int


def _root(state_dir: str | Path, stack: str) -> Path:
    return Path(state_dir) / "backups" / stack


def _new_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def backup_file(state_dir: str | Path, stack: str, path: str | Path, reason: str) -> Backup | None:
    """Keep a copy of `path` before it is overwritten; None when there is no file yet."""
    source = Path(path)
    if not source.is_file():
        return None
    folder = _root(state_dir, stack) / _new_id()
    folder.mkdir(parents=True, mode=0o700)
    shutil.copy2(source, folder / "file")
    at = time.time()
    original = str(source.resolve())
    meta = {"path": original, "reason": reason, "at": at}
    (folder / "meta.json").write_text(json.dumps(meta, sort_keys=True))
    _prune(state_dir, stack, original)
    return Backup(folder.name, stack, original, folder / "file", reason, at, source.stat().st_size)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.hxp-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    tmp.replace(path)


def write_with_backup(
    state_dir: str | Path, stack: str, path: str | Path, content: str, mode: int, reason: str
) -> bool:
    """Write `content` to `path`, backing up the old file first; False when it was already so."""
    target = Path(path)
    data = content.encode()
    try:
        if target.read_bytes() == data and (target.stat().st_mode & 0o777) == mode:
            return False
    except OSError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    backup_file(state_dir, stack, target, reason)
    _atomic_write(target, data, mode)
    return True


def list_backups(state_dir: str | Path, stack: str, path: str | None = None) -> list[Backup]:
    """The stack's backups (of one path), newest first."""
    root = _root(state_dir, stack)
    if not root.is_dir():
        return []
    out: list[Backup] = []
    for folder in root.iterdir():
        try:
            meta = json.loads((folder / "meta.json").read_text())
            size = (folder / "file").stat().st_size
        except (OSError, ValueError):
            continue
        if path is not None and meta.get("path") != str(Path(path).resolve()):
            continue
        out.append(
            Backup(
                folder.name,
                stack,
                str(meta.get("path", "")),
                folder / "file",
                str(meta.get("reason", "")),
                float(meta.get("at", 0.0)),
                size,
            )
        )
    return sorted(out, key=lambda b: (b.at, b.id), reverse=True)


def restore_backup(state_dir: str | Path, stack: str, backup_id: str) -> Backup:
    """Put a backed-up file back where it was (the current file is backed up first)."""
    if "/" in backup_id or backup_id in ("", ".", ".."):
        raise FileNotFoundError(f"no backup {backup_id!r} of stack {stack!r}")
    found = [b for b in list_backups(state_dir, stack) if b.id == backup_id]
    if not found:
        raise FileNotFoundError(f"no backup {backup_id!r} of stack {stack!r}")
    chosen = found[0]
    target = Path(chosen.path)
    backup_file(state_dir, stack, target, f"before restoring backup {backup_id}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(target, chosen.stored.read_bytes(), chosen.stored.stat().st_mode & 0o777)
    return chosen


def _prune(state_dir: str | Path, stack: str, path: str) -> None:
    for old in list_backups(state_dir, stack, path)[KEEP_PER_PATH:]:
        shutil.rmtree(old.stored.parent, ignore_errors=True)
