"""HTML job pages, the JSON job index, and the links host templates embed.

The pages are plain links that work without JavaScript. Override them the
Flask way: a template at ``templates/artifacts/job.html`` (or ``index.html``,
``macros.html``) in the host app wins over the packaged one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import abort, current_app, jsonify, render_template, request, url_for

from . import archives
from .errors import ArtifactsError, InvalidParameter
from .extension import authorize, get_store, job_status, state
from .headers import iso_utc
from .jobs import Job, job_state

if TYPE_CHECKING:
    from .extension import Store

MAX_PER_PAGE = 500


def human_bytes(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def job_links(job_id: str) -> dict[str, Any]:
    """What a job offers for download, with URLs and sizes, for templates.

    Available in templates as ``artifacts_job_links(job_id)``; the
    ``download_links`` macro renders it.
    """
    store = get_store()
    try:
        job = store.job(job_id)
    except ArtifactsError:
        return {"job_id": job_id, "found": False, "model": None, "checkpoints": [], "logs": None}
    view = archives.view_job(store, job,
                             settle_seconds=current_app.config["ARTIFACTS_SETTLE_SECONDS"])
    model = None
    if view.state == "completed" and job.root is not None:
        size = sum(e.size for _, e in archives.model_items(store, job))
        model = {"url": url_for("artifacts.download_model", job_id=job.job_id),
                 "bytes": size, "size": human_bytes(size)}
    checkpoints = []
    for checkpoint, entries in view.checkpoints:
        size = sum(e.size for e in entries)
        checkpoints.append({
            "name": checkpoint.name, "step": checkpoint.step, "bytes": size,
            "size": human_bytes(size),
            "url": url_for("artifacts.download_model", job_id=job.job_id,
                           checkpoint=checkpoint.name),
        })
    logs = url_for("artifacts.download_logs", job_id=job.job_id) if job.log else None
    return {"job_id": job.job_id, "found": True, "status": view.status or view.state,
            "state": view.state, "model": model, "checkpoints": checkpoints, "logs": logs,
            "log_url": url_for("artifacts.log_file", job_id=job.job_id) if job.log else None}


def _job_summary(store: Store, job: Job) -> dict[str, Any]:
    status = job_status(store, job)
    entries = store.scan(job)
    pages = current_app.config["ARTIFACTS_PAGES"]
    return {
        "job_id": job.job_id,
        "status": status or job_state(None, store.has_model(job)),
        "state": job_state(status, store.has_model(job)),
        "bytes": sum(e.size for e in entries) + (job.log.size if job.log else 0),
        "modified": iso_utc(store.modified_ns(job)),
        "page_url": url_for("artifacts.job_page", job_id=job.job_id) if pages else None,
    }


def _jobs_page() -> dict[str, Any]:
    try:
        page = int(request.args.get("page", 1))
        per_page = int(request.args.get("per_page", 50))
    except ValueError:
        raise InvalidParameter("'page' and 'per_page' must be whole numbers.") from None
    if page < 1 or not 1 <= per_page <= MAX_PER_PAGE:
        raise InvalidParameter(f"'page' starts at 1 and 'per_page' is 1 to {MAX_PER_PAGE}.")
    store = get_store()
    callback = state().artifacts._authorize
    jobs = []
    for job_id in store.job_ids():
        if callback is not None and not callback(job_id, "index", None):
            continue
        try:
            jobs.append(store.job(job_id))
        except ArtifactsError:
            continue  # removed meanwhile
    jobs.sort(key=lambda j: (-store.modified_ns(j), j.job_id))
    shown = jobs[(page - 1) * per_page: page * per_page]
    return {"jobs": [_job_summary(store, j) for j in shown], "page": page,
            "per_page": per_page, "total": len(jobs)}


def list_jobs():  # type: ignore[no-untyped-def]
    """``GET /api/training/jobs``: the job index as JSON, newest first."""
    return jsonify(_jobs_page())


def job_index():  # type: ignore[no-untyped-def]
    return render_template("artifacts/index.html", **_jobs_page())


def job_page(job_id: str):  # type: ignore[no-untyped-def]
    authorize(job_id, "page")
    links = job_links(job_id)
    if not links["found"]:
        abort(404, description=f"No job {job_id!r}.")
    return render_template("artifacts/job.html", job_id=job_id, links=links)
