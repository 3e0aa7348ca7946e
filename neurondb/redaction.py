"""URLs as they may be shown: in job rows (error_message), log lines, provider errors, netguard refusals.

A URL can carry a secret in two places a reader of an error does not need: the userinfo
(`http://alice:password@host/`) and the query (`?token=...`, `?api_key=...`, signed URLs). Job rows and
logs are read by operators and possibly tenants, so every URL that reaches one goes through
`redact_url` first: the userinfo becomes `***@`, each query value becomes `***` (the keys stay, they
say what was sent), the fragment is dropped. Scheme, host, port and path stay, so the message still says
where the request went. `redact_urls` does the same to every URL inside a free text (an exception's
message that quotes one).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
_URL_IN_TEXT = re.compile(r"(?i)\b[a-z][a-z0-9+.\-]*://[^\s'\"<>`]+")
_USERINFO = re.compile(r"^[^/?#]*@")        # "user:pw@" at the start of a URL without "//" (no netloc)
_AFTER_HOST = re.compile(r"[?#].*$", re.DOTALL)


def _mask_query(query: str) -> str:
    """Each `key=value` as `key=***`; a bare item (`?token`) may itself be the secret: `***`."""
    items = []
    for item in query.split("&"):
        key, eq, _ = item.partition("=")
        items.append(f"{key}={MASK}" if eq else (MASK if item else item))
    return "&".join(items)


def redact_url(url: str) -> str:
    """`url` with userinfo and query values masked and no fragment; see the module docstring."""
    try:
        parts = urlsplit(url)
    except ValueError:      # e.g. an unclosed IPv6 bracket: mask by pattern, keep nothing after the host
        head = _AFTER_HOST.sub("", url)
        scheme, sep, rest = head.partition("://")
        if sep:
            return f"{scheme}://{MASK}@{rest.rpartition('@')[2]}" if "@" in rest else head
        return _USERINFO.sub(f"{MASK}@", head)
    if not parts.netloc:
        return _USERINFO.sub(f"{MASK}@", urlunsplit((parts.scheme, "", parts.path, _mask_query(parts.query), "")))
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = _mask_query(parts.query) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_urls(text: str) -> str:
    """`text` with every URL in it (scheme://...) passed through redact_url."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def shown(value: object, limit: int = 60) -> str:
    """`value` as an error message quotes it: its repr, cut to `limit` characters. A payload can hold a
    megabyte string or a 400-digit number (jsonb keeps what a double cannot); the message stays a line."""
    return shorten(repr(value), limit)


def shorten(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters (with "..."), control characters as spaces: a value quoted in a
    one-line error message must keep it one line and readable."""
    flat = "".join(" " if ch < " " or ch == "\x7f" else ch for ch in text)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
