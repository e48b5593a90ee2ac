"""What each download contains: the model, one checkpoint, or the logs."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import TYPE_CHECKING

from . import fast
from .cache import ChecksumCache
from .errors import ArtifactsError, CheckpointNotFound, JobNotCompleted, MemberChanged
from .extension import job_status
from .jobs import PROGRESS_NAME, Checkpoint, Entry, Job, job_state
from .plan import DEFLATE, STORE, Plan, make_plan
from .selection import Selection

if TYPE_CHECKING:
    from .extension import Store

KINDS = ("model", "checkpoint", "logs")


@dataclasses.dataclass(frozen=True)
class JobView:
    """A job with its state and the checkpoints a download may offer."""

    job: Job
    status: str | None
    state: str
    #: Checkpoints by step, each with its files; unsettled ones left out
    #: while the job runs.
    checkpoints: tuple[tuple[Checkpoint, tuple[Entry, ...]], ...]
    #: Checkpoints left out because they are still being written, with why.
    unsettled: dict[str, str]


def view_job(store: Store, job: Job, *, settle_seconds: float = 10,
             check_readable: bool = False) -> JobView:
    status = job_status(store, job)
    state = job_state(status, store.has_model(job))
    listed, unsettled = [], {}
    for checkpoint in store.checkpoints(job):
        entries = tuple(store.scan(job, checkpoint.name, check_readable=check_readable))
        reason = _still_written(checkpoint, entries, settle_seconds) if state == "in_progress" else None
        if reason is None:
            listed.append((checkpoint, entries))
        else:
            unsettled[checkpoint.name] = reason
    return JobView(job, status, state, tuple(listed), unsettled)


def _still_written(checkpoint: Checkpoint, entries: tuple[Entry, ...],
                   settle_seconds: float) -> str | None:
    """Why a checkpoint of a running job looks unfinished, or None."""
    if not any(e.path == f"{checkpoint.name}/trainer_state.json" for e in entries):
        return "it has no trainer_state.json yet, which the Trainer writes last"
    newest = max(e.mtime_ns for e in entries) / 1e9
    age = time.time() - newest
    if age < settle_seconds:
        return f"a file in it was modified {age:.0f} s ago (settles after {settle_seconds:g} s)"
    return None


def model_items(store: Store, job: Job) -> list[tuple[str, Entry]]:
    """The job folder (final model and every checkpoint) under ``job_<id>/``.

    progress.json and the job's log are left out: they are the logs archive.
    """
    skip = {PROGRESS_NAME, f"{job.dir_name}.log"}
    return [(f"{job.dir_name}/{e.path}", e)
            for e in store.scan(job, check_readable=True) if e.path not in skip]


def resolve_checkpoint(store: Store, view: JobView, name: str) -> Checkpoint:
    """The checkpoint asked for: a name, ``latest`` (highest step) or ``best``."""
    settled = [c for c, _ in view.checkpoints]
    if name == "latest":
        if not settled:
            raise CheckpointNotFound(f"Job {view.job.job_id!r} has no finished checkpoint yet.",
                                     available=[])
        return settled[-1]
    if name == "best":
        return _best_checkpoint(store, view, settled)
    wanted = store.checkpoint(view.job, name)  # validates, 404 naming the others
    if wanted.name in view.unsettled:
        raise ArtifactsError(
            f"{wanted.name} of job {view.job.job_id!r} is still being written: "
            f"{view.unsettled[wanted.name]}. Retry in a few seconds.",
            code="checkpoint_incomplete", status=409)
    return wanted


def _best_checkpoint(store: Store, view: JobView, settled: list[Checkpoint]) -> Checkpoint:
    """``best_model_checkpoint`` of the latest checkpoint's trainer_state.json."""
    names = [c.name for c in settled]
    if not settled:
        raise CheckpointNotFound(f"Job {view.job.job_id!r} has no finished checkpoint yet.",
                                 available=names)
    latest, entries = view.checkpoints[-1]
    state = next((e for e in entries if e.path == f"{latest.name}/trainer_state.json"), None)
    best = None
    if state is not None:
        try:
            best = store.read_json(state).get("best_model_checkpoint")
        except (OSError, ValueError, AttributeError, MemberChanged):
            best = None
    if not isinstance(best, str) or not best.strip("/\\"):
        raise CheckpointNotFound(
            f"The run of job {view.job.job_id!r} tracked no best checkpoint: {latest.name}/"
            "trainer_state.json has no best_model_checkpoint (set metric_for_best_model and"
            " load_best_model_at_end in the Trainer). Ask for a checkpoint by name or 'latest'.",
            available=names)
    last = best.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    for checkpoint in settled:
        if checkpoint.name == last:
            return checkpoint
    raise CheckpointNotFound(
        f"The best checkpoint of job {view.job.job_id!r}, {last!r}, is no longer there"
        f" (the Trainer's save_total_limit may have removed it). Available: {', '.join(names)}.",
        available=names)


