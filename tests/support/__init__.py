"""Helpers that start real components for the integration tests (see docs/testing.md)."""
