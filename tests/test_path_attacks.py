"""Path attacks: generated job ids, checkpoint names and file paths at every route.

A file outside the job folder holds a unique marker: in the folder above
``LOGS_DIR``, in a sibling folder ``logs-x`` (which a prefix check on
``/logs`` would wrongly let through, and which holds a job of the same id),
and behind symlinks inside the job that lead out. Hypothesis throws
percent-encoded, double-encoded, mixed-slash, NUL, unicode look-alike
(``．．``, ``‥``, ``⁄``, ``／``), very long and absolute names at every
route. Whatever it sends, no response (body, archive member or header)
contains the marker, every answer is a JSON error or legitimate content of
the job, and none is a 500.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import typing as t
import zipfile
from urllib.parse import quote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

try:
    from tests.jobtree import make_job
except ImportError:  # tests/ itself on sys.path
    from jobtree import make_job  # type: ignore[no-redef]

from flask_artifacts import create_app

JOB = "abc123"
RUNNING = "run1"


class Target(t.NamedTuple):
    app: Flask
    client: FlaskClient
    marker: bytes
    outside_name: str
    legit: frozenset[str]  # SHA-256 of every file a response may carry


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Target:
    base = tmp_path_factory.mktemp("attack")
    logs = base / "logs"
    job = make_job(logs, JOB, checkpoints=(10, 20))
    make_job(logs, RUNNING, status="running", checkpoints=(10,), log="inside")

    marker = b"OUTSIDE-" + os.urandom(12).hex().encode()
    outside_name = f"outside-{os.urandom(4).hex()}.txt"
    # Above LOGS_DIR, and in a sibling whose name starts with "logs".
    (base / outside_name).write_bytes(marker)
    (base / "training.log").write_bytes(marker)
    sibling = base / "logs-x"
    make_job(sibling, JOB, checkpoints=(10,),
             extra_files={"config.json": marker, outside_name: marker,
                          "checkpoint-10/trainer_state.json": marker})
    (sibling / f"job_{JOB}.log").write_bytes(marker)
    (sibling / outside_name).write_bytes(marker)
    # Symlinks inside the job that lead out of it.
    (job / "leak.txt").symlink_to(base / outside_name)
    (job / "checkpoint-10" / "leak-dir").symlink_to(sibling / f"job_{JOB}")
    (job / "checkpoint-20" / "config-link.json").symlink_to(sibling / f"job_{JOB}" / "config.json")
    (logs / f"job_{JOB}_progress.json").symlink_to(base / outside_name)

    legit = set()
    for path in logs.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert marker not in data
            legit.add(hashlib.sha256(data).hexdigest())

    app = create_app({"TESTING": True, "ARTIFACTS_LOGS_DIR": str(logs),
                      "ARTIFACTS_CACHE_DIR": str(base / "cache"), "SECRET_KEY": "attack"})
    return Target(app, app.test_client(), marker, outside_name, frozenset(legit))


# -- what is thrown -----------------------------------------------------------------------

ATOMS = [
    "..", ".", "/", "\\", "//", "../", "..\\", "..%2f", "..%5c", "%2e%2e", "%2e%2e%2f",
    "%2E%2E%5C", "%252e%252e%252f", "%25%32%65", "%c0%ae%c0%ae%c0%af", "%e0%80%ae",
    "%00", "\x00", "%0a", "\n", "\r", "\t", "%20", " ", ";", "?", "#", "&", "=", "%", "%%",
    "．．", "．", "‥", "…", "⁄", "／", "＼", "∕", "⧵", "﹒", "%ef%bc%8e%ef%bc%8e",
    "~", "$HOME", "C:", "C:\\", "c:/", "\\\\server\\share", "file:", "/etc/passwd",
    "/proc/self/environ", "..;/", "....//", ".../", ".%2e", "%2e.",
    "job_", JOB, RUNNING, "logs-x", "logs", "training.log", "progress.json",
    "checkpoint-", "checkpoint-10", "checkpoint-20", "checkpoint-١٠", "checkpoint-1e3",
    "checkpoint-10/..", "leak.txt", "leak-dir", "config.json", "latest", "best",
]

piece = st.one_of(st.sampled_from(ATOMS), st.text(max_size=6))
name = st.lists(piece, max_size=8).map("".join)
long_name = st.builds(lambda unit, n: unit * n,
                      st.sampled_from(["../", "..\\", "a", "．．／", "%2e%2e%2f", "é", "x/"]),
                      st.integers(40, 1500))
absolute = st.builds(lambda root, rest: root + rest,
                     st.sampled_from(["/", "//", "\\", "C:\\", "/..", "%2f"]), name)
attack = st.one_of(name, long_name, absolute)
# Attack names, and the real ones that let the others reach deeper code.
job_id = st.one_of(st.sampled_from([JOB, RUNNING]), attack)
checkpoint = st.one_of(st.sampled_from(["checkpoint-10", "latest", "best"]), attack)
file_path = st.one_of(
    st.sampled_from(["config.json", "checkpoint-10/config.json", "leak.txt"]),
    attack,
    st.builds(lambda a, b: f"{a}/{b}", st.sampled_from(["checkpoint-10", "checkpoint-20", "x"]),
              attack),
)


def encode(value: str, how: str) -> str:
    if how == "raw":
        return value
    if how == "percent":
        return quote(value, safe="")
    if how == "double":
        return quote(quote(value, safe=""), safe="")
    if how == "keep-slashes":
        return quote(value, safe="/\\")
    raise AssertionError(how)


encoding = st.sampled_from(["raw", "percent", "double", "keep-slashes"])


def urls(job: str, ckpt: str, path: str) -> list[str]:
    return [
        f"/api/training/{job}/download/model",
        f"/api/training/{job}/download/model?checkpoint={ckpt}",
        f"/api/training/{job}/download/logs",
        f"/api/training/checkpoints/{job}",
        f"/api/training/{job}/manifest",
        f"/api/training/{job}/manifest?checkpoint={ckpt}",
        f"/api/training/{job}/files/{path}",
        f"/api/training/{job}/logs/training.log",
        f"/jobs/{job}",
    ]


# -- what is checked ----------------------------------------------------------------------


def route_of(app: Flask, path: str) -> str | None:
    """The endpoint the app routes ``path`` to, ``"redirect"``, or None when none matches."""
    adapter = app.url_map.bind("localhost")
    try:
        endpoint, _ = adapter.match(path, method="GET")
    except RequestRedirect:
        return "redirect"
    except (NotFound, MethodNotAllowed):
        return None
    return str(endpoint)


def check(target: Target, url: str, response: t.Any) -> None:
    marker = target.marker
    status = response.status_code
    data = response.get_data()
    where = f"GET {url!r} -> {status}"
    assert status < 500, f"{where}: {data[:500]!r}"
    assert marker not in data, f"{where} leaked the outside file"
    assert target.outside_name.encode() not in data, f"{where} named the outside file"
    for key, value in response.headers.items():
        assert marker.decode() not in value, f"{where}: header {key}"
    route = route_of(target.app, response.request.path)
    mimetype = response.mimetype

    api = response.request.path.startswith("/api/")
    if status >= 400 and route not in (None, "redirect"):
        # Every error of a route of ours is a JSON answer.
        assert mimetype == "application/json", f"{where}: {mimetype} error ({route})"
        body = response.get_json()
        assert isinstance(body.get("error"), str) and body["error"], f"{where}: {body}"
        assert isinstance(body.get("message"), str) and body["message"], f"{where}: {body}"
        return
    if route is None:  # no route of the app (/api/training/ alone, a page path with a
        # slash): the host app's 404, werkzeug's page here
        assert status in (404, 405), where
        return
    if route == "redirect":  # werkzeug merges repeated slashes of page paths with a 308
        assert not api, f"{where}: the API redirected"
        assert status == 308 and response.headers.get("Location"), where
        return
    assert route.startswith("artifacts."), (where, route)
    assert status == 200, f"{where}: {data[:300]!r}"
    endpoint = route.split(".", 1)[1]
    if endpoint in ("download_model", "download_logs"):
        assert mimetype == "application/zip", where
        check_archive(target, where, data)
    elif endpoint in ("download_file", "log_file"):
        assert hashlib.sha256(data).hexdigest() in target.legit, (
            f"{where}: the body is no file of the jobs")
    elif endpoint in ("list_checkpoints", "manifest", "list_jobs"):
        assert mimetype == "application/json", where
    elif endpoint in ("job_page", "job_index"):
        assert mimetype == "text/html", where
    else:
        raise AssertionError(f"{where}: unexpected endpoint {route}")


def check_archive(target: Target, where: str, data: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name = info.filename
            parts = name.rstrip("/").split("/")
            assert not name.startswith("/") and "\\" not in name, f"{where}: {name!r}"
            assert not re.match(r"^[A-Za-z]:", name), f"{where}: {name!r}"
            assert ".." not in parts and "." not in parts, f"{where}: {name!r}"
            assert target.outside_name not in name and "leak" not in name, f"{where}: {name!r}"
            if info.is_dir():
                continue
            content = archive.read(info)
            assert target.marker not in content, f"{where}: member {name!r} leaked"
            assert hashlib.sha256(content).hexdigest() in target.legit, (
                f"{where}: member {name!r} is no file of the jobs")


def test_the_fixture_is_reachable(target):
    """Control: the real job's routes answer 200, so the property below reaches the store."""
    client = target.client
    for url in urls(JOB, "checkpoint-10", "checkpoint-10/config.json"):
        response = client.get(url, buffered=True)
        assert response.status_code == 200, (url, response.get_data()[:300])
        check(target, url, response)
    # And the symlinks out are really there, only left out.
    response = client.get(f"/api/training/{JOB}/files/leak.txt", buffered=True)
    assert response.status_code == 404 and response.get_json()["error"] == "file_not_found"


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(job=job_id, job_how=encoding, ckpt=checkpoint, ckpt_how=encoding,
       path=file_path, path_how=encoding)
def test_no_route_leaks_files_outside_the_job(target, job, job_how, ckpt, ckpt_how,
                                              path, path_how):
    client = target.client
    for url in urls(encode(job, job_how), encode(ckpt, ckpt_how), encode(path, path_how)):
        check(target, url, client.get(url, buffered=True))