def checkpoint_items(store: Store, checkpoint: Checkpoint, job: Job) -> list[tuple[str, Entry]]:
    entries = store.scan(job, checkpoint.name, check_readable=True)
    return [(e.path, e) for e in entries]


def logs_items(store: Store, job: Job) -> list[tuple[str, Entry]]:
    if job.log is None:
        raise ArtifactsError(
            f"Job {job.job_id!r} has no log yet. It is written as soon as training starts.",
            code="logs_not_found", status=404)
    items = [("logs/training.log", job.log)]
    if job.progress is not None:
        items.append(("logs/progress.json", job.progress))
    for _, entry in items:
        store.check_readable(entry)
    return items


def require_completed(view: JobView) -> None:
    if view.state != "completed":
        said = view.status or view.state
        raise JobNotCompleted(
            f"Job {view.job.job_id!r} is {said!r}, so it has no final model to download."
            " Its checkpoints can be downloaded with ?checkpoint=<name>; list them at"
            f" /api/training/checkpoints/{view.job.job_id}.",
            job_status=said, state=view.state)


def plan_download(store: Store, cache: ChecksumCache, job: Job, kind: str, *,
                  checkpoint: str | None = None, method: str = STORE,
                  settle_seconds: float = 10, selection: Selection | None = None) -> Plan:
    """Plan the archive for one download, raising its JSON error if it cannot be made."""
    selection = selection or Selection()
    if kind == "logs":
        items, method, growing = logs_items(store, job), DEFLATE, True
        filename, top = f"{job.dir_name}_logs.zip", "logs"
    else:
        view = view_job(store, job, settle_seconds=settle_seconds)
        growing = False
        if checkpoint is not None:
            found = resolve_checkpoint(store, view, checkpoint)
            items, top = checkpoint_items(store, found, job), found.name
            filename = f"{job.dir_name}_{found.name}.zip"
        else:
            require_completed(view)
            items, top = model_items(store, job), job.dir_name
            filename = f"{job.dir_name}_model.zip"
        if selection.narrowed:
            rels = [name[len(top) + 1:] for name, _ in items]
            items = [item for item, keep in zip(items, selection.apply(rels)) if keep]
    checksums: dict[str, int] = {}
    hashes: dict[str, str] = {}
    if method == STORE:
        entries = [e for _, e in items]
        known = cache.get(entries)
        checksums = {name: known[e.locator] for name, e in items if e.locator in known}  # type: ignore[misc]
        if selection.sha256sums:
            known = cache.get(entries, "sha256")
            hashes = {name: known[e.locator] for name, e in items if e.locator in known}  # type: ignore[misc]
    return make_plan(items, method=method, filename=filename, checksums=checksums,
                     growing=growing, sha256sums=f"{top}/SHA256SUMS" if selection.sha256sums else None,
                     hashes=hashes)


def fill_checksums(store: Store, cache: ChecksumCache, entries: list[Entry], *,
                   sha256: bool = False, chunk_size: int = 1 << 20) -> tuple[int, dict[str, str]]:
    """Compute and cache what the cache lacks for ``entries``, in one read each.

    Returns how many files were read, and every entry's SHA-256 by locator
    when ``sha256`` is asked for.
    """
    files = [e for e in entries if not e.is_dir]
    crcs = cache.get(files)
    hashes = cache.get(files, "sha256") if sha256 else {}
    read = 0
    for entry in files:
        need_crc = entry.locator not in crcs
        need_hash = sha256 and entry.locator not in hashes
        if not (need_crc or need_hash):
            continue
        crc, digest = 0, hashlib.sha256()
        for chunk in store.read(entry, chunk_size=chunk_size):
            if need_crc:
                crc = fast.crc32(chunk, crc)
            if need_hash:
                digest.update(chunk)
        read += 1
        if need_hash:
            hashes[entry.locator] = digest.hexdigest()
        cache.put(entry, crc32=crc if need_crc else None,
                  sha256=hashes[entry.locator] if need_hash else None)
    return read, {k: str(v) for k, v in hashes.items()}
