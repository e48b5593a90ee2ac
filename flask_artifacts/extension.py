"""The Flask extension: configuration and per-app state."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Union

from flask import Flask, current_app

from .cache import ChecksumCache
from .jobs import LocalStore

if TYPE_CHECKING:
    from .objectstore import FsspecStore

#: What serves the jobs: a local folder, or object storage through fsspec.
Store = Union[LocalStore, "FsspecStore"]

#: Configuration keys, their defaults and what they do.
DEFAULTS: dict[str, Any] = {
    # The folder the training server writes jobs into (its LOGS_DIR), or an
    # fsspec URL such as "s3://bucket/prefix" for jobs on object storage.
    "ARTIFACTS_LOGS_DIR": None,
    # Object storage only: options for fsspec.core.url_to_fs (s3fs's
    # S3FileSystem for s3://), e.g. {"client_kwargs": {"endpoint_url": ...}};
    # credentials and the endpoint may also come from AWS_* variables.
    "ARTIFACTS_STORAGE_OPTIONS": {},
    # Object storage only: answer /files/<path> with a 307 redirect to a
    # presigned URL valid for 5 minutes, so the bytes skip the worker.
    "ARTIFACTS_PRESIGNED_REDIRECTS": False,
    # Object storage only: ranged GETs of ARTIFACTS_CHUNK_SIZE one read keeps
    # in flight; memory per download is about this many chunks.
    "ARTIFACTS_READ_AHEAD": 4,
    # Mount every route under this prefix, for example "/artifacts".
    "ARTIFACTS_URL_PREFIX": "",
    # Where member checksums are cached; never inside ARTIFACTS_LOGS_DIR.
    # Default: "artifacts-cache" in the app's instance folder.
    "ARTIFACTS_CACHE_DIR": None,
    # Bytes read from a file, and written to the socket, at a time.
    "ARTIFACTS_CHUNK_SIZE": 1 << 20,
    # Deflate level of the logs archive and of ?compression=deflate.
    "ARTIFACTS_DEFLATE_LEVEL": 1,
    # Seconds a download may wait on a client that stopped reading before it
    # is dropped and its thread freed (gunicorn's timeout does not cover this).
    # A client slower than ARTIFACTS_CHUNK_SIZE per this many seconds counts
    # as stalled. None turns it off.
    "ARTIFACTS_STALL_TIMEOUT": 300,
    # Downloads one worker process streams at once; more are answered 429.
    "ARTIFACTS_MAX_DOWNLOADS": 64,
    # While a job runs, a checkpoint without trainer_state.json, or with a
    # file modified less than this many seconds ago, is still being written:
    # it is left out of listings and asking for it answers 409.
    "ARTIFACTS_SETTLE_SECONDS": 10,
    # Add a SHA256SUMS file (read by 'sha256sum -c') to model and checkpoint
    # archives by default; ?sha256sums=0/1 overrides it per download.
    "ARTIFACTS_SHA256SUMS": False,
    # The manifest's ?sha256=1 hashes a selection on the spot only below this
    # many bytes; larger ones need 'flask artifacts index --sha256' first.
    "ARTIFACTS_HASH_LIMIT": 1 << 30,
    # Serve the HTML job pages (index and detail) under ARTIFACTS_PAGES_PREFIX.
    "ARTIFACTS_PAGES": True,
    "ARTIFACTS_PAGES_PREFIX": "/jobs",
    # Behind a proxy (nginx): honour X-Forwarded-For, -Proto, -Host and
    # -Prefix, one hop, via werkzeug's ProxyFix. Only set it behind a proxy
    # that overwrites those headers.
    "ARTIFACTS_TRUST_PROXY": False,
}


class _State:
    """What the extension keeps per app, made on first use."""

    def __init__(self, artifacts: Artifacts) -> None:
        self.artifacts = artifacts
        self._store: Store | None = None
        self._store_root: Any = None
        self._cache: ChecksumCache | None = None
        self._lock = threading.Lock()
        self.downloads = 0

    def take_slot(self, limit: int | None) -> bool:
        """Count one more running download, unless ``limit`` are running."""
        with self._lock:
            if limit is not None and self.downloads >= limit:
                return False
            self.downloads += 1
            return True

    def give_slot(self) -> None:
        with self._lock:
            self.downloads -= 1

    def store(self, app: Flask) -> Store:
        root = app.config["ARTIFACTS_LOGS_DIR"]
        if not root:
            raise RuntimeError(
                "'ARTIFACTS_LOGS_DIR' must be set to the training server's job folder"
                " (its LOGS_DIR) before flask-artifacts can serve downloads."
            )
        if self._store is None or self._store_root != root:
            self._store, self._store_root = self._make_store(app, os.fspath(root)), root
        return self._store

    @staticmethod
    def _make_store(app: Flask, root: str) -> Store:
        """A LocalStore for a path (or file:// URL), an FsspecStore for other URLs."""
        if root.startswith("file://"):
            return LocalStore(root[len("file://"):])
        if "://" not in root:
            return LocalStore(root)
        try:
            from .objectstore import FsspecStore
        except ImportError as exc:  # fsspec or the protocol's package is missing
            raise RuntimeError(
                f"'ARTIFACTS_LOGS_DIR' is the URL {root!r}, which needs fsspec and the"
                f" package for its protocol: pip install 'flask-artifacts[s3]' ({exc})."
            ) from exc
        return FsspecStore(root, app.config["ARTIFACTS_STORAGE_OPTIONS"],
                           read_ahead=app.config["ARTIFACTS_READ_AHEAD"])

    def cache(self, app: Flask) -> ChecksumCache:
        if self._cache is None:
            directory = app.config["ARTIFACTS_CACHE_DIR"]
            if directory is None:
                directory = os.path.join(app.instance_path, "artifacts-cache")
            store = self.store(app)
            real = os.path.realpath(directory)
            # Object storage is not a local folder the cache could be inside.
            if (isinstance(store, LocalStore)
                    and os.path.commonpath([store.root, real]) == store.root):
                raise RuntimeError(
                    "'ARTIFACTS_CACHE_DIR' must not be inside 'ARTIFACTS_LOGS_DIR':"
                    " downloads never write to the job folder. Choose another folder."
                )
            self._cache = ChecksumCache(directory)
        return self._cache


class Artifacts:
    """Serve training jobs' models, checkpoints and logs as ZIP downloads.

    ::

        artifacts = Artifacts(app)
        # or, with an app factory:
        artifacts = Artifacts()
        artifacts.init_app(app)

    Registers the ``artifacts`` blueprint under ``ARTIFACTS_URL_PREFIX``.
    Callbacks are registered with the :meth:`authorize` and
    :meth:`job_status_loader` decorators.
    """

    def __init__(self, app: Flask | None = None) -> None:
        self._authorize: Callable[[str, str, str | None], bool] | None = None
        self._status_loader: Callable[[str], str | None] | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if "artifacts" in app.extensions:
            raise RuntimeError(
                "flask-artifacts is already registered on this app. Call"
                " 'init_app' once per app."
            )
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        app.extensions["artifacts"] = _State(self)
        if app.config["ARTIFACTS_TRUST_PROXY"]:
            from werkzeug.middleware.proxy_fix import ProxyFix

            app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
                app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_prefix=1)

        from .cli import cli
        from .pages import human_bytes, job_links
        from .views import blueprint

        app.register_blueprint(blueprint, url_prefix=app.config["ARTIFACTS_URL_PREFIX"] or None)
        app.add_template_global(job_links, "artifacts_job_links")
        app.add_template_filter(human_bytes, "artifacts_bytes")
        app.cli.add_command(cli)

    def authorize(self, callback: Callable[[str, str, str | None], bool]
                  ) -> Callable[[str, str, str | None], bool]:
        """Register ``callback(job_id, kind, checkpoint) -> bool`` deciding access.

        ``kind`` is one of "model", "checkpoint", "logs", "listing", "page"
        or "index". Return False to refuse (403), or raise werkzeug's
        ``Unauthorized`` (401) when no user is known. It runs before the
        job is looked up, so a refusal says nothing of whether it exists.
        Without a callback everything is allowed (a single-user server).
        """
        self._authorize = callback
        return callback

    def job_status_loader(self, callback: Callable[[str], str | None]
                          ) -> Callable[[str], str | None]:
        """Register ``callback(job_id) -> status or None`` replacing progress.json.

        Returning None falls back to progress.json.
        """
        self._status_loader = callback
        return callback

    def signed_url(self, job_id: str, kind: str = "model", checkpoint: str | None = None,
                   expires_in: int = 3600, _external: bool = False, **selection: Any) -> str:
        """A download URL that works without credentials until it expires.

        :param kind: "model", "checkpoint" or "logs".
        :param selection: ``preset``, ``include``, ``exclude``, ``sha256sums``,
            ``compression``; covered by the signature like the rest.
        """
        from flask import url_for

        from .access import SIGNED_PARAMS, sign

        if kind not in ("model", "checkpoint", "logs"):
            raise ValueError(f"'kind' must be 'model', 'checkpoint' or 'logs', not {kind!r}.")
        unknown = set(selection) - set(SIGNED_PARAMS)
        if unknown:
            raise TypeError(f"Unknown selection parameters: {', '.join(sorted(unknown))}.")
        if kind == "checkpoint" and checkpoint is None:
            raise ValueError("A 'checkpoint' download needs the checkpoint's name.")
        params: dict[str, list[str]] = {}
        if checkpoint is not None and kind != "logs":
            params["checkpoint"] = [checkpoint]
            kind = "checkpoint"
        for key, value in selection.items():
            if value is None:
                continue
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            params[key] = [str(int(v)) if isinstance(v, bool) else str(v) for v in values]
        endpoint = "artifacts.download_logs" if kind == "logs" else "artifacts.download_model"
        return url_for(endpoint, job_id=job_id, _external=_external, **params,
                       **sign(job_id, kind, params, expires_in))


