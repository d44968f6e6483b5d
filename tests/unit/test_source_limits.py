"""The source's time limits fit the store's (issue 10, defect 3), and the operator's source id
reaches the configuration."""

from __future__ import annotations

import pytest

from lazyiscsi import config
from lazyiscsi.source import SourceConfigError, open_source
from lazyiscsi.source.base import (
    DEFAULT_REQUEST_DEADLINE,
    PATIENCE,
    Priority,
    deadline_for,
    redial_delay_cap,
)
from lazyiscsi.store.lazydisk import DEFAULT_IO_TIMEOUT


def test_the_default_deadline_fits_the_default_io_timeout() -> None:
    """A guest's read whose connection went silent is resent, and given up on with the
    source's own reason, inside the store's I/O timeout."""
    assert deadline_for(DEFAULT_IO_TIMEOUT) == DEFAULT_REQUEST_DEADLINE
    foreground = PATIENCE[Priority.FOREGROUND]
    assert foreground is not None and foreground * DEFAULT_REQUEST_DEADLINE < DEFAULT_IO_TIMEOUT
    assert PATIENCE[Priority.BACKGROUND] is None  # the copier waits for the source to return


def test_a_returning_path_is_redialled_within_half_a_deadline() -> None:
    assert redial_delay_cap(DEFAULT_REQUEST_DEADLINE) <= DEFAULT_REQUEST_DEADLINE / 2


@pytest.mark.parametrize("deadline", [0, -1.0])
def test_a_deadline_must_be_positive(deadline: float) -> None:
    with pytest.raises(SourceConfigError, match="deadline"):
        open_source("/nonexistent", deadline=deadline)


def test_source_id_in_the_configuration() -> None:
    volume = {"name": "v", "source": "/x", "cache": "/c", "target": "iqn.2026-11.t:v"}
    assert config.parse({"volume": [{**volume, "source_id": "uuid-1"}]}).volumes[0].source_id == "uuid-1"
    assert config.parse({"volume": [volume]}).volumes[0].source_id is None
    with pytest.raises(config.ConfigError, match=r"volume\[0\]\.source_id"):
        config.parse({"volume": [{**volume, "source_id": 7}]})
