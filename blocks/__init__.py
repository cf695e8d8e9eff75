"""Prefect blocks of hxp: host inventory, Grafana and registry credentials, vLLM defaults.

Register them all with `prefect block register -m blocks` (or one module, e.g.
`-m blocks.credentials`). Stack files name Secret blocks through `secret_env`.
"""

from blocks.credentials import GrafanaCredentials, RegistryCredentials
from blocks.inventory import HostInventory
from blocks.vllm import VllmDefaults

ALL_BLOCKS = (HostInventory, GrafanaCredentials, RegistryCredentials, VllmDefaults)

__all__ = [
    "ALL_BLOCKS",
    "GrafanaCredentials",
    "HostInventory",
    "RegistryCredentials",
    "VllmDefaults",
]
