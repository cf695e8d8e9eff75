"""The secrets resolver: Prefect Secret blocks first, then files only their owner may read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hxp.errors import SecretError
from hxp.spec import ServiceSpec
from tasks.secrets import (
    SecretResolver,
    SecretsDirectory,
    SecretsEnvFile,
    default_resolver,
    resolve_unit_secrets,
)

TOKEN = "hf_s3cr3t-Value/with=signs and spaces"


def private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


class Fixed:
    """A secret source with fixed contents (what a Prefect server would hold)."""

    description = "fixed"

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.asked: list[str] = []

    def get(self, name: str) -> str | None:
        self.asked.append(name)
        return self.values.get(name)


def test_a_value_file_in_the_state_dir(tmp_path: Path) -> None:
    private(tmp_path / "secrets" / "hf-token", TOKEN + "\n")
    assert SecretsDirectory(tmp_path / "secrets").get("hf-token") == TOKEN
    assert SecretsDirectory(tmp_path / "secrets").get("other") is None


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o666, 0o660])
def test_a_file_others_may_read_is_refused_without_showing_the_value(
    tmp_path: Path, mode: int
) -> None:
    path = private(tmp_path / "secrets" / "hf-token", TOKEN, mode)
    with pytest.raises(SecretError) as info:
        SecretsDirectory(tmp_path / "secrets").get("hf-token")
    assert f"mode {mode:04o}" in str(info.value)
    assert f"chmod 600 {path}" in str(info.value)
    assert TOKEN not in str(info.value)


def test_a_directory_in_place_of_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secrets" / "hf-token").mkdir(parents=True)
    with pytest.raises(SecretError, match="not a regular file"):
        SecretsDirectory(tmp_path / "secrets").get("hf-token")


def test_the_secrets_env_file(tmp_path: Path) -> None:
    path = private(
        tmp_path / "secrets.env",
        f"# comment\n\nhf-token={TOKEN}\npostgres-password=pw=with=equals\r\n",
    )
    source = SecretsEnvFile(path)
    assert source.get("hf-token") == TOKEN
    assert source.get("postgres-password") == "pw=with=equals"
    assert source.get("missing") is None
    path.chmod(0o644)
    with pytest.raises(SecretError, match=r"mode 0644"):
        source.get("hf-token")


def test_a_bad_line_and_a_missing_env_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match=r"does not exist"):
        SecretsEnvFile(tmp_path / "nope").get("x")
    path = private(tmp_path / "secrets.env", "hf_a_token_pasted_without_a_name\n")
    with pytest.raises(SecretError, match=r"secrets\.env:1: expected name=value") as info:
        SecretsEnvFile(path).get("x")
    assert "hf_a_token" not in str(info.value)


def test_sources_are_asked_in_order_and_a_miss_names_every_place(tmp_path: Path) -> None:
    first, second = Fixed({}), Fixed({"hf-token": "from-second"})
    resolver = SecretResolver([first, second])
    assert resolver.resolve("hf-token") == "from-second"
    assert first.asked == ["hf-token"]
    with pytest.raises(SecretError, match=r"secret 'nope' not found \(looked in: fixed, fixed\)"):
        resolver.resolve("nope")
    with pytest.raises(SecretError, match="invalid secret name"):
        resolver.resolve("../etc/passwd")


def test_default_resolver_without_a_prefect_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.secrets

    monkeypatch.setattr(tasks.secrets, "prefect_api_configured", lambda: False)
    env_file = private(tmp_path / "env", "hf-token=from-env-file\n")
    private(tmp_path / "state" / "secrets" / "hf-token", "from-state-dir")
    private(tmp_path / "state" / "secrets" / "db-password", "db")
    resolver = default_resolver(tmp_path / "state", {"HXP_SECRETS_FILE": str(env_file)})
    assert [s.description for s in resolver.sources] == [
        f"HXP_SECRETS_FILE ({env_file})",
        f"file {tmp_path / 'state' / 'secrets'}/<name>",
    ]
    assert resolver.resolve("hf-token") == "from-env-file"
    assert resolver.resolve("db-password") == "db"
    only_state = default_resolver(tmp_path / "state", {})
    assert only_state.resolve("hf-token") == "from-state-dir"


def test_unit_secrets_name_the_field_at_fault(tmp_path: Path) -> None:
    spec = ServiceSpec(host="h", command=["x"], secret_env={"HF_TOKEN": "hf-token", "B": "b"})
    resolver = SecretResolver([Fixed({"hf-token": TOKEN})])
    with pytest.raises(SecretError, match=r"^services\.api\.secret_env\.B: secret 'b' not found"):
        resolve_unit_secrets(spec, resolver, "services.api")
    resolver = SecretResolver([Fixed({"hf-token": TOKEN, "b": "bee"})])
    assert resolve_unit_secrets(spec, resolver, "services.api") == {"HF_TOKEN": TOKEN, "B": "bee"}


def test_a_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to give a file away")
    path = private(tmp_path / "secrets" / "x", "v")
    os.chown(path, 4242, 4242)
    with pytest.raises(SecretError, match="owned by uid 4242"):
        SecretsDirectory(tmp_path / "secrets").get("x")


@pytest.mark.slow
def test_prefect_secret_blocks_come_first(prefect_server: str, tmp_path: Path) -> None:
    from prefect.blocks.system import Secret

    Secret(value=TOKEN).save("hxp-test-hf-token", overwrite=True)
    private(tmp_path / "secrets" / "hxp-test-hf-token", "from-file")
    private(tmp_path / "secrets" / "only-in-a-file", "from-file")
    resolver = default_resolver(tmp_path, {})
    assert resolver.sources[0].description == "Prefect Secret block"
    assert resolver.resolve("hxp-test-hf-token") == TOKEN
    assert resolver.resolve("only-in-a-file") == "from-file"
