"""Errors a download can answer with, as JSON, before its first byte.

Each error carries a stable machine-readable ``code`` and a message that says
what happened and what to do. Errors that happen after the first byte cannot
be turned into JSON any more; they are :class:`StreamError` and end the
response early so the client sees a failed transfer.
"""

from __future__ import annotations

from typing import Any

from flask import jsonify
from werkzeug.exceptions import HTTPException


class ArtifactsError(Exception):
    """Base of every error flask-artifacts answers with."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None,
                 status: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.extra = extra
        self.headers: dict[str, str] = {}

    def to_response(self):  # type: ignore[no-untyped-def]
        body = {"error": self.code, "message": self.message, **self.extra}
        response = jsonify(body)
        response.status_code = self.status
        response.headers.update(self.headers)
        response.headers["Cache-Control"] = "no-store"
        return response


class InvalidJobId(ArtifactsError, ValueError):
    status = 400
    code = "invalid_job_id"


class InvalidCheckpoint(ArtifactsError, ValueError):
    status = 400
    code = "invalid_checkpoint"


class InvalidParameter(ArtifactsError, ValueError):
    status = 400
    code = "invalid_parameter"


class JobNotFound(ArtifactsError, LookupError):
    status = 404
    code = "job_not_found"


class CheckpointNotFound(ArtifactsError, LookupError):
    status = 404
    code = "checkpoint_not_found"


class JobNotCompleted(ArtifactsError):
    status = 409
    code = "job_not_completed"


class FileUnreadable(ArtifactsError, PermissionError):
    status = 500
    code = "file_unreadable"


class StreamError(Exception):
    """Raised inside a running stream; the response is cut short on purpose."""


class MemberChanged(StreamError):
    """A file no longer matches what the archive plan recorded for it."""


def json_http_error(error: HTTPException):  # type: ignore[no-untyped-def]
    """Answer werkzeug's HTTP errors on our routes as JSON too."""
    name = (error.name or "error").lower().replace(" ", "_")
    response = jsonify({"error": name, "message": error.description})
    response.status_code = error.code or 500
    for key, value in error.get_headers():
        if key.lower() != "content-type":
            response.headers[key] = value
    return response
