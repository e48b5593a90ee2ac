"""Single files and the raw training log (issue 6).

``GET /api/training/<id>/files/<path>`` and ``GET /api/training/<id>/logs/training.log``
through the test client on a real Trainer-layout tree: bytes, Range,
conditional requests, HEAD, and path safety.
"""

from __future__ import annotations

import os
import threading
import typing as t
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.http import http_date

import flask_artifacts
from jobtree import make_job

JOB = "abc123"
FILES_URL = f"/api/training/{JOB}/files/"
LOG_URL = f"/api/training/{JOB}/logs/training.log"


class _Client(FlaskClient):
    """Reads each body whole, so every response is closed."""

    def open(self, *args: t.Any, buffered: bool = True, **kwargs: t.Any) -> t.Any:
        return super().open(*args, buffered=buffered, **kwargs)


# -- fixtures (named apart from tests/conftest.py's) ---------------------------


@pytest.fixture
def files_logs(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def files_app(tmp_path: Path, files_logs: Path) -> Flask:
    app = flask_artifacts.create_app({
        "TESTING": True,
        "ARTIFACTS_LOGS_DIR": str(files_logs),
        "ARTIFACTS_CACHE_DIR": str(tmp_path / "cache"),
    })
    app.test_client_class = _Client
    return app


@pytest.fixture
def files_client(files_app: Flask) -> FlaskClient:
    return files_app.test_client()


@pytest.fixture
def files_job(files_logs: Path) -> Path:
    return make_job(files_logs, JOB, checkpoints=(10, 20))


# -- helpers -------------------------------------------------------------------


def error_of(response: t.Any, status: int, code: str) -> dict[str, t.Any]:
    assert response.status_code == status, (response.status_code, response.data[:300])
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] == code, body
    return body


def refused(response: t.Any, secret: bytes) -> None:
    """A JSON 400 invalid_path or 404 file_not_found, with none of ``secret``."""
    assert response.status_code in (400, 404), (response.status_code, response.data[:300])
    assert response.mimetype == "application/json", response.data[:300]
    assert response.get_json()["error"] in ("invalid_path", "file_not_found")
    assert secret not in response.data
    assert b"root:" not in response.data


# -- single files --------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "model.safetensors",
    "config.json",
    "training_args.bin",
    "checkpoint-20/trainer_state.json",
    "checkpoint-10/optimizer.pt",
    "checkpoint-20/rng_state.pth",
])
def test_file_bytes(files_job: Path, files_client: FlaskClient, path: str) -> None:
    data = (files_job / path).read_bytes()
    response = files_client.get(FILES_URL + path)
    assert response.status_code == 200
    assert response.data == data
    assert int(response.headers["Content-Length"]) == len(data)
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["ETag"].startswith('"')
    assert response.headers["Content-Disposition"] == (
        f'attachment; filename="{path.rsplit("/", 1)[-1]}"')
    if path.endswith(".json"):
        assert response.mimetype == "application/json"


def test_file_of_a_sharded_model(files_logs: Path, files_client: FlaskClient) -> None:
    job = make_job(files_logs, JOB, sharded=True, checkpoints=(10,))
    for path in ("model-00002-of-00002.safetensors", "model.safetensors.index.json",
                 "checkpoint-10/model-00001-of-00002.safetensors"):
        response = files_client.get(FILES_URL + path)
        assert response.status_code == 200
        assert response.data == (job / path).read_bytes()


def test_file_ranges(files_job: Path, files_client: FlaskClient) -> None:
    data = (files_job / "model.safetensors").read_bytes()
    size = len(data)
    assert size > 200
    for spec, piece, (lo, hi) in (
        ("bytes=0-9", data[:10], (0, 9)),
        ("bytes=-100", data[-100:], (size - 100, size - 1)),
        ("bytes=100-", data[100:], (100, size - 1)),
        (f"bytes=5-{size + 1000}", data[5:], (5, size - 1)),
    ):
        response = files_client.get(FILES_URL + "model.safetensors", headers={"Range": spec})
        assert response.status_code == 206, spec
        assert response.headers["Content-Range"] == f"bytes {lo}-{hi}/{size}", spec
        assert int(response.headers["Content-Length"]) == len(piece), spec
        assert response.data == piece, spec


