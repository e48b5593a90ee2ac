"""The Flask extension: configuration and per-app state."""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, current_app

from .cache import ChecksumCache
from .jobs import LocalStore

#: Configuration keys, their defaults and what they do.
DEFAULTS: dict[str, Any] = {
    # The folder the training server writes jobs into (its LOGS_DIR).
    "ARTIFACTS_LOGS_DIR": None,
    # Mount every route under this prefix, for example "/artifacts".
    "ARTIFACTS_URL_PREFIX": "",
    # Where member checksums are cached; never inside ARTIFACTS_LOGS_DIR.
    # Default: "artifacts-cache" in the app's instance folder.
    "ARTIFACTS_CACHE_DIR": None,
    # Bytes read from a file, and written to the socket, at a time.
    "ARTIFACTS_CHUNK_SIZE": 1 << 20,
    # Deflate level of the logs archive and of ?compression=deflate.
    "ARTIFACTS_DEFLATE_LEVEL": 1,
}


class _State:
    """What the extension keeps per app, made on first use."""

    def __init__(self, artifacts: Artifacts) -> None:
        self.artifacts = artifacts
        self._store: LocalStore | None = None
        self._store_root: Any = None
        self._cache: ChecksumCache | None = None

    def store(self, app: Flask) -> LocalStore:
        root = app.config["ARTIFACTS_LOGS_DIR"]
        if not root:
            raise RuntimeError(
                "'ARTIFACTS_LOGS_DIR' must be set to the training server's job folder"
                " (its LOGS_DIR) before flask-artifacts can serve downloads."
            )
        if self._store is None or self._store_root != root:
            self._store, self._store_root = LocalStore(root), root
        return self._store

    def cache(self, app: Flask) -> ChecksumCache:
        if self._cache is None:
            directory = app.config["ARTIFACTS_CACHE_DIR"]
            if directory is None:
                directory = os.path.join(app.instance_path, "artifacts-cache")
            store_root = self.store(app).root
            real = os.path.realpath(directory)
            if os.path.commonpath([store_root, real]) == store_root:
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
    """

    def __init__(self, app: Flask | None = None) -> None:
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

        from .cli import cli
        from .views import blueprint

        app.register_blueprint(blueprint, url_prefix=app.config["ARTIFACTS_URL_PREFIX"] or None)
        app.cli.add_command(cli)


def state() -> _State:
    try:
        return current_app.extensions["artifacts"]  # type: ignore[no-any-return]
    except KeyError:
        raise RuntimeError(
            "flask-artifacts is not registered on this app. Call 'Artifacts(app)'"
            " or 'artifacts.init_app(app)' first."
        ) from None


def get_store() -> LocalStore:
    return state().store(current_app._get_current_object())  # type: ignore[attr-defined]


def get_cache() -> ChecksumCache:
    return state().cache(current_app._get_current_object())  # type: ignore[attr-defined]
