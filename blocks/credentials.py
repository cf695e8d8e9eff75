"""Credentials blocks: Grafana (dashboard pushes) and a container registry (image pulls).

Every secret is a top-level `SecretStr` field: Prefect masks those in the API and the UI, but
not a `SecretStr` nested in a list or dict (tests/flows/test_prefect_blocks.py checks).
"""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr

from blocks.inventory import DOCS_URL


class GrafanaCredentials(Block):
    """Where Grafana is and the service-account token hxp pushes dashboards with."""

    _block_type_name: ClassVar[str] = "hxp Grafana Credentials"
    _block_type_slug: ClassVar[str] = "hxp-grafana-credentials"
    _description: ClassVar[str] = "Grafana URL and service-account token for hxp dashboards."
    _documentation_url: ClassVar[HttpUrl] = DOCS_URL
    _code_example: ClassVar[str] = """\
```python
from blocks.credentials import GrafanaCredentials

grafana = GrafanaCredentials.load("BLOCK_NAME")
headers = grafana.headers()
```"""

    url: str = Field(description="Grafana base URL, e.g. http://grafana:3000.")
    token: SecretStr = Field(description="Service-account token (Editor on the dashboard folder).")
    org_id: int = Field(default=1, description="Grafana organisation the dashboards belong to.")

    def headers(self) -> dict[str, str]:
        """HTTP headers for the Grafana API."""
        return {
            "Authorization": f"Bearer {self.token.get_secret_value()}",
            "X-Grafana-Org-Id": str(self.org_id),
        }


class RegistryCredentials(Block):
    """A container registry login for Docker hosts pulling private images."""

    _block_type_name: ClassVar[str] = "hxp Registry Credentials"
    _block_type_slug: ClassVar[str] = "hxp-registry-credentials"
    _description: ClassVar[str] = "Container registry address and login for hxp Docker hosts."
    _documentation_url: ClassVar[HttpUrl] = DOCS_URL
    _code_example: ClassVar[str] = """\
```python
from blocks.credentials import RegistryCredentials

registry = RegistryCredentials.load("BLOCK_NAME")
auth = registry.auth_config()
```"""

    registry: str = Field(description="Registry host (and port), e.g. ghcr.io.")
    username: str = Field(description="Login name or robot account.")
    password: SecretStr = Field(description="Password or access token.")

    def auth_config(self) -> dict[str, str]:
        """The `auth_config` the Docker SDK takes for a pull."""
        return {
            "username": self.username,
            "password": self.password.get_secret_value(),
            "serveraddress": self.registry,
        }
