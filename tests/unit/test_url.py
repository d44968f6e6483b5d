"""redact(): what may be shown of a source URL."""

from __future__ import annotations

import pytest

from lazyiscsi.source.url import redact


@pytest.mark.parametrize(("url", "shown"), [
    ("http://op:s3cret@host/disk", "http://op:***@host/disk"),
    ("https://op@host:8443/disk", "https://op@host:8443/disk"),
    ("nbd://host/export", "nbd://host/export"),
    ("nbd+unix:///disk?socket=/run/nbd.sock", "nbd+unix:///disk?socket=/run/nbd.sock"),
    ("https://host/d?X-Amz-Signature=abc&part=1&token=t0k", "https://host/d?X-Amz-Signature=***&part=1&token=***"),
    ("https://acct.blob/c/d?sv=2020&sig=abc", "https://acct.blob/c/d?sv=2020&sig=***"),
    ("nbds://host/e?tls-psk-file=/k&password=pw", "nbds://host/e?tls-psk-file=***&password=***"),
])
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown
