"""Source URLs: the one place that knows how to remove a password from one."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

#: query parameters whose values are credentials: passwords, API tokens, TLS keys, and the
#: signatures of presigned object-store URLs (S3 X-Amz-Signature/Credential, Azure SAS sig)
_SECRET_WORDS = ("password", "secret", "token", "key", "psk", "signature", "credential", "sig")


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``; the user name is kept (it helps an
    operator and is not a secret). Query parameters named like secrets are masked too."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = parts.query
    if query:
        masked = []
        for item in query.split("&"):
            key, sep, _value = item.partition("=")
            if sep and any(w in key.lower() for w in _SECRET_WORDS):
                masked.append(f"{key}=***")
            else:
                masked.append(item)
        query = "&".join(masked)
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing to hide: keep it as written (urlunsplit drops "//" of an empty host)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
