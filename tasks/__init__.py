"""Prefect tasks: one side effect each, typed, retried only on transient errors."""
