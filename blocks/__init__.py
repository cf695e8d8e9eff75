"""Prefect blocks (host inventory, credentials, vLLM defaults) arrive with the Prefect
integration issue; stack files name Secret blocks through `secret_env` and `secret_block`."""
