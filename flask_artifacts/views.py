"""The ``artifacts`` blueprint: download, file, manifest and listing routes.

Views only validate and plan (names, stats, cache look-ups); every error is
a JSON answer before the first byte. Reading happens lazily in the body.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import socket
from datetime import datetime, timezone
from typing import Any, Iterator

from flask import Blueprint, Response, current_app, jsonify, redirect, request, url_for
from werkzeug.datastructures import Range
from werkzeug.exceptions import HTTPException
from werkzeug.http import http_date
from werkzeug.routing import PathConverter

from . import archives, pages
from .errors import ArtifactsError, InvalidParameter, json_http_error
from .extension import authorize, get_cache, get_store, state
from .fast import compressobj_factory
from .headers import content_disposition, iso_utc
from .jobs import Entry
from .plan import DEFLATE, STORE, Plan
from .selection import parse_selection
from .signals import download_finished, download_started
from .streaming import ArchiveBody

logger = logging.getLogger("flask_artifacts")

#: Seconds a presigned redirect of ``download_file`` stays valid
#: (ARTIFACTS_PRESIGNED_REDIRECTS); a download that outlives it continues.
PRESIGNED_EXPIRES = 300

blueprint = Blueprint("artifacts", __name__, template_folder="templates")


class _AnyPath(PathConverter):
    """Any text: slashes (even leading or doubled), newlines, nothing at all.

    User input reaches the view and its JSON error (invalid_job_id,
    invalid_path) instead of werkzeug's slash-merging redirect or an HTML 404.
    """

    regex = r"[\s\S]*?"
    part_isolating = False


class _ListingId(_AnyPath):
    """Like :class:`_AnyPath`, but never what another route of a job named
    "checkpoints" would take (``checkpoints/download/model``, ``.../files/x``)."""

    regex = r"(?!(?:download/(?:model|logs)|manifest|logs/training\.log)\Z|files/)[\s\S]*?"


@blueprint.record_once
def _register_converters(setup: Any) -> None:
    setup.app.url_map.converters.setdefault("artifacts_path", _AnyPath)
    setup.app.url_map.converters.setdefault("artifacts_listing_id", _ListingId)


blueprint.register_error_handler(ArtifactsError, lambda e: e.to_response())
blueprint.register_error_handler(HTTPException, json_http_error)
blueprint.add_url_rule("/api/training/jobs", "list_jobs", pages.list_jobs)


@blueprint.record
def _register_pages(setup: Any) -> None:
    """Mount the HTML pages under ARTIFACTS_PAGES_PREFIX, unless turned off."""
    config = setup.app.config
    if config.get("ARTIFACTS_PAGES", True):
        prefix = config.get("ARTIFACTS_PAGES_PREFIX", "/jobs").rstrip("/")
        setup.add_url_rule(prefix or "/", "job_index", pages.job_index)
        setup.add_url_rule(f"{prefix}/<artifacts_path:job_id>", "job_page", pages.job_page,
                           merge_slashes=False)


@blueprint.get("/api/training/<artifacts_path:job_id>/download/model", merge_slashes=False)
def download_model(job_id: str) -> Response:
    """The final model and every checkpoint, or with ``?checkpoint=`` only that one."""
    plan, job_id, kind, checkpoint = _plan_from_request(job_id)
    return send_archive(plan, job_id, kind, checkpoint)


@blueprint.get("/api/training/<artifacts_path:job_id>/download/logs", merge_slashes=False)
def download_logs(job_id: str) -> Response:
    """The training log and progress.json, deflated; allowed while the job runs."""
    authorize(job_id, "logs", signed=True)
    store = get_store()
    job = store.job(job_id)
    plan = archives.plan_download(store, get_cache(), job, "logs")
    return send_archive(plan, job.job_id, "logs", None)


@blueprint.get("/api/training/<artifacts_path:job_id>/manifest", merge_slashes=False)
def manifest(job_id: str) -> Response:
    """What the same download would contain, with sizes, and its exact size."""
    plan, job_id, kind, checkpoint = _plan_from_request(job_id)
    config = current_app.config
    files = [m for m in plan.members if not m.generated]
    top = plan.members[0].name.split("/", 1)[0] if plan.members else ""
    hashes: dict[str, str | None] | None = None
    hint = None
    if request.args.get("sha256", "").lower() in ("1", "true", "yes", "on"):
        entries = [m.entry for m in files]
        total = sum(e.size for e in entries)
        store, cache = get_store(), get_cache()
        if total <= config["ARTIFACTS_HASH_LIMIT"]:
            _, known = archives.fill_checksums(store, cache, entries, sha256=True)
        else:
            known = {k: str(v) for k, v in cache.get(entries, "sha256").items()}
            hint = (f"The selection is over ARTIFACTS_HASH_LIMIT ({config['ARTIFACTS_HASH_LIMIT']}"
                    f" bytes); run 'flask artifacts index --sha256 {job_id}' to hash it ahead.")
        hashes = {m.name: known.get(m.entry.locator) for m in files}
    members = []
    for m in files:
        item: dict[str, Any] = {
            "path": m.name[len(top) + 1:], "name": m.name, "size": m.entry.size,
            "modified": iso_utc(m.entry.mtime_ns), "folder": m.entry.is_dir,
        }
        if hashes is not None:
            item["sha256"] = None if m.entry.is_dir else hashes[m.name]
        members.append(item)
    body: dict[str, Any] = {
        "job_id": job_id, "kind": kind, "checkpoint": checkpoint, "filename": plan.filename,
        "members": members, "files": sum(1 for m in files if not m.entry.is_dir),
        "total_bytes": sum(m.entry.size for m in files),
        "archive_bytes": plan.size, "etag": f'"{plan.etag}"' if plan.stored else None,
        "download_url": url_for(".download_model", job_id=job_id, **_selection_args()),
    }
    if hint:
        body["hint"] = hint
    return jsonify(body)


@blueprint.get("/api/training/<artifacts_path:job_id>/files/<artifacts_path:path>",
               merge_slashes=False)
def download_file(job_id: str, path: str) -> Response:
    """One file of the job, with Range and conditional requests."""
    first = path.split("/", 1)[0]
    checkpoint = first if "/" in path and first.startswith("checkpoint-") else None
    authorize(job_id, "checkpoint" if checkpoint else "model", checkpoint)
    store = get_store()
    entry = store.file(store.job(job_id), path)
    mimetype = mimetypes.guess_type(entry.path)[0] or "application/octet-stream"
    presign = getattr(store, "presigned_url", None)
    if current_app.config["ARTIFACTS_PRESIGNED_REDIRECTS"] and presign is not None:
        # Object storage serves the bytes (with Range) itself; the link is
        # made only after the authorize callback and the path checks passed.
        url = presign(entry, PRESIGNED_EXPIRES, filename=entry.path.rsplit("/", 1)[-1],
                      content_type=mimetype)
        if url:
            response = redirect(url, code=307)
            response.headers["Cache-Control"] = "no-store"
            return response
    return send_entry(entry, mimetype, attachment=True)


@blueprint.get("/api/training/<artifacts_path:job_id>/logs/training.log", merge_slashes=False)
def log_file(job_id: str) -> Response:
    """The raw training log as text; ``curl -r -4096-`` shows its tail."""
    authorize(job_id, "logs")
    store = get_store()
    job = store.job(job_id)
    if job.log is None:
        raise ArtifactsError(
            f"Job {job.job_id!r} has no log yet. It is written as soon as training starts.",
            code="logs_not_found", status=404)
    store.check_readable(job.log)
    return send_entry(job.log, "text/plain; charset=utf-8", attachment=False)


@blueprint.get("/api/training/checkpoints/<artifacts_listing_id:job_id>", merge_slashes=False)
def list_checkpoints(job_id: str) -> Response:
    authorize(job_id, "listing")
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


@blueprint.get("/healthz")
def health() -> Response:
    """200 while the job folder is reachable, else 503: for load balancers."""
    ok = get_store().reachable()
    response = jsonify({"status": "ok" if ok else "unavailable"})
    response.status_code = 200 if ok else 503
    response.headers["Cache-Control"] = "no-store"
    return response


# -- request parsing ----------------------------------------------------------


def _plan_from_request(job_id: str) -> tuple[Plan, str, str, str | None]:
    checkpoint = request.args.get("checkpoint")
    kind = "model" if checkpoint is None else "checkpoint"
    authorize(job_id, kind, checkpoint, signed=request.endpoint == "artifacts.download_model")
    store = get_store()
    job = store.job(job_id)
    config = current_app.config
    plan = archives.plan_download(
        store, get_cache(), job, kind, checkpoint=checkpoint, method=_compression(),
        settle_seconds=config["ARTIFACTS_SETTLE_SECONDS"],
        selection=parse_selection(request.args, config["ARTIFACTS_SHA256SUMS"]))
    if checkpoint is not None:  # latest / best resolve to the real name
        checkpoint = plan.filename[len(job.dir_name) + 1:-len(".zip")]
    return plan, job.job_id, kind, checkpoint


def _selection_args() -> dict[str, Any]:
    keys = ("checkpoint", "preset", "include", "exclude", "sha256sums", "compression")
    return {k: request.args.getlist(k) for k in keys if k in request.args}


def _compression() -> str:
    value = request.args.get("compression", STORE)
    if value not in (STORE, DEFLATE):
        raise InvalidParameter(
            f"'compression' must be 'store' (the default: exact size, resumable) or"
            f" 'deflate' (smaller on slow links, no resume), not {value!r}.")
    return value


# -- responses ----------------------------------------------------------------


def _conditional(headers: dict[str, str], size: int | None, etag: str,
                 last_modified: datetime, ranges: bool) -> Response | tuple[int, int, int | None]:
    """Apply If-None-Match / If-Modified-Since, then Range and If-Range.

    Returns an early response (304, 416) or ``(status, start, stop)``.
    """
    if_match = request.if_match
    if request.headers.get("If-Match") is not None:
        failed = not (if_match.star_tag or etag in {f'"{t}"' for t in if_match.as_set()})
    else:
        since = request.if_unmodified_since
        failed = since is not None and last_modified > since
    if failed:
        error = ArtifactsError("The resource changed since the version the request names"
                               " (If-Match / If-Unmodified-Since).",
                               code="precondition_failed", status=412)
        return error.to_response()  # type: ignore[no-any-return]
    opaque = etag[2:] if etag.startswith("W/") else etag
    if request.headers.get("If-None-Match") is not None:
        not_modified = request.if_none_match.contains_weak(opaque.strip('"'))
    else:
        since = request.if_modified_since
        not_modified = since is not None and last_modified <= since
    if not_modified:
        return Response(status=304, headers=headers)
    status, start, stop = 200, 0, size
    wanted = request.range
    if (ranges and size is not None and wanted is not None and wanted.units == "bytes"
            and _if_range_holds(etag, last_modified)):
        if len(wanted.ranges) == 1:  # several ranges: the whole body
            first, last = wanted.ranges[0]
            if first < 0 and last is None:  # a suffix longer than the body is all of it
                first = max(first, -size)
            span = Range("bytes", [(first, last)]).range_for_length(size) if size else None
            if span is None:
                error = ArtifactsError(
                    f"The resource is {size} bytes; the requested range lies outside it.",
                    code="range_not_satisfiable", status=416)
                error.headers["Content-Range"] = f"bytes */{size}"
                return error.to_response()  # type: ignore[no-any-return]
            status, (start, stop) = 206, span
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    if stop is not None:
        headers["Content-Length"] = str(stop - start)
    return status, start, stop


def _if_range_holds(etag: str, last_modified: datetime) -> bool:
    """Whether a ``Range`` applies: no ``If-Range``, or one naming this very resource."""
    raw = request.headers.get("If-Range")
    if raw is None:
        return True
    raw = raw.strip()
    if raw.startswith(("W/", '"')):
        return raw == etag and not etag.startswith("W/")
    if_range = request.if_range
    return if_range.date is not None and if_range.date == last_modified


def _take_slot() -> Response | None:
    if state().take_slot(current_app.config["ARTIFACTS_MAX_DOWNLOADS"]):
        return None
    busy = ArtifactsError(
        "This server is streaming as many downloads as it allows"
        " (ARTIFACTS_MAX_DOWNLOADS). Retry shortly.", code="too_many_downloads", status=429)
    busy.headers["Retry-After"] = "10"
    return busy.to_response()  # type: ignore[no-any-return]


def _guard_stalls() -> None:
    """Drop a client that stops reading after ARTIFACTS_STALL_TIMEOUT seconds."""
    stall = current_app.config["ARTIFACTS_STALL_TIMEOUT"]
    sock = request.environ.get("gunicorn.socket")
    if stall and sock is not None:
        sock.settimeout(stall)


def send_archive(plan: Plan, job_id: str, kind: str, checkpoint: str | None) -> Response:
    """Answer a planned archive: conditional requests, ranges, then the stream."""
    headers = {
        "Content-Type": "application/zip",
        "Content-Disposition": content_disposition(plan.filename),
        "Last-Modified": http_date(plan.last_modified),
        "Cache-Control": "private, no-cache",
        "ETag": f'"{plan.etag}"' if plan.stored else f'W/"{plan.etag}"',
        "Accept-Ranges": "bytes" if plan.ranges else "none",
        # nginx would otherwise spool the response to a temp file capped at 1 GiB.
        "X-Accel-Buffering": "no",
    }
    outcome = _conditional(headers, plan.size, headers["ETag"], plan.last_modified, plan.ranges)
    if isinstance(outcome, Response):
        return outcome
    status, start, stop = outcome
    busy = _take_slot()
    if busy is not None:
        return busy
    head = request.method == "HEAD"
    if not head:
        _guard_stalls()

    config = current_app.config
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    ext = state()
    record = {"job_id": job_id, "kind": kind, "checkpoint": checkpoint,
              "remote_addr": request.remote_addr}

    sock = request.environ.get("gunicorn.socket")

    def finished(body: ArchiveBody) -> None:
        if head:
            return
        if not body.completed and sock is not None:
            # gunicorn closes a connection "gracefully", waiting up to 2 s
            # for the client to hang up, on the thread that serves every
            # other request; a stalled or cut-off client never does.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        download_finished.send(app, **record, bytes_sent=body.bytes_sent,
                               completed=body.completed)
        logger.info("download %s job=%r kind=%s checkpoint=%s remote=%s range=%s bytes=%d %s",
                    plan.filename, job_id, kind, checkpoint, record["remote_addr"],
                    headers.get("Content-Range", "-"), body.bytes_sent,
                    "completed" if body.completed else "cut off")

    body = ArchiveBody(plan, get_store(), get_cache(), start=start, stop=stop,
                       chunk_size=config["ARTIFACTS_CHUNK_SIZE"],
                       get_compressobj=compressobj_factory(config["ARTIFACTS_DEFLATE_LEVEL"]),
                       on_close=[finished], release=ext.give_slot)
    if not head:
        download_started.send(app, **record)
    return Response(body, status=status, headers=headers, direct_passthrough=True)


def send_entry(entry: Entry, mimetype: str, *, attachment: bool) -> Response:
    """One file: ETag from its path, size and time (the same on every host)."""
    store = get_store()
    tag = hashlib.sha256(f"{entry.path}\0{entry.size}\0{entry.mtime_ns}".encode()).hexdigest()[:32]
    modified = datetime.fromtimestamp(entry.mtime_ns // 1_000_000_000, tz=timezone.utc)
    modified = min(modified, datetime.now(timezone.utc).replace(microsecond=0))
    name = entry.path.rsplit("/", 1)[-1]
    headers = {
        "Content-Type": mimetype,
        "ETag": f'"{tag}"',
        "Last-Modified": http_date(modified),
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, no-cache",
        "X-Accel-Buffering": "no",
    }
    if attachment:
        headers["Content-Disposition"] = content_disposition(name)
    outcome = _conditional(headers, entry.size, headers["ETag"], modified, True)
    if isinstance(outcome, Response):
        return outcome
    status, start, stop = outcome
    assert stop is not None
    if request.method == "HEAD":
        return Response(status=status, headers=headers)
    _guard_stalls()
    f = store.open(entry, allow_growth=True)
    wrapper = request.environ.get("wsgi.file_wrapper")
    if "gunicorn.socket" in request.environ and wrapper is not None:
        # gunicorn sends exactly Content-Length bytes from the file's position
        # with sendfile(2): the bytes never pass through Python.
        f.seek(start)
        return Response(wrapper(f, 1 << 20), status=status, headers=headers,
                        direct_passthrough=True)
    return Response(_file_range(f, start, stop - start), status=status, headers=headers,
                    direct_passthrough=True)


class _file_range:
    """``length`` bytes of an open file from ``start``; closes it in ``close()``."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        self.f, self.start, self.length = f, start, length

    def __iter__(self) -> Iterator[bytes]:
        self.f.seek(self.start)
        remaining = self.length
        while remaining > 0:
            chunk = self.f.read(min(remaining, 1 << 20))
            if not chunk:
                raise OSError("file ended before its listed size")
            remaining -= len(chunk)
            yield chunk

    def close(self) -> None:
        self.f.close()
