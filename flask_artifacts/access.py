"""Who may download what: the authorize callback and signed, expiring links.

A signed link carries ``expires`` and ``signature`` query parameters; the
signature (itsdangerous, keyed by the app's ``SECRET_KEY``) covers the job,
the kind of download, the checkpoint, every selection parameter and the
expiry, so it cannot be moved to another job, widened, or kept past its
time. A valid signature stands in for the authorize callback, so ``curl``,
``wget`` and plain ``<a href>`` links work without credentials.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any, Mapping

from flask import current_app, request
from itsdangerous import BadSignature, Signer

from .errors import ArtifactsError

#: Query parameters a signature covers, besides the job and kind.
SIGNED_PARAMS = ("checkpoint", "preset", "include", "exclude", "sha256sums", "compression")
_SALT = "flask-artifacts.download"


class Forbidden(ArtifactsError, PermissionError):
    status = 403
    code = "forbidden"


def _signer() -> Signer:
    key = current_app.config.get("SECRET_KEY")
    if not key:
        raise RuntimeError(
            "'SECRET_KEY' must be set to sign download links. Set the same value on"
            " every host that serves them.")
    return Signer(key, salt=_SALT, digest_method=hashlib.sha256)


def _payload(job_id: str, kind: str, params: Mapping[str, list[str]], expires: int) -> bytes:
    covered = {k: list(params[k]) for k in SIGNED_PARAMS if params.get(k)}
    return json.dumps([job_id, kind, covered, expires], sort_keys=True,
                      ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sign(job_id: str, kind: str, params: Mapping[str, list[str]], expires_in: int) -> dict[str, Any]:
    """The ``expires`` and ``signature`` parameters for a link."""
    expires = int(time.time()) + int(expires_in)
    signature = _signer().get_signature(_payload(job_id, kind, params, expires)).decode("ascii")
    return {"expires": str(expires), "signature": signature}


def check_signature(job_id: str, kind: str) -> bool:
    """True when the request carries a valid signed link for exactly this download.

    False when it carries none; 403 when it carries a wrong or expired one.
    """
    signature = request.args.get("signature")
    if signature is None:
        return False
    expires_raw = request.args.get("expires", "")
    refused = Forbidden("This download link is not valid. Ask for a new link.",
                        code="invalid_signature")
    if not expires_raw.isdigit():
        raise refused
    expires = int(expires_raw)
    params = {k: request.args.getlist(k) for k in SIGNED_PARAMS}
    expected = _signer().get_signature(_payload(job_id, kind, params, expires))
    try:
        if not hmac.compare_digest(expected, signature.encode("ascii")):
            raise BadSignature("mismatch")
    except (BadSignature, UnicodeEncodeError):
        raise refused from None
    if expires < time.time():
        raise Forbidden("This download link has expired. Ask for a new link.",
                        code="link_expired")
    return True
