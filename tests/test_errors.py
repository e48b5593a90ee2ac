"""Error answers and path tricks: the right status and code, as JSON, never archive bytes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import quote

import pytest

try:
    from tests.helpers import (
        LIST_URL, LOGS_URL, MODEL_URL, assert_json_error, make_app, open_zip, snapshot_tree,
        time_limit, zip_files)
    from tests.jobtree import files_under
    from tests.jobtree import make_job as write_job
except ImportError:  # tests/ itself on sys.path
    from helpers import (  # type: ignore[no-redef]
        LIST_URL, LOGS_URL, MODEL_URL, assert_json_error, make_app, open_zip, snapshot_tree,
        time_limit, zip_files)
    from jobtree import files_under  # type: ignore[no-redef]
    from jobtree import make_job as write_job  # type: ignore[no-redef]

#: Every route that takes a job id, as a template for the raw (already encoded) id.
ROUTES = {
    "model": "/api/training/{}/download/model",
    "checkpoint": "/api/training/{}/download/model?checkpoint=checkpoint-10",
    "logs": "/api/training/{}/download/logs",
    "listing": "/api/training/checkpoints/{}",
}


@pytest.fixture
def job(make_job) -> Path:
    return make_job(checkpoints=(10, 20))


def warned(caplog: pytest.LogCaptureFixture, *words: str) -> bool:
    return any(record.levelno == logging.WARNING and all(w in record.getMessage() for w in words)
               for record in caplog.records)


# -- the error codes ------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_unknown_job_is_404_job_not_found(client, job, route):
    body = assert_json_error(client.get(ROUTES[route].format("nope")), 404, "job_not_found")
    assert "nope" in body["message"]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_job_in_progress_is_409_job_not_completed(client, make_job, method):
    make_job(status="running", checkpoints=(10,))
    response = client.open(MODEL_URL.format("abc123"), method=method)
    assert response.status_code == 409
    assert response.mimetype == "application/json"
    if method == "GET":
        assert_json_error(response, 409, "job_not_completed")


def test_failed_job_is_409_job_not_completed(client, make_job):
    make_job(status="failed", checkpoints=(10,))
    body = assert_json_error(client.get(MODEL_URL.format("abc123")), 409, "job_not_completed")
    assert "failed" in body["message"]


def test_unknown_checkpoint_is_404_naming_the_available_ones(client, job):
    body = assert_json_error(client.get(MODEL_URL.format("abc123") + "?checkpoint=checkpoint-99"),
                             404, "checkpoint_not_found")
    assert "checkpoint-10" in body["message"] and "checkpoint-20" in body["message"]


def test_checkpoint_name_that_is_a_file_is_404(client, job):
    (job / "checkpoint-5").write_bytes(b"not a folder")
    assert_json_error(client.get(MODEL_URL.format("abc123") + "?checkpoint=checkpoint-5"),
                      404, "checkpoint_not_found")


@pytest.mark.parametrize("name", [
    "../x", "..", "checkpoint-1/../..", "checkpoint-10/../../../etc", "checkpoint-١٢",
    "checkpoint-１０", "checkpoint-", "checkpoint-1a", "checkpoint--1", "CHECKPOINT-10",
    " checkpoint-10", "checkpoint-10/", "checkpoint-10%00", "%2e%2e%2fcheckpoint-10",
    "/etc/passwd", "checkpoint-10\\..\\..", "checkpoint-10%0a", "",
])
def test_bad_checkpoint_name_is_400_invalid_checkpoint(client, job, name):
    raw = name if "%" in name else quote(name, safe="")
    assert_json_error(client.get(MODEL_URL.format("abc123") + "?checkpoint=" + raw),
                      400, "invalid_checkpoint")


@pytest.mark.parametrize("value", ["gzip", "", "DEFLATE", "store,deflate", "zip"])
def test_bad_compression_is_400_invalid_parameter(client, job, value):
    body = assert_json_error(client.get(MODEL_URL.format("abc123") + "?compression=" + value),
                             400, "invalid_parameter")
    assert "compression" in body["message"]


def test_job_without_a_log_is_404_logs_not_found(client, make_job):
    make_job(log=None)
    assert_json_error(client.get(LOGS_URL.format("abc123")), 404, "logs_not_found")


def test_unsatisfiable_range_is_416_with_the_size(client, job):
    size = int(client.head(MODEL_URL.format("abc123")).headers["Content-Length"])
    response = client.get(MODEL_URL.format("abc123"), headers={"Range": f"bytes={size}-"})
    assert_json_error(response, 416, "range_not_satisfiable")
    assert response.headers["Content-Range"] == f"bytes */{size}"


def test_errors_are_not_cached(client, job):
    response = client.get(MODEL_URL.format("nope"))
    assert "no-store" in response.headers["Cache-Control"]
    assert "ETag" not in response.headers


# -- job ids ------------------------------------------------------------------------


TRICKY_IDS = {
    # raw, as it appears in the URL path: expected status and code
    "%2e%2e": (400, "invalid_job_id"),
    "%2E%2E%2F": (400, "invalid_job_id"),
    "..%2F..%2Fetc": (400, "invalid_job_id"),
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd": (400, "invalid_job_id"),
    "abc123%2F..%2F..%2Fetc": (400, "invalid_job_id"),
    "abc123/../abc123": (400, "invalid_job_id"),
    "%252e%252e": (404, "job_not_found"),  # double-encoded: a literal, unknown name
    "%252e%252e%252fetc": (404, "job_not_found"),
    "..%5C..%5Cetc": (400, "invalid_job_id"),
    "abc123%5C..": (400, "invalid_job_id"),
    "C:%5CWindows": (400, "invalid_job_id"),
    "abc123%00": (400, "invalid_job_id"),
    "%00": (400, "invalid_job_id"),
    "abc%00123": (400, "invalid_job_id"),
    "abc%0a123": (400, "invalid_job_id"),
    "abc123%0d": (400, "invalid_job_id"),
    "abc%1b123": (400, "invalid_job_id"),
    "abc%7f123": (400, "invalid_job_id"),
    ".hidden": (400, "invalid_job_id"),
    ".abc123": (400, "invalid_job_id"),
    "%2e": (400, "invalid_job_id"),
    "a" * 129: (400, "invalid_job_id"),
    "a" * 128: (404, "job_not_found"),
}


@pytest.mark.parametrize("raw", TRICKY_IDS, ids=lambda r: r[:24])
def test_tricky_job_ids_are_refused(client, job, raw):
    status, code = TRICKY_IDS[raw]
    for route, template in ROUTES.items():
        response = client.get(template.format(raw))
        try:
            assert_json_error(response, status, code)
        except AssertionError as exc:
            raise AssertionError(f"route {route}: {exc}") from None
        assert b"root:" not in response.data


@pytest.mark.parametrize("raw", ["/etc", "%2Fetc%2Fpasswd", "/abc123"])
def test_absolute_path_job_id_is_a_json_error(client, job, raw):
    # The id segment is "/etc": refused as an id, not redirected to another URL.
    for route, template in ROUTES.items():
        response = client.get(template.format(raw))
        try:
            assert_json_error(response, 400, "invalid_job_id")
        except AssertionError as exc:
            raise AssertionError(f"route {route}: {exc}") from None


# -- symlinks ---------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_symlinked_job_folder_to_etc_is_not_found(client, job, logs_dir, route):
    os.symlink("/etc", logs_dir / "job_evil")
    response = client.get(ROUTES[route].format("evil"))
    assert_json_error(response, 404, "job_not_found")
    assert b"root:" not in response.data


@pytest.mark.parametrize("route", ROUTES)
def test_sibling_folder_sharing_the_prefix_of_logs_dir_is_outside(client, job, tmp_path,
                                                                   logs_dir, route):
    # LOGS_DIR is .../logs; .../logs-x starts with the same string but is not inside.
    sibling = tmp_path / "logs-x"
    write_job(sibling, "sib", checkpoints=(10,))
    os.symlink(sibling / "job_sib", logs_dir / "job_sib")
    os.symlink(sibling / "job_sib.log", logs_dir / "job_sib.log")
    os.symlink(sibling / "job_sib" / "progress.json", logs_dir / "job_sib_progress.json")
    assert_json_error(client.get(ROUTES[route].format("sib")), 404, "job_not_found")


def test_log_symlinked_outside_logs_dir_is_not_served(client, make_job, tmp_path, logs_dir,
                                                      caplog):
    make_job(log=None)
    secret = tmp_path / "logs-x" / "secret.log"
    secret.parent.mkdir()
    secret.write_text("SECRET\n")
    os.symlink(secret, logs_dir / "job_abc123.log")
    with caplog.at_level(logging.WARNING, logger="flask_artifacts"):
        response = client.get(LOGS_URL.format("abc123"))
    assert_json_error(response, 404, "logs_not_found")
    assert warned(caplog, "job_abc123.log")


def test_progress_symlinked_outside_logs_dir_is_ignored(client, make_job, tmp_path, logs_dir):
    # Only checkpoints, no progress of its own: a foreign "completed" must not count.
    make_job(progress=None, final_model=False, checkpoints=(10,))
    outside = tmp_path / "logs-x" / "progress.json"
    outside.parent.mkdir()
    outside.write_text('{"status": "completed"}')
    os.symlink(outside, logs_dir / "job_abc123_progress.json")
    assert_json_error(client.get(MODEL_URL.format("abc123")), 409, "job_not_completed")


def test_logs_dir_reached_through_a_symlink_still_serves(make_job, logs_dir, tmp_path, cache_dir):
    job = make_job(checkpoints=(10,))
    link = tmp_path / "logs-link"
    os.symlink(logs_dir, link)
    client = make_app(link, cache_dir).test_client()
    response = client.get(MODEL_URL.format("abc123"))
    assert response.status_code == 200
    files = zip_files(open_zip(response.data), "job_abc123/")
    assert files["checkpoint-10/config.json"] == (job / "checkpoint-10/config.json").read_bytes()


def test_symlinked_job_folder_inside_logs_dir_is_served(client, job, logs_dir):
    os.symlink(job, logs_dir / "job_alias")
    response = client.get(MODEL_URL.format("alias"))
    assert response.status_code == 200
    assert all(n.startswith("job_alias/") for n in open_zip(response.data).namelist())


def test_symlink_to_etc_passwd_inside_a_job_is_left_out_with_a_warning(client, job, caplog):
    os.symlink("/etc/passwd", job / "passwd")
    os.symlink("/etc/passwd", job / "checkpoint-10" / "passwd")
    os.symlink("/etc", job / "etc")
    with caplog.at_level(logging.WARNING, logger="flask_artifacts"):
        model = client.get(MODEL_URL.format("abc123"))
        checkpoint = client.get(MODEL_URL.format("abc123") + "?checkpoint=checkpoint-10")
    for response in (model, checkpoint):
        assert response.status_code == 200
        names = open_zip(response.data).namelist()
        assert not any(n.endswith("passwd") or "/etc/" in n for n in names), names
        assert b"root:" not in response.data
    assert warned(caplog, "passwd")
    assert warned(caplog, "etc")


def test_symlink_to_a_file_inside_the_job_is_followed(client, job):
    os.symlink("checkpoint-20/model.safetensors", job / "latest.safetensors")
    os.symlink("../config.json", job / "checkpoint-10" / "config-link.json")
    response = client.get(MODEL_URL.format("abc123"))
    files = zip_files(open_zip(response.data), "job_abc123/")
    assert files["latest.safetensors"] == (job / "checkpoint-20/model.safetensors").read_bytes()
    assert files["checkpoint-10/config-link.json"] == (job / "config.json").read_bytes()


def test_symlink_to_a_file_of_another_job_is_left_out(client, job, make_job, caplog):
    other = make_job("other", checkpoints=())
    (other / "secret.bin").write_bytes(b"OTHER JOB SECRET")
    os.symlink(other / "secret.bin", job / "stolen.bin")
    with caplog.at_level(logging.WARNING, logger="flask_artifacts"):
        response = client.get(MODEL_URL.format("abc123"))
    assert response.status_code == 200
    assert "job_abc123/stolen.bin" not in open_zip(response.data).namelist()
    assert b"OTHER JOB SECRET" not in response.data
    assert warned(caplog, "stolen.bin")


def test_checkpoint_symlinked_into_another_job_is_not_served(client, job, make_job):
    # Symlinks that lead outside the job directory are never followed,
    # whichever route reaches them.
    other = make_job("other", checkpoints=(10,))
    (other / "checkpoint-10" / "secret.bin").write_bytes(b"OTHER JOB SECRET")
    os.symlink(other / "checkpoint-10", job / "checkpoint-30")

    listed = client.get(LIST_URL.format("abc123")).get_json()
    assert [c["name"] for c in listed["checkpoints"]] == ["checkpoint-10", "checkpoint-20"]
    response = client.get(MODEL_URL.format("abc123") + "?checkpoint=checkpoint-30")
    assert_json_error(response, 404, "checkpoint_not_found")
    assert b"OTHER JOB SECRET" not in client.get(MODEL_URL.format("abc123")).data


def test_checkpoint_symlinked_to_etc_is_not_served(client, job):
    os.symlink("/etc", job / "checkpoint-30")
    response = client.get(MODEL_URL.format("abc123") + "?checkpoint=checkpoint-30")
    assert_json_error(response, 404, "checkpoint_not_found")


def test_symlink_loop_and_broken_symlink_do_not_hang(client, job, caplog):
    expected = {f"job_abc123/{rel}" for rel in files_under(job) if rel != "progress.json"}
    os.symlink(".", job / "loop")
    os.symlink("..", job / "checkpoint-10" / "up")
    os.symlink("does-not-exist", job / "broken")
    with time_limit(20), caplog.at_level(logging.WARNING, logger="flask_artifacts"):
        response = client.get(MODEL_URL.format("abc123"))
    assert response.status_code == 200
    zf = open_zip(response.data)
    assert zf.testzip() is None
    assert "job_abc123/broken" not in zf.namelist()
    assert warned(caplog, "broken")
    assert expected <= set(zf.namelist())


# -- special files ------------------------------------------------------------------


def test_fifo_inside_a_job_is_left_out_without_blocking(client, job, caplog):
    os.mkfifo(job / "pipe")
    os.mkfifo(job / "checkpoint-10" / "pipe")
    with time_limit(20), caplog.at_level(logging.WARNING, logger="flask_artifacts"):
        model = client.get(MODEL_URL.format("abc123"))
        checkpoint = client.get(MODEL_URL.format("abc123") + "?checkpoint=checkpoint-10")
        listing = client.get(LIST_URL.format("abc123"))
    assert model.status_code == checkpoint.status_code == listing.status_code == 200
    assert not any(n.endswith("pipe") for n in open_zip(model.data).namelist())
    assert not any(n.endswith("pipe") for n in open_zip(checkpoint.data).namelist())
    assert warned(caplog, "pipe")


def test_fifo_as_log_or_progress_does_not_block(client, make_job, logs_dir):
    job = make_job(log=None, progress=None)
    os.mkfifo(logs_dir / "job_abc123.log")
    os.mkfifo(job / "progress.json")
    with time_limit(20):
        logs = client.get(LOGS_URL.format("abc123"))
        model = client.get(MODEL_URL.format("abc123"))
        listing = client.get(LIST_URL.format("abc123"))
    assert_json_error(logs, 404, "logs_not_found")
    assert model.status_code == 200  # config and weights, and no readable progress.json
    assert "job_abc123/progress.json" not in open_zip(model.data).namelist()
    assert listing.status_code == 200


# -- neighbouring names ----------------------------------------------------------------


def test_job_next_to_a_job_sharing_its_prefix_gets_only_its_own_files(client, make_job, logs_dir):
    job = make_job("x", checkpoints=(10,))
    evil = make_job("x-evil", checkpoints=(99,))
    (evil / "evil.bin").write_bytes(b"EVIL")
    (logs_dir / "job_x-evil.log").write_text("EVIL LOG\n")

    response = client.get(MODEL_URL.format("x"))
    zf = open_zip(response.data)
    assert all(n.startswith("job_x/") for n in zf.namelist())
    assert zip_files(zf, "job_x/") == {k: v for k, v in files_under(job).items()
                                       if k != "progress.json"}
    assert b"EVIL" not in response.data
    assert_json_error(client.get(MODEL_URL.format("x") + "?checkpoint=checkpoint-99"),
                      404, "checkpoint_not_found")
    logs = open_zip(client.get(LOGS_URL.format("x")).data)
    assert logs.read("logs/training.log") == (logs_dir / "job_x.log").read_bytes()
    assert [c["name"] for c in client.get(LIST_URL.format("x")).get_json()["checkpoints"]] == [
        "checkpoint-10"]


def test_refused_requests_leave_logs_dir_unchanged(client, job, logs_dir):
    os.symlink("/etc", logs_dir / "job_evil")
    before = snapshot_tree(logs_dir)
    for raw in ("evil", "%2e%2e", "nope", "a" * 129):
        for route in ROUTES.values():
            client.get(route.format(raw))
    assert snapshot_tree(logs_dir) == before


@pytest.mark.parametrize("raw", ["a%2Fb", "%2e%2e", "a%00b"])
def test_job_page_refuses_bad_ids_as_json(client, raw):
    response = client.get(f"/jobs/{raw}")
    assert_json_error(response, 400, "invalid_job_id")
