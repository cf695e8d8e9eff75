"""hxp's Prefect blocks: Prefect's block standards suite over each, secrets only where Prefect
masks them, and no secret value coming back through the API."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import BaseModel, SecretStr

from blocks import (
    ALL_BLOCKS,
    GrafanaCredentials,
    HostInventory,
    RegistryCredentials,
    VllmDefaults,
)
from hxp.spec import GpuSpec, HostSpec

GRAFANA_TOKEN = "glsa_grafana-token-that-must-not-leak"
REGISTRY_PASSWORD = "registry-password-that-must-not-leak"
HF_TOKEN = "hf_token-that-must-not-leak"


class TestBlockStandards(BlockStandardTestSuite):
    """Description, documentation URL, a described field each, a code example with `.load`."""

    @pytest.fixture(params=ALL_BLOCKS, ids=lambda b: b.__name__)
    def block(self, request: pytest.FixtureRequest) -> type[Block]:
        return typing.cast(type[Block], request.param)


def _walk(annotation: Any) -> Iterator[Any]:
    yield annotation
    for arg in typing.get_args(annotation):
        yield from _walk(arg)


def _nested_secrets(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Paths of SecretStr fields below the top level or inside a list or dict (Prefect masks
    only a top-level `SecretStr` or `SecretStr | None`)."""
    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        direct = {annotation}
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            direct.update(typing.get_args(annotation))
        for t in _walk(annotation):
            if t is SecretStr and (prefix or t not in direct):
                found.append(prefix + name)
            if isinstance(t, type) and issubclass(t, BaseModel):
                found.extend(_nested_secrets(t, f"{prefix}{name}."))
    return found


def test_the_secret_check_finds_a_secret_in_a_list() -> None:
    class Login(BaseModel):
        password: SecretStr

    class Leaky(BaseModel):
        logins: list[Login]
        tokens: dict[str, SecretStr]
        fine: SecretStr | None = None

    assert _nested_secrets(Leaky) == ["logins.password", "tokens"]


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.__name__)
def test_secrets_are_top_level_fields(block: type[Block]) -> None:
    assert _nested_secrets(block) == []


def test_inventory_gives_a_stack_its_hosts() -> None:
    inventory = HostInventory(
        hosts={
            "gpu-01": HostSpec(
                backend="systemd",
                address="10.0.0.11",
                runner="ssh",
                ssh_user="hxp",
                work_pool="hxp-gpu-01",
                gpus=[GpuSpec(index=0, memory_gib=80)],
            ),
            "local": HostSpec(),
        }
    )
    assert inventory.stack_hosts()["gpu-01"]["work_pool"] == "hxp-gpu-01"
    assert inventory.stack_hosts()["local"] == {}
    assert inventory.pools() == {"gpu-01": "hxp-gpu-01"}
    assert VllmDefaults(vllm={"max_model_len": 8192}).overrides(["chat"]) == [
        "models.chat.vllm.max_model_len=8192"
    ]


def _saved() -> dict[str, tuple[Block, str]]:
    return {
        "hxp-test-grafana": (
            GrafanaCredentials(url="http://127.0.0.1:3000", token=GRAFANA_TOKEN),
            GRAFANA_TOKEN,
        ),
        "hxp-test-registry": (
            RegistryCredentials(registry="ghcr.io", username="ci", password=REGISTRY_PASSWORD),
            REGISTRY_PASSWORD,
        ),
        "hxp-test-vllm": (VllmDefaults(hf_token=HF_TOKEN), HF_TOKEN),
    }


@pytest.mark.slow
def test_no_secret_comes_back_through_the_api(prefect_server: str) -> None:
    from prefect import get_client

    saved = _saved()
    for name, (block, _) in saved.items():
        block.save(name, overwrite=True)
    HostInventory(hosts={"local": HostSpec()}).save("hxp-test-hosts", overwrite=True)
    with get_client(sync_client=True) as client:
        for name, (block, secret) in saved.items():
            slug = block.get_block_type_slug()
            document = client.read_block_document_by_name(name, slug, include_secrets=False)
            assert secret not in repr(document.data)
            rest: Any = httpx.get(f"{prefect_server}/block_documents/{document.id}", timeout=10)
            assert rest.status_code == 200
            assert secret not in rest.text
            listed = httpx.post(f"{prefect_server}/block_documents/filter", json={}, timeout=10)
            assert secret not in listed.text
            # The owner of the block still gets the value back through `load`.
            loaded: Any = type(block).load(name)
            field = {"hxp-test-grafana": "token", "hxp-test-registry": "password"}.get(
                name, "hf_token"
            )
            assert getattr(loaded, field).get_secret_value() == secret
    assert HostInventory.load("hxp-test-hosts").hosts["local"] == HostSpec()
