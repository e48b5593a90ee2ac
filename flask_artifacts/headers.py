"""Header values that need care: file names and dates."""

from __future__ import annotations

import unicodedata
from datetime import datetime, timezone
from urllib.parse import quote

_RFC5987_SAFE = "!#$&+-.^_`|~"


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename`` and, when needed, ``filename*``.

    gunicorn refuses header values outside Latin-1, and werkzeug passes a
    non-ASCII name through unchanged, so the UTF-8 form is built here
    (RFC 6266, RFC 8187); every browser since 2012 prefers ``filename*``.
    """
    ascii_name = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_"
        for c in unicodedata.normalize("NFKD", filename)
        if not unicodedata.combining(c)
    )
    value = f'attachment; filename="{ascii_name}"'
    if ascii_name != filename:
        value += f"; filename*=UTF-8''{quote(filename, safe=_RFC5987_SAFE)}"
    return value


def iso_utc(mtime_ns: int) -> str:
    """ISO 8601 in UTC with a ``Z``, to the second."""
    moment = datetime.fromtimestamp(mtime_ns // 1_000_000_000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