def state() -> _State:
    try:
        return current_app.extensions["artifacts"]  # type: ignore[no-any-return]
    except KeyError:
        raise RuntimeError(
            "flask-artifacts is not registered on this app. Call 'Artifacts(app)'"
            " or 'artifacts.init_app(app)' first."
        ) from None


def get_store() -> Store:
    return state().store(current_app._get_current_object())  # type: ignore[attr-defined]


def get_cache() -> ChecksumCache:
    return state().cache(current_app._get_current_object())  # type: ignore[attr-defined]


def job_status(store: Store, job: Any) -> str | None:
    """The job's raw status: the registered loader's answer, else progress.json."""
    loader = state().artifacts._status_loader
    if loader is not None:
        status = loader(job.job_id)
        if status is not None:
            return str(status).strip().lower()
    return store.status(job)


def authorize(job_id: str, kind: str, checkpoint: str | None = None, *,
              signed: bool = False) -> None:
    """Refuse the request unless a signed link or the callback allows it.

    Runs before the job is looked up, so a refused caller gets the same
    answer for a real job and a made-up one. ``signed`` routes (the archive
    downloads that :meth:`Artifacts.signed_url` builds) also accept a valid
    signature; other routes never do, so a link cannot be moved onto them.
    """
    from .access import Forbidden, check_signature
    from .jobs import validate_job_id

    validate_job_id(job_id)
    if signed and check_signature(job_id, kind):
        return
    callback = state().artifacts._authorize
    if callback is not None and not callback(job_id, kind, checkpoint):
        raise Forbidden("You are not allowed to see this job's artifacts.")
