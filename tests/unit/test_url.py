"""What may be shown of a source URL (redact), which URLs deserve a warning on a command line
(has_secret), and which are refused before anything is opened (check). Issue 14, finding 7."""

from __future__ import annotations

import pytest

from lazyiscsi.source.url import check, has_secret, redact


@pytest.mark.parametrize(("url", "shown"), [
    ("http://op:s3cret@host/disk", "http://op:***@host/disk"),
    ("https://op@host:8443/disk", "https://op@host:8443/disk"),
    ("nbd://host/export", "nbd://host/export"),
    ("nbd+unix:///disk?socket=/run/nbd.sock", "nbd+unix:///disk?socket=***"),
    ("https://host/d?X-Amz-Signature=abc&part=1&token=t0k", "https://host/d?X-Amz-Signature=***&part=***&token=***"),
    ("https://acct.blob/c/d?sv=2020&sig=abc", "https://acct.blob/c/d?sv=***&sig=***"),
    ("nbds://host/e?tls-psk-file=/k&password=pw", "nbds://host/e?tls-psk-file=***&password=***"),
    # keys no list of secret names would hold: every value is hidden
    ("https://h/d?pass=p1&passwd=p2&pwd=p3&auth=p4&x-custom=p5", "https://h/d?pass=***&passwd=***&pwd=***"
                                                                 "&auth=***&x-custom=***"),
    ("https://h/d?flag&empty=", "https://h/d?flag&empty="),
    ("https://h/d#access_token=t", "https://h/d#***"),
    ("/var/lib/img?x=1", "/var/lib/img?x=1"),  # a plain path, not a URL
    ("http://[::1", "<unparsable URL>"),
])
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


@pytest.mark.parametrize(("url", "secret"), [
    ("http://op:pw@host/disk", True),
    ("http://op:@host/disk", True),
    ("http://op@host/disk", False),
    ("https://host/d?X-Amz-Signature=abc", True),
    ("https://host/d?pwd=abc", True),
    ("https://host/d?part=1", False),
    ("nbd+unix:///disk?socket=/run/nbd.sock", False),
    ("/plain/path:with@signs", False),
])
def test_has_secret(url: str, secret: bool) -> None:
    assert has_secret(url) is secret


@pytest.mark.parametrize(("url", "reason"), [
    ("http://[::1", "Invalid IPv6 URL"),
    ("nbd://host:99999/x", "out of range"),
    ("nbd://host:port/x", "not a valid URL"),
    ("://host/x", "no scheme"),
    ("", "empty"),
])
def test_check_refuses_unparsable_urls(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check(url)


@pytest.mark.parametrize("url", ["http://[::1]:8080/d", "nbd://h/e", "/a/path", "file:///x"])
def test_check_accepts(url: str) -> None:
    check(url)
