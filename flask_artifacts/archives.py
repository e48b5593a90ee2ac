"""What each download contains: the model, one checkpoint, or the logs."""

from __future__ import annotations

from .cache import ChecksumCache
from .errors import ArtifactsError, JobNotCompleted
from .jobs import PROGRESS_NAME, Entry, Job, LocalStore, job_state
from .plan import DEFLATE, STORE, Plan, make_plan

KINDS = ("model", "checkpoint", "logs")


def model_items(store: LocalStore, job: Job) -> list[tuple[str, Entry]]:
    """The job folder (final model and every checkpoint) under ``job_<id>/``.

    progress.json and the job's log are left out: they are the logs archive.
    """
    skip = {PROGRESS_NAME, f"{job.dir_name}.log"}
    return [(f"{job.dir_name}/{e.path}", e)
            for e in store.scan(job, check_readable=True) if e.path not in skip]


def checkpoint_items(store: LocalStore, job: Job, name: str) -> list[tuple[str, Entry]]:
    checkpoint = store.checkpoint(job, name)
    return [(e.path, e) for e in store.scan(job, checkpoint.name, check_readable=True)]


def logs_items(job: Job) -> list[tuple[str, Entry]]:
    if job.log is None:
        raise ArtifactsError(
            f"Job {job.job_id!r} has no log yet. It is written as soon as training starts.",
            code="logs_not_found", status=404)
    items = [("logs/training.log", job.log)]
    if job.progress is not None:
        items.append(("logs/progress.json", job.progress))
    return items


def require_completed(store: LocalStore, job: Job) -> None:
    status = store.status(job)
    state = job_state(status, store.has_model(job))
    if state != "completed":
        said = status or state
        raise JobNotCompleted(
            f"Job {job.job_id!r} is {said!r}, so it has no final model to download."
            " Its checkpoints can be downloaded with ?checkpoint=<name>; list them at"
            f" /api/training/checkpoints/{job.job_id}.",
            status_reported=status, state=state)


def plan_download(store: LocalStore, cache: ChecksumCache, job: Job, kind: str, *,
                  checkpoint: str | None = None, method: str = STORE) -> Plan:
    """Plan the archive for one download, raising its JSON error if it cannot be made."""
    if kind == "logs":
        items, method, growing = logs_items(job), DEFLATE, True
        filename = f"{job.dir_name}_logs.zip"
    elif checkpoint is not None:
        items, growing = checkpoint_items(store, job, checkpoint), False
        filename = f"{job.dir_name}_{checkpoint}.zip"
    else:
        require_completed(store, job)
        items, growing = model_items(store, job), False
        filename = f"{job.dir_name}_model.zip"
    checksums = {}
    if method == STORE:
        known = cache.get(e for _, e in items)
        checksums = {name: known[e.locator] for name, e in items if e.locator in known}
    return make_plan(items, method=method, filename=filename,
                     checksums=checksums, growing=growing)  # type: ignore[arg-type]
