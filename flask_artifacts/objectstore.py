"""Reading training jobs from object storage, through fsspec (S3 through s3fs).

:class:`FsspecStore` stands in for :class:`~flask_artifacts.jobs.LocalStore`
when ``ARTIFACTS_LOGS_DIR`` is a URL such as ``s3://bucket/prefix``: the same
job layout, the same methods, the same :class:`~flask_artifacts.jobs.Entry`
values, so routes, plans, errors and presets do not know where bytes live.

- Object keys are untrusted names, like files on disk: a key with an empty,
  ``.`` or ``..`` part, a backslash or control characters, or that is not a
  valid member name, is left out with a warning; keys are only ever read
  below the job's own prefix.
- Sizes and times come from one listing per job and request. An archive
  scan (``check_readable=True``) also HEADs the objects whose stored
  checksum may be a CRC-32 (concurrently, once per object version and
  worker), so archives of objects uploaded with ``ChecksumAlgorithm=CRC32``
  have their exact bytes, ETag and ranges without reading a member first.
- :meth:`FsspecStore.read` fetches only the span asked for, as streamed
  ranged GETs with up to ``read_ahead`` open at once, yielded in order;
  closing it closes what is still open. Every answer's ETag is compared
  with the listed one, so an object replaced or deleted before its bytes
  were requested ends the stream with :class:`MemberChanged`.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import collections
import concurrent.futures
import dataclasses
import datetime
import hashlib
import io
import logging
import threading
from typing import Any, Callable, Iterator, Mapping

from .errors import ArtifactsError, FileUnreadable, MemberChanged, StreamError
from .jobs import (
    CHECKPOINT_RE,
    PROGRESS_NAME,
    WEIGHT_RE,
    Checkpoint,
    Entry,
    Job,
    LocalStore,
    _member_name_problem,
    file_path_parts,
    job_id_of,
    validate_job_id,
)

logger = logging.getLogger("flask_artifacts")

#: Stored CRC-32s remembered per worker, by (locator, version tag).
CHECKSUM_MEMO_SIZE = 100_000
#: HEADs in flight at once while an archive is planned.
HEAD_CONCURRENCY = 32
#: Attempts of one ranged GET whose body broke off (s3fs retries the request itself).
GET_ATTEMPTS = 3
#: Ranged GETs after a read's first (one chunk, so its first byte comes
#: fast) are this large: bodies stream, so a large part costs no memory, and
#: fewer GETs cost fewer round trips (moto even copies the whole object for
#: each ranged GET: 1 MiB parts of a 256 MiB object ran at 6 MB/s there).
MAX_PART = 64 << 20


class StorageUnavailable(ArtifactsError):
    """The object store did not answer a listing; asked again later it may."""

    status = 503
    code = "storage_unavailable"


@dataclasses.dataclass
class _Listing:
    """One job's objects as listed once: the job folder's keys and the root files."""

    #: Valid keys below ``job_<id>/``, relative to it, with their listing info
    #: (folder markers end with ``/``).
    files: dict[str, Mapping[str, Any]]
    log: Entry | None
    progress: Entry | None


class FsspecStore:
    """Jobs below a URL that fsspec opens (``s3://bucket/prefix``).

    :param url: The job root, the training server's ``LOGS_DIR``.
    :param storage_options: Passed to :func:`fsspec.core.url_to_fs`
        (``ARTIFACTS_STORAGE_OPTIONS``); credentials and the endpoint may
        also come from the environment (``AWS_ENDPOINT_URL``).
    :param read_ahead: Ranged GETs one read keeps open at once
        (``ARTIFACTS_READ_AHEAD``); each holds about one chunk in memory.
    :param health_timeout: Seconds :meth:`reachable` waits for an answer.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *,
                 read_ahead: int = 4, health_timeout: float = 3.0) -> None:
        import fsspec.core

        options = dict(storage_options or {})
        protocol = url.split("://", 1)[0].lower()
        if protocol in ("s3", "s3a"):
            # Each download keeps read_ahead GETs in flight; botocore's pool of
            # 10 connections would queue several downloads behind each other.
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("max_pool_connections", 64)
            options["config_kwargs"] = config
        self.url = url.rstrip("/")
        self.root = self.url
        self.fs, path = fsspec.core.url_to_fs(url, **options)
        self._root = path.rstrip("/")
        self.read_ahead = max(1, int(read_ahead))
        self.health_timeout = health_timeout
        #: s3fs: HEADs with checksums, ranged GETs straight on fsspec's event loop.
        self._s3 = (callable(getattr(self.fs, "_call_s3", None))
                    and getattr(self.fs, "loop", None) is not None)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._crcs: collections.OrderedDict[tuple[str, int], int | None] = (
            collections.OrderedDict())
        self._crcs_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<FsspecStore {self.url!r}>"

    # -- discovery ---------------------------------------------------------

    def reachable(self) -> bool:
        """Whether the job root answers a one-key listing within ``health_timeout``."""
        try:
            if self._s3:
                bucket, key, _ = self.fs.split_path(self._root)
                params: dict[str, Any] = {"Bucket": bucket, "MaxKeys": 1}
                if key:
                    params["Prefix"] = key + "/"
                probe = asyncio.wait_for(self.fs._call_s3("list_objects_v2", **params),
                                         self.health_timeout)
                future = asyncio.run_coroutine_threadsafe(probe, self.fs.loop)
                future.result(self.health_timeout + 1)
                return True
            return bool(self._thread(self.fs.exists, self._root).result(self.health_timeout))
        except Exception as exc:
            logger.warning("Job root %s is not reachable: %s", self.url, exc or type(exc).__name__)
            return False

    def job(self, job_id: str) -> Job:
        """Find a job by id, or raise :class:`~flask_artifacts.errors.JobNotFound`."""
        from .errors import JobNotFound

        validate_job_id(job_id)
        listing = self._listing(job_id)
        root = self._job_dir(job_id) if listing.files else None
        if root is None and listing.log is None and listing.progress is None:
            raise JobNotFound(
                f"No job {job_id!r} in the job directory. List jobs with 'flask artifacts jobs'."
            )
        return Job(job_id, root, listing.log, listing.progress)

    def job_ids(self) -> list[str]:
        """Ids of the jobs that have a folder, a log or a progress file."""
        try:
            items = self.fs.ls(self._root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise self._unavailable(exc) from exc
        names = (str(item).rstrip("/").rsplit("/", 1)[-1] for item in items)
        return sorted({i for i in map(job_id_of, names) if i is not None})

    def checkpoints(self, job: Job) -> list[Checkpoint]:
        """The job's ``checkpoint-<step>`` folders, by step as a number."""
        if job.root is None:
            return []
        names = {rel.split("/", 1)[0] for rel in self._listing(job.job_id).files if "/" in rel}
        found = []
        for name in names:
            match = CHECKPOINT_RE.fullmatch(name)
            if match:
                found.append(Checkpoint(name, int(match.group(1))))
        return sorted(found, key=lambda c: (c.step, c.name))

    # The same rules as on disk, over this store's listing and reads.
    checkpoint = LocalStore.checkpoint
    status = LocalStore.status
    read_json = LocalStore.read_json

    def modified_ns(self, job: Job) -> int:
        """When an object of the job last changed (or, before its folder exists, its log)."""
        for entry in (job.log, job.progress):
            if job.root is None and entry is not None:
                return entry.mtime_ns
        if job.root is None:
            return 0
        return max((_mtime_ns(info) for info in self._listing(job.job_id).files.values()),
                   default=0)

    def has_model(self, job: Job) -> bool:
        if job.root is None:
            return False
        names = {rel for rel in self._listing(job.job_id).files if "/" not in rel}
        return "config.json" in names and any(WEIGHT_RE.fullmatch(n) for n in names)

    # -- listing files -------------------------------------------------------

    def scan(self, job: Job, under: str | None = None, *,
             check_readable: bool = False) -> list[Entry]:
        """Every object below the job folder (or one of its folders), sorted by path.

        Folder markers (keys ending in ``/``) with nothing below them are
        listed as ``is_dir`` entries, so the archive keeps empty folders.
        With ``check_readable`` (an archive is being planned) each object is
        HEADed once per version: a refused one raises ``file_unreadable``,
        and its stored full-object CRC-32, if any, becomes ``Entry.crc32``.
        Objects the listing says carry other checksums only are not HEADed.
        """
        if job.root is None:
            return []
        files = self._listing(job.job_id).files
        prefix = "" if under is None else under + "/"
        base = self._job_dir(job.job_id)
        entries, other_checksums = [], set()
        for rel, info in files.items():
            if not rel.startswith(prefix) or rel == prefix:
                continue
            entry = self._entry(rel, info, f"{base}/{rel}", is_dir=rel.endswith("/"))
            entries.append(entry)
            algorithms = info.get("ChecksumAlgorithm")
            if algorithms and "CRC32" not in algorithms:  # AWS's default CRC64NVME, say
                other_checksums.add(entry.locator)
        if check_readable:
            entries = self._with_checksums(entries, other_checksums)
        entries.sort(key=lambda e: e.path)
        return entries

    def file(self, job: Job, path: str) -> Entry:
        """One object of the job by its ``/``-separated path, checked like a scan."""
        _, missing = file_path_parts(job, path)
        if job.root is None:
            raise missing
        location = f"{self._job_dir(job.job_id)}/{path}"
        try:
            info = self.fs.info(location, refresh=True)
        except FileNotFoundError:
            raise missing from None
        except PermissionError:
            raise self._unreadable(path) from None
        except Exception as exc:
            raise self._unavailable(exc) from exc
        if info.get("type") != "file":
            raise missing
        return self._entry(path, info, location)

    # -- reading ------------------------------------------------------------

    def check_readable(self, entry: Entry) -> None:
        """Raise :class:`FileUnreadable` now if the store refuses the object."""
        self._with_checksums([entry], set())

    def open(self, entry: Entry, *, allow_growth: bool = False) -> io.RawIOBase:
        """A read-only, seekable file of the listed ``entry.size`` bytes.

        It reads through :meth:`read` (ranged GETs with read-ahead) from the
        position of each ``read()`` on, so it serves small JSON files and
        whole single-file downloads alike.
        """
        return _ObjectFile(self, entry, allow_growth)

    def verify(self, entry: Entry, f: Any = None, *, allow_growth: bool = False) -> None:
        """Raise :class:`MemberChanged` unless the object still is ``entry``."""
        try:
            info = self.fs.info(self._path(entry), refresh=True)
        except FileNotFoundError:
            raise MemberChanged(f"{entry.path} was deleted") from None
        if allow_growth:
            if info["size"] < entry.size:
                raise MemberChanged(f"{entry.path} was truncated")
        elif (_tag(info), info["size"]) != (entry.identity[1], entry.size):
            raise MemberChanged(f"{entry.path} was replaced")

    def read(self, entry: Entry, start: int = 0, length: int | None = None, *,
             chunk_size: int = 1 << 20, allow_growth: bool = False) -> Iterator[bytes]:
        """Yield ``length`` bytes of ``entry`` from ``start``, in ``chunk_size`` pieces.

        Only the span asked for is fetched, as ranged GETs: one chunk first,
        so the first byte comes fast, then parts of :data:`MAX_PART`; up to
        ``read_ahead`` of them are open at once, so the next ones' round
        trips overlap this one's transfer. Closing the generator closes
        them. Every piece must come from the object version that was listed
        (or, with ``allow_growth``, from one version at least ``entry.size``
        long), else :class:`MemberChanged`.
        """
        if length is None:
            length = entry.size - start
        if self._s3:
            return self._read_parts(entry, start, length, chunk_size, allow_growth)
        return self._read_chunks(entry, start, length, chunk_size, allow_growth)

    def _read_parts(self, entry: Entry, start: int, length: int, chunk_size: int,
                    allow_growth: bool) -> Iterator[bytes]:
        """S3: streamed ranged GETs on fsspec's event loop, drained in order.

        A part's body is read a chunk at a time; aiohttp stops reading a
        socket whose buffer is full, so the parts ahead wait in the kernel,
        not in this process: memory stays near one chunk per open part.
        """
        loop = self.fs.loop
        path = self._path(entry)
        spans = iter(_parts(start, length, chunk_size))
        opened: collections.deque[tuple[_Part, concurrent.futures.Future[Any]]]
        opened = collections.deque()
        version = None if allow_growth else entry.identity[1]
        try:
            while True:
                while len(opened) < self.read_ahead:
                    span = next(spans, None)
                    if span is None:
                        break
                    part = _Part(self, path, *span)
                    opened.append((part, asyncio.run_coroutine_threadsafe(part.open(), loop)))
                if not opened:
                    return
                part, future = opened.popleft()
                try:
                    response = self._result(future, entry)
                    version = _check_version(entry, response, version, allow_growth)
                    part.version = version
                    while part.pos < part.end:
                        size = min(chunk_size, part.end - part.pos)
                        data = self._result(asyncio.run_coroutine_threadsafe(part.read(size), loop),
                                            entry)
                        if len(data) != size:
                            raise MemberChanged(f"{entry.path} was truncated while it was read")
                        yield data
                finally:
                    loop.call_soon_threadsafe(part.close)
        finally:
            for part, future in opened:
                future.cancel()
                loop.call_soon_threadsafe(part.close)

    def _read_chunks(self, entry: Entry, start: int, length: int, chunk_size: int,
                     allow_growth: bool) -> Iterator[bytes]:
        """Other filesystems: ``read_ahead`` chunk reads at once on a small thread pool."""
        stop = start + length
        path = self._path(entry)
        offsets = iter(range(start, stop, chunk_size))
        pending: collections.deque[tuple[concurrent.futures.Future[Any], int]] = collections.deque()
        version = None if allow_growth else entry.identity[1]
        try:
            while True:
                while len(pending) < self.read_ahead:
                    offset = next(offsets, None)
                    if offset is None:
                        break
                    size = min(chunk_size, stop - offset)
                    pending.append((self._thread(self._get_other, path, offset, size), size))
                if not pending:
                    return
                future, size = pending.popleft()
                data, info = self._result(future, entry)
                version = _check_version(entry, info, version, allow_growth)
                if len(data) != size:
                    raise MemberChanged(f"{entry.path} was truncated while it was read")
                yield data
        finally:
            for future, _ in pending:
                future.cancel()

    def presigned_url(self, entry: Entry, expires: int, *, filename: str | None = None,
                      content_type: str | None = None) -> str | None:
        """A URL that GETs the object without credentials for ``expires`` seconds, or None."""
        path = self._path(entry)
        try:
            if self._s3:
                params: dict[str, str] = {}
                if filename is not None:
                    from .headers import content_disposition

                    params["ResponseContentDisposition"] = content_disposition(filename)
                if content_type is not None:
                    params["ResponseContentType"] = content_type
                return str(self.fs.url(path, expires=int(expires), **params))
            return str(self.fs.sign(path, expiration=int(expires)))
        except NotImplementedError:
            return None

    # -- helpers ------------------------------------------------------------

    def _job_dir(self, job_id: str) -> str:
        return f"{self._root}/job_{job_id}"

    def _path(self, entry: Entry) -> str:
        return str(self.fs._strip_protocol(entry.locator))

    def _listing(self, job_id: str) -> _Listing:
        """The job's objects, listed once per request (one consistent snapshot)."""
        from flask import g, has_app_context

        memo = g.setdefault("_artifacts_listings", {}) if has_app_context() else {}
        key = (id(self), job_id)
        if key not in memo:
            memo[key] = self._list_job(job_id)
        return memo[key]  # type: ignore[no-any-return]

    def _list_job(self, job_id: str) -> _Listing:
        name = f"job_{job_id}"
        base = self._job_dir(job_id)
        try:
            if self._s3:
                from fsspec.asyn import sync

                listed = sync(self.fs.loop, self._list_s3, base, name)
            else:
                listed = self.fs.find(base, detail=True)
                for extra in (f"{name}.log", f"{name}_progress.json"):
                    try:
                        listed[f"{self._root}/{extra}"] = self.fs.info(f"{self._root}/{extra}")
                    except FileNotFoundError:
                        pass
        except FileNotFoundError:
            listed = {}
        except Exception as exc:
            raise self._unavailable(exc) from exc
        raw: dict[str, Mapping[str, Any]] = {}
        root_files: dict[str, Mapping[str, Any]] = {}
        for location, info in listed.items():
            location = str(info.get("Key") or info.get("name") or location)
            location = self.fs._strip_protocol(location) if "://" in location else location
            if location.startswith(base + "/"):
                if location != base + "/":  # the job folder's own marker
                    raw[location[len(base) + 1:]] = info
            elif location.rsplit("/", 1)[0] == self._root:
                root_files[location.rsplit("/", 1)[1]] = info
        files = _valid_keys(raw, name)

        def root_file(rel: str, role: str) -> Entry | None:
            info = root_files.get(rel)
            return None if info is None else self._entry(role, info, f"{self._root}/{rel}")

        def inner_file(rel: str, role: str) -> Entry | None:
            info = files.get(rel)
            return None if info is None else self._entry(role, info, f"{base}/{rel}")

        log = root_file(f"{name}.log", "training.log") or inner_file(f"{name}.log", "training.log")
        progress = (inner_file(PROGRESS_NAME, "progress.json")
                    or root_file(f"{name}_progress.json", "progress.json"))
        return _Listing(files, log, progress)

    async def _list_s3(self, base: str, name: str) -> dict[str, Mapping[str, Any]]:
        """The job folder's keys, and HEADs of ``job_<id>.log`` and ``job_<id>_progress.json``.

        Three requests at once, each about this job only: a listing of the
        prefix ``job_<id>`` would also page through ``job_<id>0/``,
        ``job_<id>1/``... of every job whose id starts with this one.
        """

        async def head(rel: str) -> tuple[str, Mapping[str, Any]] | None:
            location = f"{self._root}/{rel}"
            bucket, key, _ = self.fs.split_path(location)
            try:
                answer = await self.fs._call_s3("head_object", Bucket=bucket, Key=key)
            except (FileNotFoundError, PermissionError):
                # S3 answers 403, not 404, for a missing key to a caller that
                # may not list the bucket.
                return None
            return location, {"ETag": answer.get("ETag", ""), "type": "file",
                              "LastModified": answer.get("LastModified"),
                              "size": int(answer.get("ContentLength") or 0)}

        async def folder() -> dict[str, Mapping[str, Any]]:
            try:
                return await self.fs._find(base, detail=True)  # type: ignore[no-any-return]
            except FileNotFoundError:
                return {}

        found, *extras = await asyncio.gather(folder(), head(f"{name}.log"),
                                              head(f"{name}_progress.json"))
        listed = dict(found)
        listed.update(extra for extra in extras if extra is not None)
        return listed

    def _entry(self, rel: str, info: Mapping[str, Any], location: str, *,
               is_dir: bool = False) -> Entry:
        mtime = _mtime_ns(info)
        return Entry(rel, 0 if is_dir else int(info.get("size") or 0), mtime, is_dir,
                     self.fs.unstrip_protocol(location), (0, _tag(info), mtime))

    def _with_checksums(self, entries: list[Entry], no_crc32: set[str]) -> list[Entry]:
        """``entries`` with their stored CRC-32s, HEADing each object version once.

        Also the readability check: a HEAD refused with 403 raises
        ``file_unreadable`` before the first byte. ``no_crc32``: locators
        known from the listing to have no CRC-32; they are not asked.
        """
        if not self._s3:
            return entries
        wanted = []
        for entry in entries:
            key = (entry.locator, entry.identity[1])
            if entry.is_dir or self._memo(key) is not _UNKNOWN:
                continue
            if entry.locator in no_crc32:
                self._remember(key, None)
            else:
                wanted.append(entry)
        if wanted:
            from fsspec.asyn import sync

            try:
                results = sync(self.fs.loop, self._head_many, [self._path(e) for e in wanted])
            except PermissionError:
                raise self._unreadable("an object") from None
            for entry, result in zip(wanted, results):
                if isinstance(result, PermissionError):
                    raise self._unreadable(entry.path)
                if isinstance(result, FileNotFoundError):
                    continue  # deleted since the listing: its read will say so
                if isinstance(result, BaseException):
                    raise self._unavailable(result) from result
                crc = None
                if _tag(result) == entry.identity[1]:  # else replaced since the listing
                    crc = _stored_crc32(result)
                self._remember((entry.locator, entry.identity[1]), crc)
        out = []
        for entry in entries:
            crc = None if entry.is_dir else self._memo((entry.locator, entry.identity[1]))
            out.append(entry if crc is None or crc is _UNKNOWN
                       else dataclasses.replace(entry, crc32=crc))  # type: ignore[arg-type]
        return out

    async def _head_many(self, paths: list[str]) -> list[Any]:
        limit = asyncio.Semaphore(HEAD_CONCURRENCY)

        async def head(path: str) -> Any:
            bucket, key, _ = self.fs.split_path(path)
            async with limit:
                return await self.fs._call_s3("head_object", Bucket=bucket, Key=key,
                                              ChecksumMode="ENABLED")

        return await asyncio.gather(*(head(p) for p in paths), return_exceptions=True)

    def _memo(self, key: tuple[str, int]) -> Any:
        with self._crcs_lock:
            return self._crcs.get(key, _UNKNOWN)

    def _remember(self, key: tuple[str, int], crc: int | None) -> None:
        with self._crcs_lock:
            self._crcs[key] = crc
            while len(self._crcs) > CHECKSUM_MEMO_SIZE:
                self._crcs.popitem(last=False)

    def _get_other(self, path: str, offset: int, size: int) -> tuple[bytes, Mapping[str, Any]]:
        info = self.fs.info(path, refresh=True)
        return self.fs.cat_file(path, start=offset, end=offset + size), info

    def _thread(self, func: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=4 * self.read_ahead + 4, thread_name_prefix="artifacts-read")
        return self._pool.submit(func, *args)

    def _result(self, future: concurrent.futures.Future[Any], entry: Entry) -> Any:
        try:
            return future.result()
        except FileNotFoundError:
            raise MemberChanged(f"{entry.path} was deleted") from None
        except (StreamError, OSError):
            raise
        except Exception as exc:
            # botocore's connection errors are not OSErrors; the stream must
            # still end as a failed transfer.
            raise StreamError(f"reading {entry.path} from {self.url} failed: {exc}") from exc

    def _unavailable(self, exc: BaseException) -> StorageUnavailable:
        logger.error("Storage request to %s failed: %s", self.url, exc or type(exc).__name__)
        error = StorageUnavailable(
            "The job storage did not answer. Retry shortly; if it persists, check the"
            " storage endpoint and ARTIFACTS_STORAGE_OPTIONS.")
        error.headers["Retry-After"] = "10"
        return error

    @staticmethod
    def _unreadable(path: str) -> FileUnreadable:
        return FileUnreadable(
            f"The file {path} of this job cannot be read by the server (access denied"
            " by the storage). Fix the bucket policy or credentials and retry.")


_UNKNOWN = object()


def _parts(start: int, length: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(offset, size)`` of the GETs for a span: one chunk first, then MAX_PART each."""
    out, offset, stop, size = [], start, start + length, chunk_size
    while offset < stop:
        out.append((offset, min(size, stop - offset)))
        offset += out[-1][1]
        size = max(MAX_PART, chunk_size)
    return out


def _check_version(entry: Entry, info: Mapping[str, Any], version: int | None,
                   allow_growth: bool) -> int:
    """The version tag of a GET's answer, after checking it is the one being read."""
    tag = _tag(info)
    if version is not None and tag != version:
        raise MemberChanged(f"{entry.path} was replaced while it was read")
    total = info.get("total", info.get("size"))
    if total is not None and (total < entry.size or (not allow_growth and total != entry.size)):
        raise MemberChanged(f"{entry.path} changed size while it was read")
    return tag


class _Part:
    """One ranged GET read in order on the event loop; reopened where it broke off."""

    def __init__(self, store: FsspecStore, path: str, offset: int, size: int) -> None:
        self.fs = store.fs
        self.bucket, self.key, self.version_id = store.fs.split_path(path)
        self.pos, self.end = offset, offset + size
        #: The version tag the part must keep when it is reopened.
        self.version: int | None = None
        self.body: Any = None
        self.closed = False

    async def open(self) -> dict[str, Any]:
        params = {"Bucket": self.bucket, "Key": self.key,
                  "Range": f"bytes={self.pos}-{self.end - 1}"}
        if self.version_id:
            params["VersionId"] = self.version_id
        response = await self.fs._call_s3("get_object", **params)
        if self.closed:  # closed while it was being opened
            response["Body"].close()
            raise asyncio.CancelledError
        self.body = response["Body"]
        content_range = response.get("ContentRange") or ""
        total = int(content_range.rsplit("/", 1)[1]) if "/" in content_range else None
        return {"ETag": response.get("ETag", ""), "total": total}

    async def read(self, size: int) -> bytes:
        from s3fs.core import S3_RETRYABLE_ERRORS

        for attempt in range(GET_ATTEMPTS):
            pieces, got = [], 0
            try:
                while got < size:
                    piece = await self.body.read(size - got)
                    if not piece:
                        break
                    pieces.append(piece)
                    got += len(piece)
            except S3_RETRYABLE_ERRORS:
                if attempt == GET_ATTEMPTS - 1:
                    raise
                self.close()
                self.closed = False
                await asyncio.sleep(0.1 * 2 ** attempt)
                info = await self.open()  # the rest of the part, from where it broke off
                if self.version is not None and _tag(info) != self.version:
                    raise MemberChanged(f"{self.key} was replaced while it was read") from None
                continue
            data = b"".join(pieces)
            self.pos += len(data)
            return data
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Release the connection (on the event loop's thread)."""
        self.closed = True
        if self.body is not None:
            self.body.close()
            self.body = None


class _ObjectFile(io.RawIOBase):
    """``entry.size`` bytes of an object as a seekable file, read through the store."""

    def __init__(self, store: FsspecStore, entry: Entry, allow_growth: bool) -> None:
        super().__init__()
        self.name = entry.path
        self._store, self._entry, self._growth = store, entry, allow_growth
        self._pos = 0
        self._chunks: Iterator[bytes] | None = None
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._entry.size}[whence]
        position = max(0, base + offset)
        if position != self._pos:
            self._stop()
            self._pos = position
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            if not self._buffer:
                if self._chunks is None:
                    if self._pos >= self._entry.size:
                        break
                    self._chunks = self._store.read(
                        self._entry, self._pos, self._entry.size - self._pos,
                        allow_growth=self._growth)
                try:
                    chunk = next(self._chunks, None)
                except (MemberChanged, PermissionError):
                    raise
                except (StreamError, OSError) as exc:
                    # The storage failed, not the object: a progress.json or
                    # trainer_state.json read answers 503, not "unknown".
                    raise self._store._unavailable(exc) from exc
                if chunk is None:
                    self._chunks = None
                    break
                self._buffer = memoryview(chunk)
            n = min(len(view) - filled, len(self._buffer))
            view[filled:filled + n] = self._buffer[:n]
            self._buffer = self._buffer[n:]
            filled += n
            self._pos += n
        return filled

    def _stop(self) -> None:
        if self._chunks is not None:
            self._chunks.close()  # type: ignore[attr-defined]
            self._chunks = None
        self._buffer = memoryview(b"")

    def close(self) -> None:
        self._stop()
        super().close()


def _valid_keys(raw: Mapping[str, Mapping[str, Any]], job: str) -> dict[str, Mapping[str, Any]]:
    """The keys below a job folder that can be archive members, sorted; the rest warned about.

    A folder marker (``a/``, empty) stays only while nothing lies below it;
    a key that is also a folder (``a`` and ``a/b``) is left out, since no
    unzipper can make both.
    """
    good: dict[str, Mapping[str, Any]] = {}
    for rel in sorted(raw):
        info = raw[rel]
        marker = rel.endswith("/")
        problem = _key_problem(rel[:-1] if marker else rel)
        if problem is None and marker and int(info.get("size") or 0):
            problem = "is a folder marker with contents"
        if problem is not None:
            logger.warning("Leaving out object %r of %s: its key %s.", rel, job, problem)
            continue
        good[rel] = info
    # Every folder some key lies below ("a/" and "a/b/" for "a/b/c").
    folders = {rel[: i + 1] for rel in good for i, c in enumerate(rel[:-1]) if c == "/"}
    out = {}
    for rel, info in good.items():
        if rel.endswith("/"):
            if rel not in folders:
                out[rel] = info
            continue
        if rel + "/" in folders:
            logger.warning("Leaving out object %r of %s: it is also a folder.", rel, job)
            continue
        out[rel] = info
    return out


def _key_problem(rel: str) -> str | None:
    if not rel:
        return "is empty"
    if len(rel) > 4096:
        return "is longer than 4096 characters"
    for part in rel.split("/"):
        if part == "":
            return "has an empty part"
        if part in (".", ".."):
            return f"has a {part!r} part"
        problem = _member_name_problem(part)
        if problem is not None:
            return problem
    return None


def _tag(info: Mapping[str, Any]) -> int:
    """A 60-bit number for the object version a listing, HEAD or GET describes."""
    for field in ("ETag", "etag", "VersionId", "generation", "md5", "version_id"):
        value = info.get(field)
        if value:
            break
    else:
        value = f"{info.get('size')}:{_mtime_ns(info)}"
    return int(hashlib.sha256(str(value).encode()).hexdigest()[:15], 16)


def _mtime_ns(info: Mapping[str, Any]) -> int:
    """The object's modification time in whole seconds (what every storage API agrees on)."""
    for field in ("LastModified", "last_modified", "mtime", "updated", "created"):
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, str):
            value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, datetime.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=datetime.timezone.utc)
            return calendar.timegm(value.utctimetuple()) * 1_000_000_000
        return int(float(value)) * 1_000_000_000
    return 0


def _stored_crc32(head: Mapping[str, Any]) -> int | None:
    """The full-object CRC-32 of a HEAD with checksum mode on, or None.

    Multipart uploads usually carry a CRC of the parts' CRCs (ChecksumType
    COMPOSITE, a ``-N`` suffix), which is not the object's CRC. Some servers
    (moto) give that value with neither mark, so a multipart object (ETag
    ``"...-N"``) counts only when its ChecksumType says FULL_OBJECT.
    """
    value = head.get("ChecksumCRC32")
    kind = head.get("ChecksumType")
    multipart = "-" in str(head.get("ETag", ""))
    if not value or "-" in value or kind not in (None, "FULL_OBJECT"):
        return None
    if multipart and kind != "FULL_OBJECT":
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return int.from_bytes(raw, "big") if len(raw) == 4 else None
