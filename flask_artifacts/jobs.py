"""Reading training jobs: discovery, path safety and opening files.

Every route reaches the job directory through :class:`LocalStore`; nothing
else in the package joins a user-supplied name into a path or opens a file.
Callers see :class:`Job` and :class:`Entry` values whose ``path`` is the
member's ``/``-separated path inside the job, never a filesystem path, so a
store for object storage can stand in later behind the same methods.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import stat
import unicodedata
from typing import Any, BinaryIO, Iterator

from .errors import (
    ArtifactsError,
    CheckpointNotFound,
    FileUnreadable,
    InvalidCheckpoint,
    InvalidJobId,
    JobNotFound,
    MemberChanged,
)

logger = logging.getLogger("flask_artifacts")

#: ``checkpoint-<step>`` with ASCII digits only (``\d`` would take other scripts' digits).
CHECKPOINT_RE = re.compile(r"checkpoint-([0-9]{1,30})")

COMPLETED = frozenset({"completed", "complete", "finished", "succeeded", "success"})
IN_PROGRESS = frozenset({"running", "training", "queued", "pending", "paused", "resuming"})
ENDED = frozenset({"failed", "error", "cancelled", "canceled", "stopped"})

#: Weight files whose presence, with config.json, marks a finished model.
WEIGHT_RE = re.compile(
    r"(model|pytorch_model)(-[0-9]+-of-[0-9]+)?\.(safetensors|bin)(\.index\.json)?"
)

#: Files of the job directory that belong to the logs archive, not the model.
PROGRESS_NAME = "progress.json"
MAX_JSON_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True)
class Entry:
    """One file (or empty folder) of a job, as recorded when a request starts."""

    #: ``/``-separated path below the job directory (``checkpoint-10/optimizer.pt``).
    path: str
    size: int
    mtime_ns: int
    is_dir: bool = False
    #: Where the store finds the bytes. Opaque to everything but the store.
    locator: str = dataclasses.field(default="", repr=False)
    #: Host-local identity (device, inode, ctime_ns) used to notice changed
    #: files and to key the checksum cache. Never part of an ETag.
    identity: tuple[int, int, int] = (0, 0, 0)
    #: CRC-32 the storage itself keeps for the file (object storage's
    #: full-object checksum), or None. Part of the ETag when known.
    crc32: int | None = None


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    name: str
    step: int


@dataclasses.dataclass(frozen=True)
class Job:
    job_id: str
    #: Locator of the job directory, or None when only its log exists yet.
    root: str | None
    log: Entry | None
    progress: Entry | None

    @property
    def dir_name(self) -> str:
        return f"job_{self.job_id}"


def validate_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is a name we may look up, else raise :class:`InvalidJobId`."""
    problem = None
    if not 1 <= len(job_id) <= 128:
        problem = "must be 1 to 128 characters long"
    elif job_id in (".", "..") or job_id.startswith("."):
        problem = "must not start with '.'"
    elif any(c in "/\\" for c in job_id):
        problem = "must not contain '/' or '\\'"
    elif any(unicodedata.category(c) in ("Cc", "Cs") for c in job_id):
        problem = "must not contain control characters"
    if problem is not None:
        raise InvalidJobId(f"The job id {problem}. Use the id the training server returned.")
    return job_id


def validate_checkpoint(name: str) -> Checkpoint:
    match = CHECKPOINT_RE.fullmatch(name)
    if match is None:
        raise InvalidCheckpoint(
            "Checkpoint names look like 'checkpoint-1000'. List them at"
            " /api/training/checkpoints/<job_id>."
        )
    return Checkpoint(name, int(match.group(1)))


def job_state(status: str | None, has_model: bool) -> str:
    """Sort a raw status into ``completed``, ``in_progress``, ``ended`` or ``unknown``."""
    if status is None:
        return "completed" if has_model else "unknown"
    status = status.strip().lower()
    if status in COMPLETED:
        return "completed"
    if status in IN_PROGRESS:
        return "in_progress"
    if status in ENDED:
        return "ended"
    return "unknown"


def contained(root: str, path: str) -> str | None:
    """Resolve ``path`` and return it if it lies inside the real path ``root``.

    Containment is decided on whole path components of real paths, so
    ``/logs-x`` is not inside ``/logs`` and a symlink is judged by its target.
    """
    real = os.path.realpath(path)
    try:
        if os.path.commonpath([root, real]) == root:
            return real
    except ValueError:
        pass
    return None


