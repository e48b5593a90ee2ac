"""The CRC-32 cache: member checksums kept outside ``LOGS_DIR``.

A stored member's header carries its CRC-32, so streaming it needs the CRC
before the bytes; a range past it needs every earlier CRC without reading
those files. The cache remembers them in SQLite under
``ARTIFACTS_CACHE_DIR``, keyed by (path, size, mtime_ns, ctime_ns, inode):
any write to a file changes its ctime, so a changed file misses the cache
rather than being served with a stale CRC. A cache that cannot be opened
or written is turned off with one warning; downloads work without it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from typing import Iterable

from .jobs import Entry

logger = logging.getLogger("flask_artifacts")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checksums (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    crc32 INTEGER,
    sha256 TEXT
)
"""


def _key(entry: Entry) -> tuple[int, int, int, int]:
    dev, inode, ctime_ns = entry.identity
    return entry.size, entry.mtime_ns, ctime_ns, inode


class ChecksumCache:
    """Checksums by file identity. Safe to share between threads of a worker."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self._local = threading.local()
        self._disabled = directory is None
        self._warned = False

    def _connection(self) -> sqlite3.Connection | None:
        if self._disabled:
            return None
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                assert self.directory is not None
                os.makedirs(self.directory, exist_ok=True)
                conn = sqlite3.connect(os.path.join(self.directory, "checksums.sqlite3"),
                                       timeout=5, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=OFF")
                conn.execute(_SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                self._fail(exc)
                return None
            self._local.conn = conn
        return conn

    def _fail(self, exc: Exception) -> None:
        if not self._warned:
            logger.warning("Checksum cache in %r is off: %s. Downloads still work,"
                           " but ranges must read files again.", self.directory, exc)
            self._warned = True
        self._disabled = True

    def get(self, entries: Iterable[Entry], field: str = "crc32") -> dict[str, int | str]:
        """Known checksums of ``entries``, by locator, for files unchanged since."""
        conn = self._connection()
        entries = [e for e in entries if not e.is_dir]
        if conn is None or not entries:
            return {}
        found: dict[str, int | str] = {}
        try:
            for start in range(0, len(entries), 500):
                batch = {e.locator: e for e in entries[start:start + 500]}
                marks = ",".join("?" * len(batch))
                rows = conn.execute(
                    f"SELECT path, size, mtime_ns, ctime_ns, inode, {field}"
                    f" FROM checksums WHERE path IN ({marks})", list(batch))
                for path, size, mtime_ns, ctime_ns, inode, value in rows:
                    if value is not None and (size, mtime_ns, ctime_ns, inode) == _key(batch[path]):
                        found[path] = value
        except sqlite3.Error as exc:
            self._fail(exc)
            return {}
        return found

    def put(self, entry: Entry, *, crc32: int | None = None, sha256: str | None = None) -> None:
        conn = self._connection()
        if conn is None:
            return
        size, mtime_ns, ctime_ns, inode = _key(entry)
        try:
            conn.execute(
                "INSERT INTO checksums (path, size, mtime_ns, ctime_ns, inode, crc32, sha256)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET"
                " crc32 = CASE WHEN (size, mtime_ns, ctime_ns, inode) ="
                "   (excluded.size, excluded.mtime_ns, excluded.ctime_ns, excluded.inode)"
                "   THEN coalesce(excluded.crc32, crc32) ELSE excluded.crc32 END,"
                " sha256 = CASE WHEN (size, mtime_ns, ctime_ns, inode) ="
                "   (excluded.size, excluded.mtime_ns, excluded.ctime_ns, excluded.inode)"
                "   THEN coalesce(excluded.sha256, sha256) ELSE excluded.sha256 END,"
                " size = excluded.size, mtime_ns = excluded.mtime_ns,"
                " ctime_ns = excluded.ctime_ns, inode = excluded.inode",
                (entry.locator, size, mtime_ns, ctime_ns, inode, crc32, sha256))
        except sqlite3.Error as exc:
            self._fail(exc)
