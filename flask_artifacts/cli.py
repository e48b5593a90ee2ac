"""``flask artifacts``: look at jobs and fill the checksum cache ahead of downloads."""

from __future__ import annotations

import click
from flask.cli import with_appcontext

from . import archives
from .errors import ArtifactsError
from .extension import get_cache, get_store, job_status
from .headers import iso_utc
from .jobs import job_state

cli = click.Group("artifacts", help="Training job downloads.")


@cli.command("jobs")
@with_appcontext
def jobs_command() -> None:
    """List the jobs in ARTIFACTS_LOGS_DIR with their state."""
    store = get_store()
    for job_id in store.job_ids():
        try:
            job = store.job(job_id)
        except ArtifactsError:
            continue  # a name that leads outside LOGS_DIR, or removed meanwhile
        click.echo(f"{job_id}\t{job_state(job_status(store, job), store.has_model(job))}")


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
@click.option("--sha256", is_flag=True, help="Also cache SHA-256 (manifest, SHA256SUMS).")
@with_appcontext
def index_command(job_id: str, sha256: bool) -> None:
    """Compute and cache the checksums of every file of a job.

    Run it when a job completes, so its first download and any resume
    start without a read pass.
    """
    store, cache = get_store(), get_cache()
    job = _job(job_id)
    entries = [e for e in store.scan(job) if not e.is_dir]
    read, _ = archives.fill_checksums(store, cache, entries, sha256=sha256)
    click.echo(f"{job_id}: {len(entries)} files, {read} read, {len(entries) - read} already cached")


@cli.command("demo")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--job-id", default="demo", show_default=True)
def demo_command(directory: str, job_id: str) -> None:
    """Write a small, realistic training job into DIRECTORY (a LOGS_DIR) to try the routes."""
    from .demo import write_demo_job

    root = write_demo_job(directory, job_id)
    click.echo(f"Wrote {root}. Serve it with: LOGS_DIR={directory} gunicorn -c gunicorn.conf.py")


def _job(job_id: str):  # type: ignore[no-untyped-def]
    try:
        return get_store().job(job_id)
    except ArtifactsError as exc:
        raise click.ClickException(exc.message) from None