def job_id_of(name: str) -> str | None:
    """The job id in a name the training server writes (``job_<id>``,
    ``job_<id>.log``, ``job_<id>_progress.json``), or None."""
    if not name.startswith("job_"):
        return None
    stem = name[4:]
    for suffix in ("_progress.json", ".log"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    try:
        return validate_job_id(stem)
    except InvalidJobId:
        return None


def file_path_parts(job: Job, path: str) -> tuple[list[str], ArtifactsError]:
    """Split a user-given file path, or raise ``invalid_path``.

    Also returns the ``file_not_found`` error to raise when it names nothing.
    """
    parts = path.split("/")
    if (not path or len(path) > 4096 or any(p in ("", ".", "..") for p in parts)
            or any(_member_name_problem(p) for p in parts)):
        raise ArtifactsError(
            "File paths are '/'-separated names inside the job folder, such as"
            " 'model.safetensors' or 'checkpoint-20/trainer_state.json'.",
            code="invalid_path", status=400)
    missing = ArtifactsError(
        f"Job {job.job_id!r} has no file {path!r}. The manifest lists its files.",
        code="file_not_found", status=404)
    return parts, missing


def _member_name_problem(name: str) -> str | None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if "\\" in name:
        return "contains a backslash, which unzippers on Windows read as a folder separator"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "contains control characters"
    return None


class LocalStore:
    """Jobs in a directory on this machine (``LOGS_DIR``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.realpath(os.fspath(root))

    def __repr__(self) -> str:
        return f"<LocalStore {self.root!r}>"

    # -- discovery ---------------------------------------------------------

    def reachable(self) -> bool:
        return os.path.isdir(self.root)

    def job(self, job_id: str) -> Job:
        """Find a job by id, or raise :class:`JobNotFound`."""
        validate_job_id(job_id)
        name = f"job_{job_id}"
        root = self._child_dir(self.root, name)
        log = self._root_file(f"{name}.log", "training.log")
        if log is None and root is not None:
            log = self._root_file(f"{name}.log", "training.log", base=root)
        progress = None
        if root is not None:
            progress = self._root_file(PROGRESS_NAME, "progress.json", base=root)
        if progress is None:
            progress = self._root_file(f"{name}_progress.json", "progress.json")
        if root is None and log is None and progress is None:
            raise JobNotFound(
                f"No job {job_id!r} in the job directory. List jobs with 'flask artifacts jobs'."
            )
        return Job(job_id, root, log, progress)

    def job_ids(self) -> list[str]:
        """Ids of the jobs that have a directory, a log or a progress file."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        return sorted({i for i in map(job_id_of, names) if i is not None})

    def checkpoints(self, job: Job) -> list[Checkpoint]:
        """The job's ``checkpoint-<step>`` folders, by step as a number."""
        if job.root is None:
            return []
        found = []
        try:
            names = os.listdir(job.root)
        except OSError:
            return []
        for name in names:
            match = CHECKPOINT_RE.fullmatch(name)
            if match and self._child_dir(job.root, name) is not None:
                found.append(Checkpoint(name, int(match.group(1))))
        return sorted(found, key=lambda c: (c.step, c.name))

    def checkpoint(self, job: Job, name: str) -> Checkpoint:
        wanted = validate_checkpoint(name)
        available = self.checkpoints(job)
        if wanted not in available:
            names = [c.name for c in available]
            listed = ", ".join(names) if names else "none"
            raise CheckpointNotFound(
                f"Job {job.job_id!r} has no {name}. Available checkpoints: {listed}.",
                available=names,
            )
        return wanted

    def status(self, job: Job) -> str | None:
        """The raw ``status`` of the job's progress.json, lowercased, if it has one.

        An unreadable or half-written progress.json gives ``"unknown"``, never a
        guess from the files, so a running job is not mistaken for a finished one.
        """
        if job.progress is None:
            return None
        try:
            data = self.read_json(job.progress)
            status = data.get("status") if isinstance(data, dict) else None
        except (OSError, ValueError, MemberChanged):
            return "unknown"
        return status.strip().lower() if isinstance(status, str) else "unknown"

    def read_json(self, entry: Entry) -> Any:
        """A small JSON file of the job (progress.json, trainer_state.json)."""
        with self.open(entry, allow_growth=True) as f:
            return json.loads(f.read(MAX_JSON_BYTES))

    def modified_ns(self, job: Job) -> int:
        """When the job folder (or, before it exists, its log) last changed."""
        for entry in (job.log, job.progress):
            if job.root is None and entry is not None:
                return entry.mtime_ns
        try:
            return os.stat(job.root).st_mtime_ns if job.root else 0
        except OSError:
            return 0

    def has_model(self, job: Job) -> bool:
        if job.root is None:
            return False
        try:
            names = set(os.listdir(job.root))
        except OSError:
            return False
        return "config.json" in names and any(WEIGHT_RE.fullmatch(n) for n in names)

    # -- listing files -------------------------------------------------------

    def scan(self, job: Job, under: str | None = None, *,
             check_readable: bool = False) -> list[Entry]:
        """Every file below the job directory (or one of its folders), sorted by path.

        Symlinks are followed only when their target stays inside the job
        directory; FIFOs, sockets and devices are never listed. What is left
        out is logged as a warning. Empty folders are listed as ``is_dir``
        entries so the archive keeps them.
        """
        if job.root is None:
            return []
        top = job.root
        prefix = ""
        if under is not None:
            sub = self._child_dir(job.root, under)
            if sub is None:
                return []
            top, prefix = sub, under + "/"
        entries: list[Entry] = []
        seen_dirs: set[tuple[int, int]] = set()
        self._walk(job.root, top, prefix, entries, seen_dirs, check_readable)
        entries.sort(key=lambda e: e.path)
        return entries

    def _walk(self, job_root: str, directory: str, prefix: str, out: list[Entry],
              seen: set[tuple[int, int]], check_readable: bool) -> bool:
        """Append what ``directory`` holds to ``out``; return whether it held anything."""
        st = os.stat(directory)
        if (st.st_dev, st.st_ino) in seen:
            return True
        seen.add((st.st_dev, st.st_ino))
        try:
            items = sorted(os.scandir(directory), key=lambda d: d.name)
        except PermissionError:
            raise FileUnreadable(
                f"The folder {prefix or './'} of this job cannot be read by the server"
                " (permission denied). Fix its permissions and retry."
            ) from None
        held = False
        for item in items:
            rel = prefix + item.name
            problem = _member_name_problem(item.name)
            if problem is not None:
                logger.warning("Leaving out %r: its name %s.", rel, problem)
                continue
            path = item.path
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                real = contained(job_root, path)
                if real is None:
                    logger.warning("Leaving out %r: it is a symlink that leads outside the job.", rel)
                    continue
                try:
                    st = os.stat(real)
                except OSError:
                    logger.warning("Leaving out %r: it is a broken symlink.", rel)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    # Its target is inside the job, so its files are listed
                    # under their real names; following it would list them
                    # twice (or, visited first, hide the real folder).
                    logger.info("Leaving out %r: it is a symlink to a folder of the job.", rel)
                    continue
                path = real
            if stat.S_ISDIR(st.st_mode):
                before = len(out)
                if not self._walk(job_root, path, rel + "/", out, seen, check_readable):
                    del out[before:]
                    out.append(Entry(rel + "/", 0, st.st_mtime_ns, True, path,
                                     (st.st_dev, st.st_ino, st.st_ctime_ns)))
                held = True
            elif stat.S_ISREG(st.st_mode):
                entry = Entry(rel, st.st_size, st.st_mtime_ns, False, path,
                              (st.st_dev, st.st_ino, st.st_ctime_ns))
                if check_readable:
                    self.check_readable(entry)
                out.append(entry)
                held = True
            else:
                logger.warning("Leaving out %r: it is not a regular file or folder.", rel)
        return held

    def file(self, job: Job, path: str) -> Entry:
        """One regular file of the job by its ``/``-separated path, checked like a scan.

        Raises ``invalid_path`` (400) for a path that could never name a
        member and ``file_not_found`` (404) for one that names nothing here.
        """
        parts, missing = file_path_parts(job, path)
        if job.root is None:
            raise missing
        real = contained(job.root, os.path.join(job.root, *parts))
        if real is None:
            if os.path.lexists(os.path.join(job.root, *parts)):
                logger.warning("Refusing %r of job %r: it leads outside the job.", path, job.job_id)
            raise missing
        try:
            st = os.stat(real)
        except OSError:
            raise missing from None
        if not stat.S_ISREG(st.st_mode):
            raise missing
        entry = Entry(path, st.st_size, st.st_mtime_ns, False, real,
                      (st.st_dev, st.st_ino, st.st_ctime_ns))
        self.check_readable(entry)
        return entry

    # -- reading ------------------------------------------------------------

    def check_readable(self, entry: Entry) -> None:
        """Raise :class:`FileUnreadable` now rather than fail mid-stream later."""
        if not os.access(entry.locator, os.R_OK):
            raise FileUnreadable(
                f"The file {entry.path} of this job cannot be read by the server"
                " (permission denied). Fix its permissions and retry."
            )

    def open(self, entry: Entry, *, allow_growth: bool = False) -> BinaryIO:
        """Open ``entry`` for reading, checking it is still the file that was listed.

        With ``allow_growth`` a file that was appended to (a log) still
        matches; the caller reads only the ``entry.size`` bytes listed.
        """
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(entry.locator, flags)
        except FileNotFoundError:
            raise MemberChanged(f"{entry.path} was deleted") from None
        f = os.fdopen(fd, "rb", buffering=0)
        try:
            self.verify(entry, f, allow_growth=allow_growth)
        except BaseException:
            f.close()
            raise
        return f  # type: ignore[return-value]

    def verify(self, entry: Entry, f: BinaryIO, *, allow_growth: bool = False) -> None:
        """Raise :class:`MemberChanged` unless the open file still is ``entry``."""
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise MemberChanged(f"{entry.path} is no longer a regular file")
        if (st.st_dev, st.st_ino) != entry.identity[:2]:
            raise MemberChanged(f"{entry.path} was replaced")
        if allow_growth:
            if st.st_size < entry.size:
                raise MemberChanged(f"{entry.path} was truncated")
        elif (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (entry.size, entry.mtime_ns,
                                                              entry.identity[2]):
            # ctime too: a rewrite that restores the mtime (cp -p, rsync -t)
            # still moves the ctime, which no one can set back.
            raise MemberChanged(f"{entry.path} was modified")

    def read(self, entry: Entry, start: int = 0, length: int | None = None, *,
             chunk_size: int = 1 << 20, allow_growth: bool = False) -> Iterator[bytes]:
        """Yield ``length`` bytes of ``entry`` from ``start``, in ``chunk_size`` pieces.

        Ends with :class:`MemberChanged` if the file shrank or changed while it
        was read, so a caller never passes on a mix of old and new bytes.
        """
        if length is None:
            length = entry.size - start
        with self.open(entry, allow_growth=allow_growth) as f:
            if start:
                f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(chunk_size, remaining))
                if not chunk:
                    raise MemberChanged(f"{entry.path} was truncated while it was read")
                remaining -= len(chunk)
                yield chunk
            self.verify(entry, f, allow_growth=allow_growth)

    # -- helpers ------------------------------------------------------------

    def _child_dir(self, base: str, name: str) -> str | None:
        """The real path of folder ``base/name`` if it lies inside ``base``."""
        real = contained(base, os.path.join(base, name))
        if real is None or real == base:
            return None
        try:
            if stat.S_ISDIR(os.stat(real).st_mode):
                return real
        except OSError:
            pass
        return None

    def _root_file(self, name: str, role: str, base: str | None = None) -> Entry | None:
        """A regular file ``name`` directly in ``base`` (default: the store root)."""
        base = base or self.root
        real = contained(base, os.path.join(base, name))
        if real is None:
            if os.path.lexists(os.path.join(base, name)):
                logger.warning("Leaving out %r: it is a symlink that leads outside.", name)
            return None
        try:
            st = os.stat(real)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            if not stat.S_ISDIR(st.st_mode):
                logger.warning("Leaving out %r: it is not a regular file.", name)
            return None
        return Entry(role, st.st_size, st.st_mtime_ns, False, real,
                     (st.st_dev, st.st_ino, st.st_ctime_ns))
