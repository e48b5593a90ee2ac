"""The ``artifacts`` blueprint: download and listing routes.

Views only validate and plan (names, stats, cache look-ups); every error is
a JSON answer before the first byte. Reading happens lazily in the body.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.http import http_date, is_resource_modified

from . import archives
from .errors import ArtifactsError, InvalidParameter, json_http_error
from .extension import get_cache, get_store
from .fast import compressobj_factory
from .headers import content_disposition, iso_utc
from .jobs import job_state
from .plan import DEFLATE, STORE, Plan
from .streaming import ArchiveBody

blueprint = Blueprint("artifacts", __name__)
blueprint.register_error_handler(ArtifactsError, lambda e: e.to_response())
blueprint.register_error_handler(HTTPException, json_http_error)


@blueprint.get("/api/training/<path:job_id>/download/model")
def download_model(job_id: str) -> Response:
    """The final model and every checkpoint, or with ``?checkpoint=`` only that one."""
    store = get_store()
    job = store.job(job_id)
    checkpoint = request.args.get("checkpoint")
    plan = archives.plan_download(store, get_cache(), job, "checkpoint" if checkpoint else "model",
                                  checkpoint=checkpoint, method=_compression())
    return send_archive(plan)


@blueprint.get("/api/training/<path:job_id>/download/logs")
def download_logs(job_id: str) -> Response:
    """The training log and progress.json, deflated; allowed while the job runs."""
    store = get_store()
    plan = archives.plan_download(store, get_cache(), store.job(job_id), "logs")
    return send_archive(plan)


@blueprint.get("/api/training/checkpoints/<path:job_id>")
def list_checkpoints(job_id: str) -> Response:
    store = get_store()
    job = store.job(job_id)
    status = store.status(job)
    listed = []
    for checkpoint in store.checkpoints(job):
        entries = [e for e in store.scan(job, checkpoint.name) if not e.is_dir]
        listed.append({
            "name": checkpoint.name,
            "step": checkpoint.step,
            "bytes": sum(e.size for e in entries),
            "files": len(entries),
            "modified": iso_utc(max((e.mtime_ns for e in entries), default=0)),
            "download_url": url_for(".download_model", job_id=job.job_id,
                                    checkpoint=checkpoint.name),
        })
    return jsonify({
        "job_id": job.job_id,
        "status": status or job_state(None, store.has_model(job)),
        "state": job_state(status, store.has_model(job)),
        "checkpoints": listed,
    })


def _compression() -> str:
    value = request.args.get("compression", STORE)
    if value not in (STORE, DEFLATE):
        raise InvalidParameter(
            f"'compression' must be 'store' (the default: exact size, resumable) or"
            f" 'deflate' (smaller on slow links, no resume), not {value!r}.")
    return value


def send_archive(plan: Plan) -> Response:
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
    body = ArchiveBody(plan, get_store(), get_cache(), start=start, stop=stop,
                       chunk_size=config["ARTIFACTS_CHUNK_SIZE"],
                       get_compressobj=compressobj_factory(config["ARTIFACTS_DEFLATE_LEVEL"]))
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
