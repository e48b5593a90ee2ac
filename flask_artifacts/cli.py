"""``flask artifacts``: look at jobs and fill the checksum cache ahead of downloads."""

from __future__ import annotations

import click
from flask.cli import with_appcontext

from . import archives
from .errors import ArtifactsError
from .extension import get_cache, get_store
from .headers import iso_utc
from .jobs import job_state
from .streaming import ArchiveBody

cli = click.Group("artifacts", help="Training job downloads.")


@cli.command("jobs")
@with_appcontext
def jobs_command() -> None:
    """List the jobs in ARTIFACTS_LOGS_DIR with their state."""
    store = get_store()
    for job_id in store.job_ids():
        job = store.job(job_id)
        click.echo(f"{job_id}\t{job_state(store.status(job), store.has_model(job))}")


@cli.command("checkpoints")
@click.argument("job_id")
@with_appcontext
def checkpoints_command(job_id: str) -> None:
    """List a job's checkpoints by step, with their size."""
    store = get_store()
    job = _job(job_id)
    for checkpoint in store.checkpoints(job):
        entries = [e for e in store.scan(job, checkpoint.name) if not e.is_dir]
        newest = max((e.mtime_ns for e in entries), default=0)
        click.echo(f"{checkpoint.name}\t{sum(e.size for e in entries)}\t{iso_utc(newest)}")


@cli.command("index")
@click.argument("job_id")
@with_appcontext
def index_command(job_id: str) -> None:
    """Compute and cache the CRC-32 of every file of a job's downloads.

    Run it when a job completes, so its first download and any resume
    start without a read pass.
    """
    store, cache = get_store(), get_cache()
    job = _job(job_id)
    plans = [archives.plan_download(store, cache, job, "checkpoint", checkpoint=c.name)
             for c in store.checkpoints(job)]
    try:
        plans.append(archives.plan_download(store, cache, job, "model"))
    except ArtifactsError:
        pass  # an unfinished job has only its checkpoints to index
    files = computed = 0
    for plan in plans:
        body = ArchiveBody(plan, store, cache)
        try:
            for index, member in enumerate(plan.members):
                if member.entry.is_dir:
                    continue
                files += 1
                if member.crc is None:
                    body._crc(index)
                    computed += 1
        finally:
            body.close()
    click.echo(f"{job_id}: {files} files, {computed} checksums computed, {files - computed} cached")


def _job(job_id: str):  # type: ignore[no-untyped-def]
    try:
        return get_store().job(job_id)
    except ArtifactsError as exc:
        raise click.ClickException(exc.message) from None
