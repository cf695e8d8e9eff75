"""`hxp Host Inventory`: the fleet's machines (addresses, backend, runner, GPUs, work pool) in
one place that every stack and flow can load, instead of a `hosts:` section copied per stack."""

from __future__ import annotations

from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl

from hxp.spec import HostSpec

# The project has no public home yet: its block docs are docs/prefect.md#blocks in the checkout.
DOCS_URL = HttpUrl("https://docs.prefect.io/v3/concepts/blocks")


class HostInventory(Block):
    """The hosts of a fleet, keyed by name, in the stack file's `hosts:` format.

    Holds no secrets: an SSH key belongs in a Secret block named by `ssh_key_block`.
    """

    _block_type_name: ClassVar[str] = "hxp Host Inventory"
    _block_type_slug: ClassVar[str] = "hxp-host-inventory"
    _description: ClassVar[str] = (
        "The fleet's hosts (address, backend, runner, GPUs, work pool) for hxp stacks."
    )
    _documentation_url: ClassVar[HttpUrl] = DOCS_URL
    _code_example: ClassVar[str] = """\
```python
from blocks.inventory import HostInventory

inventory = HostInventory.load("BLOCK_NAME")
stack_data = {"hosts": inventory.stack_hosts(), **rest_of_the_stack}
```"""

    hosts: dict[str, HostSpec] = Field(
        default_factory=dict,
        description="Host name to host settings, exactly as under `hosts:` in a stack file.",
    )
    ssh_key_block: str | None = Field(
        default=None,
        description="Name of the Secret block holding the SSH private key for `ssh` hosts.",
    )

    def stack_hosts(self) -> dict[str, dict[str, Any]]:
        """The `hosts:` section of a stack file (defaults left out)."""
        return {
            name: host.model_dump(mode="json", exclude_defaults=True)
            for name, host in sorted(self.hosts.items())
        }

    def pools(self) -> dict[str, str]:
        """Host name to the work pool its worker polls, for the hosts that name one."""
        return {n: h.work_pool for n, h in sorted(self.hosts.items()) if h.work_pool}
