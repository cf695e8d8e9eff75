"""Resolve the values of `secret_env`: Prefect Secret blocks, else files only their owner reads.

Where a value comes from, in order:

1. the Prefect Secret block of that name, when a Prefect API is configured;
2. `$HXP_SECRETS_FILE`: `name=value` lines (block name, not the variable), mode 0600;
3. `STATE/secrets/<name>`: the value alone (one trailing newline dropped), mode 0600.

A file that its group or others may read, or that another user owns, is refused with an error
saying how to fix it. No message of this module ever contains a secret value.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from hxp.errors import SecretError
from hxp.spec import UnitSpec

SECRETS_FILE_ENV = "HXP_SECRETS_FILE"
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class SecretSource(Protocol):
    """One place secrets may live."""

    description: str

    def get(self, name: str) -> str | None:
        """The secret called `name`, or None when this source has none by that name."""
        ...


def prefect_api_configured() -> bool:
    """Whether this process talks to a Prefect API (a server, Cloud or the test harness)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url is not None


class PrefectSecretBlocks:
    """Prefect Secret blocks (`prefect block create secret`, or `Secret(value=...).save(name)`)."""

    description = "Prefect Secret block"

    def get(self, name: str) -> str | None:
        from prefect.blocks.system import Secret

        try:
            block: Any = Secret.load(name)
        except ValueError:  # no block document by that name
            return None
        except Exception as exc:
            raise SecretError(
                f"cannot read Prefect Secret block {name!r}: {type(exc).__name__}"
            ) from None
        value = block.get()
        return value if isinstance(value, str) else json.dumps(value)


def check_private(path: Path) -> None:
    """Refuse a secrets file that is not a regular file of ours that only we can read."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise SecretError(f"{path} is not a regular file")
    if info.st_uid != os.getuid():
        raise SecretError(f"{path} is owned by uid {info.st_uid}, not by this user")
    if info.st_mode & 0o077:
        raise SecretError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):04o}: a secrets file must not be "
            f"readable by group or others (chmod 600 {path})"
        )


class SecretsEnvFile:
    """`name=value` lines in one file (`$HXP_SECRETS_FILE`); `#` starts a comment line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.description = f"{SECRETS_FILE_ENV} ({self.path})"

    def get(self, name: str) -> str | None:
        if not self.path.exists():
            raise SecretError(f"{SECRETS_FILE_ENV} names {self.path}, which does not exist")
        check_private(self.path)
        for number, line in enumerate(self.path.read_text(encoding="utf-8").split("\n"), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise SecretError(f"{self.path}:{number}: expected name=value")
            if key.strip() == name:
                return value.rstrip("\r")
        return None


class SecretsDirectory:
    """One file per secret: `STATE/secrets/<name>` holds the value."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.description = f"file {self.directory}/<name>"

    def get(self, name: str) -> str | None:
        path = self.directory / name
        if not path.exists():
            return None
        check_private(path)
        value = path.read_text(encoding="utf-8")
        return value[:-1] if value.endswith("\n") else value


class SecretResolver:
    """Asks each source in turn; a secret none has is an error naming every place looked."""

    def __init__(self, sources: list[SecretSource]) -> None:
        self.sources = sources

    def resolve(self, name: str) -> str:
        if not _NAME_RE.fullmatch(name):
            raise SecretError(f"invalid secret name {name!r}")
        for source in self.sources:
            value = source.get(name)
            if value is not None:
                return value
        where = ", ".join(s.description for s in self.sources) or "no secret source"
        raise SecretError(f"secret {name!r} not found (looked in: {where})")


def default_resolver(
    state_dir: str | Path, environ: Mapping[str, str] | None = None
) -> SecretResolver:
    """Prefect (when an API is configured), then $HXP_SECRETS_FILE, then STATE/secrets/."""
    env = os.environ if environ is None else environ
    sources: list[SecretSource] = []
    if prefect_api_configured():
        sources.append(PrefectSecretBlocks())
    if env.get(SECRETS_FILE_ENV):
        sources.append(SecretsEnvFile(env[SECRETS_FILE_ENV]))
    sources.append(SecretsDirectory(Path(state_dir) / "secrets"))
    return SecretResolver(sources)


def resolve_unit_secrets(
    spec: UnitSpec, resolver: SecretResolver, field_path: str
) -> dict[str, str]:
    """Environment variable -> value for every `secret_env` entry of a unit."""
    out: dict[str, str] = {}
    for key, block in sorted(spec.secret_env.items()):
        try:
            out[key] = resolver.resolve(block)
        except SecretError as exc:
            raise SecretError(f"{field_path}.secret_env.{key}: {exc}") from None
    return out


__all__ = [
    "PrefectSecretBlocks",
    "SecretResolver",
    "SecretSource",
    "SecretsDirectory",
    "SecretsEnvFile",
    "check_private",
    "default_resolver",
    "prefect_api_configured",
    "resolve_unit_secrets",
]
