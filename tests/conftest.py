"""Fixtures: an app serving a job folder in ``tmp_path``, its clients, and a job factory."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner

from flask_artifacts.jobs import LocalStore

try:
    from tests import jobtree
    from tests.helpers import make_app
    from tests.server import GunicornServer, gunicorn_server_factory
except ImportError:  # tests/ itself on sys.path
    import jobtree  # type: ignore[no-redef]
    from helpers import make_app  # type: ignore[no-redef]
    from server import GunicornServer, gunicorn_server_factory  # type: ignore[no-redef]


@pytest.fixture
def logs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    # Not made here: the app makes it on the first download.
    return tmp_path / "cache"


@pytest.fixture
def app(logs_dir: Path, cache_dir: Path) -> Flask:
    return make_app(logs_dir, cache_dir)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


@pytest.fixture
def make_job(logs_dir: Path) -> t.Callable[..., Path]:
    """``tests.jobtree.make_job`` writing into ``logs_dir``."""

    def factory(job_id: str = "abc123", **kwargs: t.Any) -> Path:
        return jobtree.make_job(logs_dir, job_id, **kwargs)

    return factory


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int | None]]:
    """Record ``(member path, start, length)`` for every file read a download starts.

    Wraps our own :meth:`LocalStore.read`, the one place member bytes are
    read; a read is recorded only once its generator is started.
    """
    seen: list[tuple[str, int, int | None]] = []
    original = LocalStore.read

    def counting_read(self: LocalStore, entry: t.Any, start: int = 0,
                      length: int | None = None, **kwargs: t.Any) -> t.Iterator[bytes]:
        seen.append((entry.path, start, length))
        yield from original(self, entry, start, length, **kwargs)

    monkeypatch.setattr(LocalStore, "read", counting_read)
    return seen


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory
                 ) -> t.Callable[..., t.ContextManager[GunicornServer]]:
    """``with start_server(logs_dir=None, **options) as server:``, a fresh gunicorn
    with the shipped config (see ``tests/server.py``)."""
    return gunicorn_server_factory(tmp_path_factory)
