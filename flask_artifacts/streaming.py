"""The WSGI response body: a planned archive, or one byte range of it, streamed.

Members are fed to stream-zip one at a time, each opened only when its turn
comes and read in bounded chunks, so memory does not grow with the job.
A stored member's CRC-32 comes from the plan (the cache) or from a read
pass just before its header; stream-zip checks the bytes against it again
as they stream and raises on a mismatch, which ends the response short of
its ``Content-Length``: a visibly failed transfer, never a wrong archive.

:meth:`ArchiveBody.close` releases every file the body opened, whether the
download finished, failed or was cut off by the client.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from stream_zip import NO_COMPRESSION_32, NO_COMPRESSION_64, ZIP_32, ZIP_64, ZipError, stream_zip

from . import fast
from .cache import ChecksumCache
from .errors import StreamError
from .plan import Member, Plan

if TYPE_CHECKING:
    from .extension import Store

logger = logging.getLogger("flask_artifacts")

#: A member at least this large whose CRC is not known yet starts a new
#: stream-zip segment, so the bytes before it are sent before its read pass.
SEGMENT_BEFORE = 16 << 20


class ArchiveBody:
    """Iterable of the archive's bytes ``[start, stop)`` for a WSGI server."""

    def __init__(self, plan: Plan, store: Store, cache: ChecksumCache, *,
                 start: int = 0, stop: int | None = None, chunk_size: int = 1 << 20,
                 get_compressobj: Callable[[], Any] | None = None,
                 on_close: Iterable[Callable[[ArchiveBody], None]] = (),
                 release: Callable[[], None] | None = None) -> None:
        self.plan = plan
        self.store = store
        self.cache = cache
        self.start = start
        self.stop = plan.size if stop is None else stop
        self.chunk_size = chunk_size
        self.get_compressobj = get_compressobj or fast.compressobj_factory(1)
        self.on_close = list(on_close)
        #: Called once, as the last byte goes out (or at the end): frees the
        #: download slot before the client can ask for its next download.
        self._release = release
        self.crcs = [m.crc for m in plan.members]
        self.hashes = dict(plan.hashes)
        self.bytes_sent = 0
        self.completed = False
        self.error: BaseException | None = None
        self._open: set[Iterator[bytes]] = set()
        self._iterator: Iterator[bytes] | None = None
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        if self._iterator is None:
            self._iterator = self._run()
        return self._iterator

    def close(self) -> None:
        """Release every file this body opened. Safe to call more than once."""
        if self._iterator is not None:
            self._iterator.close()  # type: ignore[attr-defined]
        self._finish()

    def _finish(self) -> None:
        """Runs once: when the stream ends, fails, or is closed unread."""
        if self._closed:
            return
        self._closed = True
        self._release_slot()
        for reader in list(self._open):
            reader.close()  # type: ignore[attr-defined]
        self._open.clear()
        for callback in self.on_close:
            try:
                callback(self)
            except Exception:  # a listener must not break the server
                logger.exception("Download close callback failed")

    def _release_slot(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    # -- generation ---------------------------------------------------------

    def _run(self) -> Iterator[bytes]:
        full = self.start == 0 and (self.stop is None or self.stop == self.plan.size)
        chunks = self._full() if full else self._range(self.start, self.stop)
        length = None if self.stop is None else self.stop - self.start
        try:
            for chunk in chunks:
                self.bytes_sent += len(chunk)
                if self.bytes_sent == length:
                    self._release_slot()
                yield chunk
            self.completed = True
        except (StreamError, ZipError, OSError) as exc:
            self.error = exc
            logger.error("Download of %s stopped after %d bytes: %s. The client sees a"
                         " failed transfer.", self.plan.filename, self.bytes_sent,
                         str(exc) or type(exc).__name__)
            raise
        finally:
            chunks.close()  # type: ignore[attr-defined]
            self._finish()

    def _full(self) -> Iterator[bytes]:
        expected = self.plan.size
        if expected is not None and self._cold_large_members():
            # Each large member without a known CRC needs a read pass before
            # its header, and stream-zip holds back up to a chunk meanwhile:
            # stream in segments that end before each one instead, so the
            # bytes made so far go out first (the same bytes, see _range).
            yield from self._range(0, expected)
            return
        zipped = iter(self._zip(range(len(self.plan.members))))
        if expected is None:
            yield from zipped
            return
        sent = 0
        for chunk in zipped:
            sent += len(chunk)
            if sent > expected:
                raise StreamError(f"archive grew past its planned {expected} bytes")
            if sent == expected:
                # The last byte goes out only once stream-zip has ended here too.
                for _ in zipped:
                    raise StreamError(f"archive grew past its planned {expected} bytes")
            yield chunk
        if sent != expected:
            raise StreamError(f"archive ended at {sent} of its planned {expected} bytes")

    def _range(self, start: int, stop: int | None) -> Iterator[bytes]:
        """Bytes ``[start, stop)`` of a stored archive, reading nothing before them."""
        plan = self.plan
        assert plan.central_offset is not None and stop is not None
        members = plan.members
        offsets = [m.offset for m in members]
        pos = start
        i = bisect.bisect_right(offsets, pos) - 1
        if pos < plan.central_offset and i >= 0:
            member = members[i]
            if pos >= member.data_offset:
                # The range starts inside this member's bytes: send them straight.
                length = min(member.end, stop) - pos
                yield from self._read(member, pos - member.data_offset, length)
                pos += length
                i += 1
        if pos < stop and pos < plan.central_offset:
            last = bisect.bisect_left(offsets, stop) - 1
            for group in self._segments(i, last + 1):
                end = min(stop, members[group[-1]].end)
                yield from _slice(self._zip(group), pos - members[group[0]].offset, end - pos)
                pos = end
        if pos < stop:
            for index in range(len(members)):
                self._crc(index)
            tail = plan.central_directory(self.crcs)
            yield tail[pos - plan.central_offset:stop - plan.central_offset]

    def _cold_large_members(self) -> list[int]:
        return [i for i, (m, crc) in enumerate(zip(self.plan.members, self.crcs))
                if crc is None and m.entry.size >= SEGMENT_BEFORE]

    def _segments(self, first: int, stop: int) -> Iterator[range]:
        """Split members ``[first, stop)`` before each large one whose CRC is unknown."""
        cuts = [i for i in self._cold_large_members() if first < i < stop]
        for start, end in zip([first] + cuts, cuts + [stop]):
            yield range(start, end)

    def _zip(self, indices: range) -> Iterator[bytes]:
        return stream_zip(self._members(indices), chunk_size=self.chunk_size,
                          get_compressobj=self.get_compressobj, extended_timestamps=True)

    def _members(self, indices: range) -> Iterator[tuple[Any, ...]]:
        for index in indices:
            member = self.plan.members[index]
            if self.plan.stored:
                crc = self._crc(index)
                kind = NO_COMPRESSION_64 if member.zip64 else NO_COMPRESSION_32
                method = kind(member.entry.size, crc)
            else:
                method = ZIP_64 if member.zip64 else ZIP_32
            data: Iterable[bytes] = () if member.entry.is_dir else self._read(member)
            yield member.name, member.modified, member.mode, method, data

    def _crc(self, index: int) -> int:
        """The member's CRC-32, from the plan or a read pass that fills the cache."""
        crc = self.crcs[index]
        if crc is None:
            member = self.plan.members[index]
            crc = 0
            for chunk in self._read(member):
                crc = fast.crc32(chunk, crc)
            if not member.generated:
                self.cache.put(member.entry, crc32=crc)
            self.crcs[index] = crc
        return crc

    def _read(self, member: Member, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        if member.generated:
            content = self.plan.sha256sums(self.hashes)
            yield content[start:None if length is None else start + length]
            return
        reader = self.store.read(member.entry, start, length, chunk_size=self.chunk_size,
                                 allow_growth=member.allow_growth)
        self._open.add(reader)
        try:
            if (self.plan.sums_member is None or member.name in self.hashes
                    or start or (length is not None and length != member.entry.size)):
                yield from reader
                return
            digest = hashlib.sha256()
            for chunk in reader:
                digest.update(chunk)
                yield chunk
            self.hashes[member.name] = digest.hexdigest()
            self.cache.put(member.entry, sha256=self.hashes[member.name])
        finally:
            reader.close()  # type: ignore[attr-defined]
            self._open.discard(reader)


def _slice(chunks: Iterator[bytes], skip: int, length: int) -> Iterator[bytes]:
    """``length`` bytes of ``chunks`` after the first ``skip``, then stop reading."""
    try:
        for chunk in chunks:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            piece = chunk[skip:skip + length] if skip or len(chunk) > length else chunk
            skip = 0
            length -= len(piece)
            yield piece
            if length <= 0:
                return
    finally:
        chunks.close()  # type: ignore[attr-defined]
    if length > 0:
        raise StreamError("archive ended before the requested range")
