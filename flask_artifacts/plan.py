"""The archive plan: which members, in which order, stored or deflated, and where.

A :class:`Plan` is made in the view from a listing alone (names, sizes,
times, checksums the storage already knows), before the first byte. The
stream, ``Content-Length``, ``HEAD``, the ``ETag`` and ``Range`` all read the
same plan, so they cannot disagree.

The sizes are those of stream-zip 0.0.83 with extended timestamps, for
stored members given their size and CRC-32 up front: no data descriptor,
and a ZIP64 extra only on members that need it. ``tests/test_plan.py``
checks every formula here against stream-zip's real output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from datetime import datetime, timezone
from typing import Iterable, Mapping, Sequence

from .jobs import Entry

STORE = "store"
DEFLATE = "deflate"

#: Bumped whenever the bytes of an archive for the same files would change,
#: so that no client resumes across two layouts.
LAYOUT_VERSION = "fa1"

FILE_MODE = 0o100644
DIR_MODE = 0o040755

ZIP32_LIMIT = 0xFFFFFFFF
ZIP32_MAX_MEMBERS = 0xFFFF
#: stream-zip's bound for a deflated member that still fits ZIP32.
DEFLATE32_LIMIT = 4293656841

#: Oldest and newest times a member can carry: MS-DOS dates start in 1980,
#: and the extended timestamp is a signed 32-bit count of seconds.
MIN_TIME = int(datetime(1980, 1, 1, tzinfo=timezone.utc).timestamp())
MAX_TIME = 2**31 - 1

_UT_EXTRA = 9
_LOCAL = 30
_CENTRAL = 46
_ZIP64_LOCAL_EXTRA = 20
_ZIP64_CENTRAL_EXTRA = 28
_END = 22
_ZIP64_END = 56 + 20


def zip_time(mtime_ns: int) -> datetime:
    """A member's time, clamped into what the ZIP fields can hold (UTC)."""
    seconds = min(max(mtime_ns // 1_000_000_000, MIN_TIME), MAX_TIME)
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


@dataclasses.dataclass(frozen=True)
class Member:
    #: Name inside the archive (``job_abc/checkpoint-10/config.json``).
    name: str
    entry: Entry
    modified: datetime
    zip64: bool
    #: Offset of the local header, or -1 in a deflated archive.
    offset: int
    #: CRC-32 known before streaming (cache or storage), else None.
    crc: int | None
    #: Read only the listed prefix of a file that may still grow (a log).
    allow_growth: bool = False

    @property
    def name_bytes(self) -> bytes:
        return self.name.encode("utf-8")

    @property
    def header_size(self) -> int:
        return _LOCAL + len(self.name_bytes) + _UT_EXTRA + (_ZIP64_LOCAL_EXTRA if self.zip64 else 0)

    @property
    def data_offset(self) -> int:
        return self.offset + self.header_size

    @property
    def end(self) -> int:
        return self.data_offset + self.entry.size

    @property
    def mode(self) -> int:
        return DIR_MODE if self.entry.is_dir else FILE_MODE


@dataclasses.dataclass(frozen=True)
class Plan:
    members: tuple[Member, ...]
    method: str
    filename: str
    #: Exact archive size (stored archives), or None (deflated: not known ahead).
    size: int | None
    central_offset: int | None
    etag: str
    last_modified: datetime

    @property
    def stored(self) -> bool:
        return self.method == STORE

    @property
    def zip64_end(self) -> bool:
        return any(m.zip64 for m in self.members)

    def central_directory(self, crcs: Sequence[int]) -> bytes:
        """The central directory and end records, for serving a range of them.

        A full download takes these bytes from stream-zip itself; this is
        the same layout, built without streaming the members first.
        """
        assert self.stored and self.central_offset is not None
        parts = []
        for member, crc in zip(self.members, crcs):
            name = member.name_bytes
            ut = _ut_extra(member.modified)
            external = (member.mode << 16) | (0x10 if member.entry.is_dir else 0)
            if member.zip64:
                extra = struct.pack("<2sHQQQ", b"\x01\x00", 24, member.entry.size,
                                    member.entry.size, member.offset) + ut
                sizes = (ZIP32_LIMIT, ZIP32_LIMIT)
                version, offset = 45, ZIP32_LIMIT
            else:
                extra = ut
                sizes = (member.entry.size, member.entry.size)
                version, offset = 20, member.offset
            parts.append(b"PK\x01\x02" + struct.pack(
                "<BBBBHH4sIIIHHHHHII", version, 3, version, 0, 0x800, 0,
                _dos_time(member.modified), crc, sizes[0], sizes[1], len(name),
                len(extra), 0, 0, 0, external, offset,
            ) + name + extra)
        directory = b"".join(parts)
        count = len(self.members)
        start = self.central_offset
        if self.zip64_end:
            end = (
                b"PK\x06\x06" + struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, count, count,
                                            len(directory), start)
                + b"PK\x06\x07" + struct.pack("<IQI", 0, start + len(directory), 1)
                + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF,
                                              ZIP32_LIMIT, ZIP32_LIMIT, 0)
            )
        else:
            end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, count, count,
                                              len(directory), start, 0)
        return directory + end


