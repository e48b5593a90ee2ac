"""What each download contains: the model, one checkpoint, or the logs."""

from __future__ import annotations

import dataclasses
import time

from .cache import ChecksumCache
from .errors import ArtifactsError, JobNotCompleted
from .jobs import PROGRESS_NAME, Checkpoint, Entry, Job, LocalStore, job_state
from .plan import DEFLATE, STORE, Plan, make_plan

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


def view_job(store: LocalStore, job: Job, *, settle_seconds: float = 10,
             check_readable: bool = False) -> JobView:
    status = store.status(job)
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


def model_items(store: LocalStore, job: Job) -> list[tuple[str, Entry]]:
    """The job folder (final model and every checkpoint) under ``job_<id>/``.

    progress.json and the job's log are left out: they are the logs archive.
    """
    skip = {PROGRESS_NAME, f"{job.dir_name}.log"}
    return [(f"{job.dir_name}/{e.path}", e)
            for e in store.scan(job, check_readable=True) if e.path not in skip]


def checkpoint_items(store: LocalStore, view: JobView, name: str) -> list[tuple[str, Entry]]:
    wanted = store.checkpoint(view.job, name)  # validates, 404 naming the others
    if wanted.name in view.unsettled:
        raise ArtifactsError(
            f"{wanted.name} of job {view.job.job_id!r} is still being written: "
            f"{view.unsettled[wanted.name]}. Retry in a few seconds.",
            code="checkpoint_incomplete", status=409)
    entries = store.scan(view.job, wanted.name, check_readable=True)
    return [(e.path, e) for e in entries]


def logs_items(store: LocalStore, job: Job) -> list[tuple[str, Entry]]:
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


def plan_download(store: LocalStore, cache: ChecksumCache, job: Job, kind: str, *,
                  checkpoint: str | None = None, method: str = STORE,
                  settle_seconds: float = 10) -> Plan:
    """Plan the archive for one download, raising its JSON error if it cannot be made."""
    if kind == "logs":
        items, method, growing = logs_items(store, job), DEFLATE, True
        filename = f"{job.dir_name}_logs.zip"
    else:
        view = view_job(store, job, settle_seconds=settle_seconds)
        growing = False
        if checkpoint is not None:
            items = checkpoint_items(store, view, checkpoint)
            filename = f"{job.dir_name}_{checkpoint}.zip"
        else:
            require_completed(view)
            items = model_items(store, job)
            filename = f"{job.dir_name}_model.zip"
    checksums = {}
    if method == STORE:
        known = cache.get(e for _, e in items)
        checksums = {name: known[e.locator] for name, e in items if e.locator in known}
    return make_plan(items, method=method, filename=filename,  # type: ignore[arg-type]
                     checksums=checksums, growing=growing)
