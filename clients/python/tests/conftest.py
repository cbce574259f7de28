"""Shared pieces of the package's tests.

The integration tests (marked `integration`) run against a service whose address is in
CLEANROOM_TEST_ADDR, as tests/deploy/serve_in_netns.sh sets it; without it they are skipped.
See tests/test_integration.py for the other variables."""

from __future__ import annotations

from pathlib import Path

import pytest

#: The repository holding this package (clients/python/tests/ -> the root).
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def repo() -> Path:
    return REPO
