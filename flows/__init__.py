"""Prefect flows: each reads like the runbook it replaces; decisions come from `hxp`."""
