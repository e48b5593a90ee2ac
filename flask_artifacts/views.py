"""The ``artifacts`` blueprint: download and listing routes.

Views only validate and plan (names, stats, cache look-ups); every error is
a JSON answer before the first byte. Reading happens lazily in the body.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.http import http_date, is_resource_modified

from . import archives
from .errors import ArtifactsError, InvalidParameter, json_http_error
from .extension import get_cache, get_store, state
from .fast import compressobj_factory
from .headers import content_disposition, iso_utc
from .plan import DEFLATE, STORE, Plan
from .signals import download_finished, download_started
from .streaming import ArchiveBody

logger = logging.getLogger("flask_artifacts")

blueprint = Blueprint("artifacts", __name__)
blueprint.register_error_handler(ArtifactsError, lambda e: e.to_response())
blueprint.register_error_handler(HTTPException, json_http_error)


@blueprint.get("/api/training/<path:job_id>/download/model")
def download_model(job_id: str) -> Response:
    """The final model and every checkpoint, or with ``?checkpoint=`` only that one."""
    store = get_store()
    job = store.job(job_id)
    checkpoint = request.args.get("checkpoint")
    kind = "model" if checkpoint is None else "checkpoint"
    plan = archives.plan_download(
        store, get_cache(), job, kind, checkpoint=checkpoint, method=_compression(),
        settle_seconds=current_app.config["ARTIFACTS_SETTLE_SECONDS"])
    return send_archive(plan, job.job_id, kind, checkpoint)


@blueprint.get("/api/training/<path:job_id>/download/logs")
def download_logs(job_id: str) -> Response:
    """The training log and progress.json, deflated; allowed while the job runs."""
    store = get_store()
    job = store.job(job_id)
    plan = archives.plan_download(store, get_cache(), job, "logs")
    return send_archive(plan, job.job_id, "logs", None)


@blueprint.get("/api/training/checkpoints/<path:job_id>")
def list_checkpoints(job_id: str) -> Response:
    store = get_store()
    view = archives.view_job(store, store.job(job_id),
                             settle_seconds=current_app.config["ARTIFACTS_SETTLE_SECONDS"])
    listed = []
    for checkpoint, entries in view.checkpoints:
        files = [e for e in entries if not e.is_dir]
        listed.append({
            "name": checkpoint.name,
            "step": checkpoint.step,
            "bytes": sum(e.size for e in files),
            "files": len(files),
            "modified": iso_utc(max((e.mtime_ns for e in entries), default=0)),
            "download_url": url_for(".download_model", job_id=view.job.job_id,
                                    checkpoint=checkpoint.name),
        })
    return jsonify({
        "job_id": view.job.job_id,
        "status": view.status or view.state,
        "state": view.state,
        "checkpoints": listed,
    })


def _compression() -> str:
    value = request.args.get("compression", STORE)
    if value not in (STORE, DEFLATE):
        raise InvalidParameter(
            f"'compression' must be 'store' (the default: exact size, resumable) or"
            f" 'deflate' (smaller on slow links, no resume), not {value!r}.")
    return value


def send_archive(plan: Plan, job_id: str, kind: str, checkpoint: str | None) -> Response:
    """Answer a planned archive: conditional requests, ranges, then the stream."""
    headers = {
        "Content-Type": "application/zip",
        "Content-Disposition": content_disposition(plan.filename),
        "Last-Modified": http_date(plan.last_modified),
        "Cache-Control": "private, no-cache",
        # nginx would otherwise spool the response to a temp file capped at 1 GiB.
        "X-Accel-Buffering": "no",
    }
    if plan.stored:
        headers["ETag"] = f'"{plan.etag}"'
        headers["Accept-Ranges"] = "bytes"
    else:
        headers["ETag"] = f'W/"{plan.etag}"'
        headers["Accept-Ranges"] = "none"

    if not is_resource_modified(request.environ, etag=headers["ETag"],
                                last_modified=plan.last_modified):
        return Response(status=304, headers=headers)

    status, start, stop = 200, 0, plan.size
    if plan.stored and plan.size is not None and request.range is not None and _if_range_holds(plan):
        ranges = request.range.ranges
        if len(ranges) == 1:  # several ranges are answered with the whole archive
            span = request.range.range_for_length(plan.size)
            if span is None:
                error = ArtifactsError(
                    f"The archive is {plan.size} bytes; the requested range lies outside it.",
                    code="range_not_satisfiable", status=416)
                error.headers["Content-Range"] = f"bytes */{plan.size}"
                return error.to_response()  # type: ignore[no-any-return]
            status, (start, stop) = 206, span
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{plan.size}"
    if stop is not None:
        headers["Content-Length"] = str(stop - start)

    config = current_app.config
    ext = state()
    if not ext.take_slot(config["ARTIFACTS_MAX_DOWNLOADS"]):
        busy = ArtifactsError(
            "This server is streaming as many downloads as it allows"
            " (ARTIFACTS_MAX_DOWNLOADS). Retry shortly.", code="too_many_downloads", status=429)
        busy.headers["Retry-After"] = "10"
        return busy.to_response()  # type: ignore[no-any-return]
    stall = config["ARTIFACTS_STALL_TIMEOUT"]
    sock = request.environ.get("gunicorn.socket")
    if stall and sock is not None and request.method != "HEAD":
        sock.settimeout(stall)

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    record = {"job_id": job_id, "kind": kind, "checkpoint": checkpoint,
              "remote_addr": request.remote_addr}
    head = request.method == "HEAD"

    def finished(body: ArchiveBody) -> None:
        ext.give_slot()
        if head:
            return
        download_finished.send(app, **record, bytes_sent=body.bytes_sent,
                               completed=body.completed)
        logger.info("download %s job=%s kind=%s checkpoint=%s remote=%s range=%s bytes=%d %s",
                    plan.filename, job_id, kind, checkpoint, record["remote_addr"],
                    headers.get("Content-Range", "-"), body.bytes_sent,
                    "completed" if body.completed else "cut off")

    body = ArchiveBody(plan, get_store(), get_cache(), start=start, stop=stop,
                       chunk_size=config["ARTIFACTS_CHUNK_SIZE"],
                       get_compressobj=compressobj_factory(config["ARTIFACTS_DEFLATE_LEVEL"]),
                       on_close=[finished])
    if not head:
        download_started.send(app, **record)
    return Response(body, status=status, headers=headers, direct_passthrough=True)


def _if_range_holds(plan: Plan) -> bool:
    """Whether a ``Range`` applies: no ``If-Range``, or one naming this very archive."""
    raw = request.headers.get("If-Range")
    if raw is None:
        return True
    raw = raw.strip()
    if raw.startswith('"'):
        return raw == f'"{plan.etag}"'
    if_range = request.if_range
    return if_range.date is not None and if_range.date == plan.last_modified