def test_file_range_of_a_checkpoint_file(files_job: Path, files_client: FlaskClient) -> None:
    data = (files_job / "checkpoint-20/trainer_state.json").read_bytes()
    response = files_client.get(FILES_URL + "checkpoint-20/trainer_state.json",
                                headers={"Range": "bytes=-100"})
    assert response.status_code == 206
    assert response.data == data[-100:]


@pytest.mark.parametrize("spec", ["bytes={size}-", "bytes={size}-{bigger}"])
def test_file_range_not_satisfiable(files_job: Path, files_client: FlaskClient,
                                    spec: str) -> None:
    size = (files_job / "config.json").stat().st_size
    response = files_client.get(FILES_URL + "config.json", headers={
        "Range": spec.format(size=size, bigger=size + 10)})
    error_of(response, 416, "range_not_satisfiable")
    assert response.headers["Content-Range"] == f"bytes */{size}"


def test_file_if_none_match(files_job: Path, files_client: FlaskClient) -> None:
    first = files_client.get(FILES_URL + "config.json")
    etag = first.headers["ETag"]
    again = files_client.get(FILES_URL + "config.json", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.data == b""
    assert again.headers["ETag"] == etag
    other = files_client.get(FILES_URL + "config.json", headers={"If-None-Match": '"other"'})
    assert other.status_code == 200
    assert other.data == first.data
    # A changed file has another ETag: the old one no longer gives 304.
    (files_job / "config.json").write_text('{"changed": true}\n')
    changed = files_client.get(FILES_URL + "config.json", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.data == b'{"changed": true}\n'
    assert changed.headers["ETag"] != etag


def test_file_if_modified_since(files_job: Path, files_client: FlaskClient) -> None:
    first = files_client.get(FILES_URL + "config.json")
    again = files_client.get(FILES_URL + "config.json",
                             headers={"If-Modified-Since": first.headers["Last-Modified"]})
    assert again.status_code == 304
    assert again.data == b""


def test_file_if_range(files_job: Path, files_client: FlaskClient) -> None:
    data = (files_job / "model.safetensors").read_bytes()
    first = files_client.get(FILES_URL + "model.safetensors")
    etag, modified = first.headers["ETag"], first.headers["Last-Modified"]
    for fresh in (etag, modified):
        response = files_client.get(FILES_URL + "model.safetensors",
                                    headers={"Range": "bytes=0-9", "If-Range": fresh})
        assert response.status_code == 206, fresh
        assert response.data == data[:10]
    for stale in ('"stale"', f"W/{etag}", http_date(1_000_000_000)):
        response = files_client.get(FILES_URL + "model.safetensors",
                                    headers={"Range": "bytes=0-9", "If-Range": stale})
        assert response.status_code == 200, stale
        assert "Content-Range" not in response.headers
        assert response.data == data


def test_file_if_range_after_the_file_changed(files_job: Path,
                                              files_client: FlaskClient) -> None:
    path = files_job / "checkpoint-20/trainer_state.json"
    etag = files_client.get(FILES_URL + "checkpoint-20/trainer_state.json").headers["ETag"]
    path.write_bytes(path.read_bytes() + b"\n")
    response = files_client.get(FILES_URL + "checkpoint-20/trainer_state.json",
                                headers={"Range": "bytes=0-9", "If-Range": etag})
    assert response.status_code == 200
    assert response.data == path.read_bytes()


def test_file_head(files_job: Path, files_client: FlaskClient) -> None:
    get = files_client.get(FILES_URL + "model.safetensors")
    head = files_client.head(FILES_URL + "model.safetensors")
    assert head.status_code == 200
    assert head.data == b""
    assert dict(head.headers) == dict(get.headers)
    ranged_get = files_client.get(FILES_URL + "model.safetensors", headers={"Range": "bytes=-100"})
    ranged_head = files_client.head(FILES_URL + "model.safetensors",
                                    headers={"Range": "bytes=-100"})
    assert ranged_head.status_code == 206
    assert ranged_head.data == b""
    assert dict(ranged_head.headers) == dict(ranged_get.headers)


def test_file_symlink_inside_the_job_is_served(files_job: Path,
                                               files_client: FlaskClient) -> None:
    os.symlink("checkpoint-20/config.json", files_job / "linked.json")
    response = files_client.get(FILES_URL + "linked.json")
    assert response.status_code == 200
    assert response.data == (files_job / "checkpoint-20/config.json").read_bytes()


# -- path safety ---------------------------------------------------------------

TRAVERSALS = [
    "../secret.txt",
    "..",
    "%2e%2e/secret.txt",
    "%2E%2E/%2E%2E/secret.txt",
    "checkpoint-10/../../secret.txt",
    "a/../../secret.txt",
    "a/../../x",
    "./config.json",
    "checkpoint-10/./config.json",
    "..%2fsecret.txt",
    "..%5csecret.txt",
    "..\\secret.txt",
    "checkpoint-10%5c..%5c..%5csecret.txt",
    "config.json%00",
    "config.json%00.txt",
    "%00",
    "../job_other/model.safetensors",
    "../../etc/passwd",
    "nope.bin",
    "checkpoint-10/",
    "checkpoint-10",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversal_is_refused(files_logs: Path, files_job: Path, files_client: FlaskClient,
                              path: str) -> None:
    secret = b"top secret outside the job " * 3
    (files_logs / "secret.txt").write_bytes(secret)
    (files_logs.parent / "secret.txt").write_bytes(secret)
    make_job(files_logs, "other", checkpoints=())
    other = (files_logs / "job_other" / "model.safetensors").read_bytes()
    response = files_client.get(FILES_URL + path)
    refused(response, secret)
    assert other[-64:] not in response.data


def test_absolute_path_is_refused(files_job: Path, files_client: FlaskClient) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    response = files_client.get(FILES_URL + "/etc/passwd")
    refused(response, passwd[:32])
    response = files_client.get(FILES_URL + "%2Fetc%2Fpasswd")
    refused(response, passwd[:32])


def test_absolute_path_never_serves_outside_bytes(files_job: Path,
                                                  files_client: FlaskClient) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    response = files_client.get(FILES_URL + "/etc/passwd", follow_redirects=True)
    assert response.status_code in (400, 404)
    assert passwd[:32] not in response.data


def test_symlink_to_outside_file(files_job: Path, files_client: FlaskClient) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    os.symlink("/etc/passwd", files_job / "passwd")
    os.symlink("/etc/passwd", files_job / "checkpoint-10" / "config2.json")
    os.symlink("/etc", files_job / "etc")
    for path in ("passwd", "checkpoint-10/config2.json", "etc/passwd"):
        response = files_client.get(FILES_URL + path)
        refused(response, passwd[:32])
        assert response.status_code == 404


def test_symlink_to_another_job(files_logs: Path, files_job: Path,
                                files_client: FlaskClient) -> None:
    other = make_job(files_logs, "other", checkpoints=())
    os.symlink(other / "model.safetensors", files_job / "other.safetensors")
    response = files_client.get(FILES_URL + "other.safetensors")
    error_of(response, 404, "file_not_found")
    assert (other / "model.safetensors").read_bytes()[-64:] not in response.data


def test_fifo_does_not_hang(files_job: Path, files_client: FlaskClient) -> None:
    fifo = files_job / "pipe.bin"
    os.mkfifo(fifo)
    result: dict[str, t.Any] = {}

    def fetch() -> None:
        result["response"] = files_client.get(FILES_URL + "pipe.bin")

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock a reader stuck in open() before failing
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(5)
        pytest.fail("GET of a FIFO hung")
    error_of(result["response"], 404, "file_not_found")


def test_directory_is_not_a_file(files_job: Path, files_client: FlaskClient) -> None:
    for path in ("checkpoint-10", "checkpoint-20"):
        error_of(files_client.get(FILES_URL + path), 404, "file_not_found")


def test_unknown_job_and_bad_job_id(files_job: Path, files_client: FlaskClient) -> None:
    error_of(files_client.get("/api/training/nope/files/config.json"), 404, "job_not_found")
    response = files_client.get("/api/training/%2e%2e/files/config.json")
    assert response.status_code in (400, 404)
    assert response.mimetype == "application/json"


# -- the raw log ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["root", "inside"])
def test_log_body(files_logs: Path, files_client: FlaskClient, where: str) -> None:
    job = make_job(files_logs, JOB, log=where)
    path = files_logs / f"job_{JOB}.log" if where == "root" else job / f"job_{JOB}.log"
    data = path.read_bytes()
    response = files_client.get(LOG_URL)
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.data == data
    assert int(response.headers["Content-Length"]) == len(data)
    assert "attachment" not in response.headers.get("Content-Disposition", "")
    assert response.headers["Accept-Ranges"] == "bytes"


def test_log_of_a_job_without_folder_yet(files_logs: Path, files_client: FlaskClient) -> None:
    (files_logs / f"job_{JOB}.log").write_text("starting\n")
    response = files_client.get(LOG_URL)
    assert response.status_code == 200
    assert response.data == b"starting\n"


def test_log_tail(files_logs: Path, files_client: FlaskClient) -> None:
    make_job(files_logs, JOB, status="running", checkpoints=(10, 20))
    data = (files_logs / f"job_{JOB}.log").read_bytes()
    assert len(data) > 4096
    response = files_client.get(LOG_URL, headers={"Range": "bytes=-4096"})
    assert response.status_code == 206
    assert response.data == data[-4096:]
    assert response.headers["Content-Range"] == (
        f"bytes {len(data) - 4096}-{len(data) - 1}/{len(data)}")
    assert response.mimetype == "text/plain"


def test_log_conditional_and_head(files_logs: Path, files_client: FlaskClient) -> None:
    make_job(files_logs, JOB)
    get = files_client.get(LOG_URL)
    cached = files_client.get(LOG_URL, headers={"If-None-Match": get.headers["ETag"]})
    assert cached.status_code == 304
    assert cached.data == b""
    head = files_client.head(LOG_URL)
    assert head.status_code == 200
    assert head.data == b""
    assert dict(head.headers) == dict(get.headers)


def test_log_grows_between_requests(files_logs: Path, files_client: FlaskClient) -> None:
    make_job(files_logs, JOB, status="running", checkpoints=(10,))
    path = files_logs / f"job_{JOB}.log"
    first = files_client.get(LOG_URL)
    assert first.data == path.read_bytes()
    with open(path, "ab") as f:
        f.write(b"2024-05-01 09:10:00,000 - INFO - trainer.loop - step 14/20 loss=0.9\n")
    second = files_client.get(LOG_URL)
    now = path.read_bytes()
    assert len(now) > len(first.data)
    assert int(second.headers["Content-Length"]) == len(now)
    assert second.data == now
    assert second.headers["ETag"] != first.headers["ETag"]
    stale = files_client.get(LOG_URL, headers={"If-None-Match": first.headers["ETag"]})
    assert stale.status_code == 200
    assert stale.data == now
    tail = files_client.get(LOG_URL, headers={"Range": "bytes=-100"})
    assert tail.status_code == 206
    assert tail.data == now[-100:]
    assert tail.headers["Content-Range"].endswith(f"/{len(now)}")


def test_no_log(files_logs: Path, files_client: FlaskClient) -> None:
    make_job(files_logs, JOB, log=None)
    error_of(files_client.get(LOG_URL), 404, "logs_not_found")


def test_log_of_unknown_job(files_logs: Path, files_client: FlaskClient) -> None:
    error_of(files_client.get("/api/training/nope/logs/training.log"), 404, "job_not_found")


def test_log_symlink_outside_is_not_served(files_logs: Path, files_client: FlaskClient) -> None:
    make_job(files_logs, JOB, log=None)
    os.symlink("/etc/passwd", files_logs / f"job_{JOB}.log")
    response = files_client.get(LOG_URL)
    assert response.status_code == 404
    assert b"root:" not in response.data