def _dos_time(t: datetime) -> bytes:
    return struct.pack("<HH", t.second // 2 | t.minute << 5 | t.hour << 11,
                       t.day | t.month << 5 | (t.year - 1980) << 9)


def _ut_extra(t: datetime) -> bytes:
    return struct.pack("<2sH1sl", b"UT", 5, b"\x01", int(t.timestamp()))


def _central_size(name_len: int, zip64: bool) -> int:
    return _CENTRAL + name_len + _UT_EXTRA + (_ZIP64_CENTRAL_EXTRA if zip64 else 0)


def _order(items: list[tuple[str, Entry]], fits32: int) -> list[tuple[str, Entry]]:
    """Sort by archive name, then bring a small member to the front.

    Safari's automatic unzip keeps only the first file when the first local
    header is ZIP64, so the first member must be one that fits ZIP32.
    """
    items = sorted(items, key=lambda item: item[0])
    if items and items[0][1].size >= fits32:
        for i, (_, entry) in enumerate(items):
            if entry.size < fits32:
                items.insert(0, items.pop(i))
                break
    return items


def make_plan(items: Iterable[tuple[str, Entry]], *, method: str, filename: str,
              checksums: Mapping[str, int] | None = None,
              growing: bool = False) -> Plan:
    """Lay out an archive of ``(name, entry)`` pairs.

    :param method: :data:`STORE` (exact size, ranges) or :data:`DEFLATE`.
    :param checksums: CRC-32 per member name already known (cache, storage).
    :param growing: the files may still be appended to (logs); stream the
        prefix that existed when the plan was made.
    """
    checksums = checksums or {}
    fits32 = ZIP32_LIMIT if method == STORE else DEFLATE32_LIMIT
    ordered = _order(list(items), fits32)
    names = [name.encode("utf-8") for name, _ in ordered]

    if method == STORE:
        # ZIP32 throughout when everything fits; else ZIP64 for all members
        # but a small first one.
        total32 = sum(_LOCAL + _UT_EXTRA + len(n) + e.size + _central_size(len(n), False)
                      for n, (_, e) in zip(names, ordered)) + _END
        all32 = len(ordered) <= ZIP32_MAX_MEMBERS and total32 <= ZIP32_LIMIT
    else:
        all32 = False

    members = []
    offset = 0
    for index, ((name, entry), raw) in enumerate(zip(ordered, names)):
        zip64 = not (all32 or (index == 0 and entry.size < fits32))
        member = Member(name, entry, zip_time(entry.mtime_ns), zip64,
                        offset if method == STORE else -1,
                        0 if entry.is_dir else checksums.get(name), growing)
        members.append(member)
        offset = member.end

    size = central_offset = None
    if method == STORE:
        central_offset = offset
        size = offset + sum(_central_size(len(n), m.zip64) for n, m in zip(names, members))
        size += _END + (_ZIP64_END if any(m.zip64 for m in members) else 0)

    digest = hashlib.sha256(f"{LAYOUT_VERSION}\0{method}\0{filename}".encode())
    for member in members:
        e = member.entry
        digest.update(f"\0{member.name}\0{e.size}\0{e.mtime_ns}".encode())
    # A deflated archive's bytes depend on the compressor: its ETag is weak.
    etag = digest.hexdigest()[:32]
    newest = max((m.entry.mtime_ns for m in members), default=0)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    last_modified = min(datetime.fromtimestamp(newest // 1_000_000_000, tz=timezone.utc), now)
    return Plan(tuple(members), method, filename, size, central_offset, etag, last_modified)
