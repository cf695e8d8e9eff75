"""A model's config.json in the Hugging Face cache on this machine (read-only, no download).

The hub cache layout: `<hub>/models--<org>--<name>/snapshots/<commit>/config.json`, with
`refs/<branch or tag>` holding the commit a name points at. The hub directory is, as the
`huggingface_hub` library resolves it: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. A model's own `env.HF_HOME`
in the stack comes first: that is where its server keeps its weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def hub_dirs(environ: Mapping[str, str], unit_env: Mapping[str, str] | None = None) -> list[Path]:
    """Hub cache directories to look in, first match wins."""
    dirs: list[Path] = []
    if unit_env and unit_env.get("HF_HOME"):
        dirs.append(Path(unit_env["HF_HOME"]) / "hub")
    if environ.get("HF_HUB_CACHE"):
        dirs.append(Path(environ["HF_HUB_CACHE"]))
    if environ.get("HF_HOME"):
        dirs.append(Path(environ["HF_HOME"]) / "hub")
    cache = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "~")) / ".cache")
    dirs.append(Path(cache).expanduser() / "huggingface" / "hub")
    return list(dict.fromkeys(dirs))


def _snapshot(repo_dir: Path, revision: str | None) -> Path | None:
    snapshots = repo_dir / "snapshots"
    name = revision or "main"
    if _COMMIT_RE.match(name) and (snapshots / name).is_dir():
        return snapshots / name
    try:
        commit = (repo_dir / "refs" / name).read_text().strip()
    except OSError:
        return None
    return snapshots / commit if _COMMIT_RE.match(commit) else None


def model_config_path(
    repo: str,
    revision: str | None,
    environ: Mapping[str, str],
    unit_env: Mapping[str, str] | None = None,
) -> tuple[Path | None, list[Path]]:
    """The cached config.json of `repo` at `revision` (default: main), or None; and the
    folders it looked in."""
    looked: list[Path] = []
    folder = "models--" + repo.replace("/", "--")
    for hub in hub_dirs(environ, unit_env):
        repo_dir = hub / folder
        looked.append(repo_dir)
        snapshot = _snapshot(repo_dir, revision)
        if snapshot is not None and (snapshot / "config.json").is_file():
            return snapshot / "config.json", looked
    return None, looked
