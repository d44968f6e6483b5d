"""Source URLs: the one place that knows what of a URL may be shown, and whether it is well formed.

What is hidden: the password of the userinfo, every query value and the fragment. Query keys
differ per server and per object store (S3 ``X-Amz-Signature``, Azure ``sig``, private
``auth=``/``pwd=``...): a list of known secret names always misses one, so no value is shown
(an ``nbd+unix`` socket path included: the operator knows where it is).
"""

from __future__ import annotations

from urllib.parse import urlsplit

#: query keys whose values are credentials on sight: what makes a URL given on the command
#: line worth a warning (passwords, API tokens, TLS keys, presigned-URL signatures); redaction
#: itself does not depend on this list, it hides every value
_SECRET_WORDS = ("pass", "pwd", "secret", "token", "key", "psk", "signature", "credential", "sig", "auth")

HIDDEN = "***"


def is_url(text: str) -> bool:
    """A URL, as opposed to a plain path (which ``open_source`` takes as a file)."""
    return "://" in text


def redact(url: str) -> str:
    """The URL with its password, every query value and the fragment replaced by ``***``; the
    user name is kept (it helps an operator and is not a secret). A plain path is shown whole."""
    if not is_url(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{HIDDEN}@{host}" if ":" in userinfo else f"{user}@{host}"
    query = "&".join(_hide_value(item) for item in parts.query.split("&")) if parts.query else ""
    fragment = HIDDEN if parts.fragment else ""
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return url  # nothing to hide: keep it as written
    # joined by hand: urlunsplit drops the "//" of an empty host (nbd+unix:///export)
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{fragment}" if fragment else ""))


def _hide_value(item: str) -> str:
    key, sep, value = item.partition("=")
    return f"{key}={HIDDEN}" if sep and value else item


def has_secret(url: str) -> bool:
    """Whether the URL carries a credential: a userinfo password or a query key named like one
    (then it should not be on a command line, where every local user can read it)."""
    if not is_url(url):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if parts.password is not None:
        return True
    keys = (item.partition("=")[0].lower() for item in parts.query.split("&") if "=" in item)
    return any(word in key for key in keys for word in _SECRET_WORDS)


def check(url: str) -> None:
    """Raise ValueError naming the fault when ``url`` cannot even be parsed (an unclosed IPv6
    bracket, a port that is not a number from 0 to 65535), before anything is opened. The
    message shows no part of the URL that could be secret."""
    if not url:
        raise ValueError("empty")
    if not is_url(url):
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- parsing the port is what raises for a bad one
    except ValueError as e:
        raise ValueError(f"not a valid URL ({e})") from None
    if not parts.scheme:
        raise ValueError("not a valid URL (no scheme before ://)")
