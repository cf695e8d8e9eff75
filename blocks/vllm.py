"""`hxp vLLM Defaults`: fleet-wide vLLM engine settings and the Hugging Face token."""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr

from blocks.inventory import DOCS_URL
from hxp.spec import VllmSpec


class VllmDefaults(Block):
    """vLLM settings every model starts from; a stack's `models.<m>.vllm` overrides them."""

    _block_type_name: ClassVar[str] = "hxp vLLM Defaults"
    _block_type_slug: ClassVar[str] = "hxp-vllm-defaults"
    _description: ClassVar[str] = "Fleet-wide vLLM engine defaults and Hugging Face token."
    _documentation_url: ClassVar[HttpUrl] = DOCS_URL
    _code_example: ClassVar[str] = """\
```python
from blocks.vllm import VllmDefaults

defaults = VllmDefaults.load("BLOCK_NAME")
overrides = defaults.overrides(["chat"])
```"""

    vllm: VllmSpec = Field(
        default_factory=VllmSpec,
        description="Engine settings in the stack file's `models.<m>.vllm` format.",
    )
    hf_token: SecretStr | None = Field(
        default=None, description="Hugging Face token for gated models (masked by Prefect)."
    )

    def overrides(self, models: list[str]) -> list[str]:
        """`--set` overrides giving these models the defaults (the non-default ones only)."""
        values = self.vllm.model_dump(mode="json", exclude_defaults=True)
        out = []
        for model in models:
            for key, value in sorted(values.items()):
                if isinstance(value, list):
                    continue  # extra_args cannot be said as one override
                out.append(f"models.{model}.vllm.{key}={value}")
        return out
