"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.peers import Nbdkit


@pytest.fixture
def nbdkit() -> Iterator[list[Nbdkit]]:
    started: list[Nbdkit] = []
    yield started
    for server in started:
        server.kill()
