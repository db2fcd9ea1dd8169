"""Fixtures of the research-harness tests: the smoke corpus prepared once per session (shared with tests/trainer)."""

from tests.trainer.conftest import smoke_data  # noqa: F401 - a fixture, used by name
