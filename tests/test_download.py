"""The download routes on a real Trainer job folder, through Flask's test client."""

from __future__ import annotations

import json
import os
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pytest
from flask import Flask
from safetensors import safe_open
from safetensors.numpy import load, load_file

from flask_artifacts import Artifacts, create_app

try:
    from tests.helpers import (
        LIST_URL, LOGS_URL, MODEL_URL, make_app, open_zip, snapshot_tree, zip_files)
    from tests.jobtree import files_under
    from tests.jobtree import make_job as write_job
except ImportError:  # tests/ itself on sys.path
    from helpers import (  # type: ignore[no-redef]
        LIST_URL, LOGS_URL, MODEL_URL, make_app, open_zip, snapshot_tree, zip_files)
    from jobtree import files_under  # type: ignore[no-redef]
    from jobtree import make_job as write_job  # type: ignore[no-redef]

TENSORS = {
    "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight", "lm_head.weight",
}


def model_sources(job: Path) -> dict[str, bytes]:
    """What the model archive must hold: the job folder minus progress.json and its log."""
    files = files_under(job)
    files.pop("progress.json", None)
    files.pop(f"{job.name}.log", None)
    return files


def get_zip(client, url: str) -> tuple[object, zipfile.ZipFile]:
    response = client.get(url)
    assert response.status_code == 200, response.data[:300]
    assert response.mimetype == "application/zip"
    if "Content-Length" in response.headers:
        assert int(response.headers["Content-Length"]) == len(response.data)
    zf = open_zip(response.data)
    assert zf.testzip() is None
    return response, zf


# -- contents -----------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_model_archive_is_the_job_folder_byte_for_byte(client, make_job, sharded):
    job = make_job(sharded=sharded, checkpoints=(10, 20))
    response, zf = get_zip(client, MODEL_URL.format("abc123"))

    assert response.headers["Content-Disposition"] == 'attachment; filename="job_abc123_model.zip"'
    assert all(name.startswith("job_abc123/") for name in zf.namelist())
    assert zip_files(zf, "job_abc123/") == model_sources(job)
    assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    names = set(zf.namelist())
    assert {"job_abc123/checkpoint-10/optimizer.pt", "job_abc123/checkpoint-20/rng_state.pth",
            "job_abc123/config.json", "job_abc123/tokenizer.json"} <= names


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_weights_in_the_archive_load_with_safetensors(client, make_job, tmp_path, sharded):
    job = make_job(sharded=sharded, checkpoints=(10,))
    _, zf = get_zip(client, MODEL_URL.format("abc123"))
    top = "job_abc123/"

    if sharded:
        index = json.loads(zf.read(top + "model.safetensors.index.json"))
        shards = sorted(set(index["weight_map"].values()))
        assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert f"{top}model.safetensors" not in zf.namelist()
    else:
        shards = ["model.safetensors"]
    loaded: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors = load(zf.read(top + shard))
        source = load_file(job / shard)
        assert tensors.keys() == source.keys()
        for name in tensors:
            assert tensors[name].dtype == source[name].dtype
            np.testing.assert_array_equal(tensors[name], source[name])
        loaded.update(tensors)
    assert set(loaded) == TENSORS

    zf.extractall(tmp_path / "out")
    weights = tmp_path / "out" / "job_abc123" / "checkpoint-10" / shards[0]
    with safe_open(str(weights), framework="np") as f:
        assert f.metadata() == {"format": "pt"}
        for name in f.keys():
            np.testing.assert_array_equal(f.get_tensor(name),
                                          load_file(job / "checkpoint-10" / shards[0])[name])


def test_checkpoint_archive_holds_only_that_checkpoint(client, make_job):
    job = make_job(checkpoints=(10, 20))
    response, zf = get_zip(client, MODEL_URL.format("abc123") + "?checkpoint=checkpoint-10")

    assert response.headers["Content-Disposition"] == (
        'attachment; filename="job_abc123_checkpoint-10.zip"')
    assert all(name.startswith("checkpoint-10/") for name in zf.namelist())
    assert zip_files(zf, "checkpoint-10/") == files_under(job / "checkpoint-10")
    assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    state = json.loads(zf.read("checkpoint-10/trainer_state.json"))
    assert state["global_step"] == 10
    assert load(zf.read("checkpoint-10/model.safetensors")).keys() == TENSORS


def test_logs_archive_is_the_deflated_log_and_progress(client, make_job, logs_dir):
    job = make_job()
    response, zf = get_zip(client, LOGS_URL.format("abc123"))

    assert response.headers["Content-Disposition"] == 'attachment; filename="job_abc123_logs.zip"'
    assert sorted(zf.namelist()) == ["logs/progress.json", "logs/training.log"]
    assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    assert zf.read("logs/training.log") == (logs_dir / "job_abc123.log").read_bytes()
    assert zf.read("logs/progress.json") == (job / "progress.json").read_bytes()
    assert "Training completed." in zf.read("logs/training.log").decode()


def test_logs_archive_of_a_running_job(client, make_job, logs_dir):
    make_job(status="running", checkpoints=(10,))
    _, zf = get_zip(client, LOGS_URL.format("abc123"))
    assert json.loads(zf.read("logs/progress.json"))["status"] == "running"
    assert zf.read("logs/training.log") == (logs_dir / "job_abc123.log").read_bytes()


def test_log_appended_to_during_the_download_gives_the_listed_prefix(make_job, logs_dir,
                                                                    cache_dir, reads):
    # Small chunks, and a big progress.json first, so the log is opened only
    # after the response has started and the training server has written more.
    job = make_job(status="running", checkpoints=(10,))
    progress = json.dumps({"status": "running", "note": os.urandom(20_000).hex()})
    (job / "progress.json").write_text(progress)
    log = logs_dir / "job_abc123.log"
    before = log.read_bytes()
    client = make_app(logs_dir, cache_dir, ARTIFACTS_CHUNK_SIZE=1024).test_client()
    response = client.get(LOGS_URL.format("abc123"), buffered=False)
    assert [path for path, _, _ in reads] == ["progress.json"]  # the log is not open yet
    with open(log, "ab") as f:
        f.write(b"2024-05-01 09:10:00,000 - INFO - trainer.loop - step 24/40 loss=0.9\n" * 500)
    body = b"".join(response.response)
    response.close()
    zf = open_zip(body)
    assert zf.testzip() is None
    assert zf.read("logs/training.log") == before
    assert zf.read("logs/progress.json") == progress.encode()


def test_logs_archive_without_progress_has_only_the_log(client, make_job):
    make_job(progress=None)
    _, zf = get_zip(client, LOGS_URL.format("abc123"))
    assert zf.namelist() == ["logs/training.log"]


def test_model_archive_leaves_out_progress_and_the_log_inside(client, make_job):
    job = make_job(log="inside", progress="inside")
    assert (job / "progress.json").is_file() and (job / "job_abc123.log").is_file()
    _, zf = get_zip(client, MODEL_URL.format("abc123"))
    assert "job_abc123/progress.json" not in zf.namelist()
    assert "job_abc123/job_abc123.log" not in zf.namelist()
    assert not any(name.endswith((".log", "progress.json")) for name in zf.namelist())


def test_deflate_archive_has_the_same_files_compressed(client, make_job):
    job = make_job(checkpoints=(10,))
    response, zf = get_zip(client, MODEL_URL.format("abc123") + "?compression=deflate")
    assert "Content-Length" not in response.headers
    assert response.headers["Accept-Ranges"] == "none"
    assert response.headers["ETag"].startswith('W/"')
    assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    assert zip_files(zf, "job_abc123/") == model_sources(job)

    _, zf = get_zip(client, MODEL_URL.format("abc123")
                    + "?checkpoint=checkpoint-10&compression=deflate")
    assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    assert zip_files(zf, "checkpoint-10/") == files_under(job / "checkpoint-10")


def test_explicit_store_is_the_default(client, make_job):
    make_job(checkpoints=(10,))
    default = client.get(MODEL_URL.format("abc123"))
    store = client.get(MODEL_URL.format("abc123") + "?compression=store")
    assert store.status_code == 200
    assert store.data == default.data
    assert store.headers["ETag"] == default.headers["ETag"]


# -- where the log and progress.json are found ----------------------------------


@pytest.mark.parametrize("where", ["root", "inside"])
def test_log_is_found_at_the_root_or_else_inside_the_job(client, make_job, logs_dir, where):
    job = make_job(log=where)
    source = logs_dir / "job_abc123.log" if where == "root" else job / "job_abc123.log"
    _, zf = get_zip(client, LOGS_URL.format("abc123"))
    assert zf.read("logs/training.log") == source.read_bytes()


def test_log_at_the_root_wins_over_the_one_inside(client, make_job, logs_dir):
    job = make_job(log="root")
    (job / "job_abc123.log").write_text("an older copy\n")
    _, zf = get_zip(client, LOGS_URL.format("abc123"))
    assert zf.read("logs/training.log") == (logs_dir / "job_abc123.log").read_bytes()
    _, zf = get_zip(client, MODEL_URL.format("abc123"))
    assert "job_abc123/job_abc123.log" not in zf.namelist()


@pytest.mark.parametrize("where", ["inside", "root"])
def test_progress_is_found_inside_the_job_or_else_at_the_root(client, make_job, logs_dir, where):
    job = make_job(progress=where)
    source = job / "progress.json" if where == "inside" else logs_dir / "job_abc123_progress.json"
    assert source.is_file()
    _, zf = get_zip(client, LOGS_URL.format("abc123"))
    assert zf.read("logs/progress.json") == source.read_bytes()
    assert client.get(MODEL_URL.format("abc123")).status_code == 200


def test_progress_inside_the_job_wins_over_the_root_one(client, make_job, logs_dir):
    job = make_job(progress="inside")
    (logs_dir / "job_abc123_progress.json").write_text(json.dumps({"status": "running"}))
    assert client.get(MODEL_URL.format("abc123")).status_code == 200
    _, zf = get_zip(client, LOGS_URL.format("abc123"))
    assert zf.read("logs/progress.json") == (job / "progress.json").read_bytes()


def test_progress_at_the_root_gives_the_status(client, make_job, logs_dir):
    make_job(progress="root", status="running", final_model=True)
    response = client.get(MODEL_URL.format("abc123"))
    assert response.status_code == 409
    assert response.get_json()["error"] == "job_not_completed"


# -- job states ---------------------------------------------------------------


@pytest.mark.parametrize("status", ["completed", "COMPLETED", "Complete", "finished", "FINISHED",
                                    "succeeded", "Succeeded", "success", "SuCcEsS"])
def test_completed_words_in_any_case_allow_the_model(client, make_job, status):
    make_job(status=status, final_model=True)
    assert client.get(MODEL_URL.format("abc123")).status_code == 200
    assert client.get(LIST_URL.format("abc123")).get_json()["state"] == "completed"


@pytest.mark.parametrize("status", ["running", "training", "queued", "pending", "paused",
                                    "resuming", "Running", "TRAINING"])
def test_job_in_progress_is_409_naming_its_status_and_checkpoints(client, make_job, status):
    make_job(status=status, checkpoints=(10,))
    response = client.get(MODEL_URL.format("abc123"))
    assert response.status_code == 409
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] == "job_not_completed"
    assert status.lower() in body["message"].lower()
    assert "checkpoint" in body["message"]
    assert client.get(LIST_URL.format("abc123")).get_json()["state"] == "in_progress"


def test_checkpoint_of_a_running_job_can_be_downloaded(app, client, make_job):
    job = make_job(status="running", checkpoints=(10,))
    app.config["ARTIFACTS_SETTLE_SECONDS"] = 0
    _, zf = get_zip(client, MODEL_URL.format("abc123") + "?checkpoint=checkpoint-10")
    assert zip_files(zf, "checkpoint-10/") == files_under(job / "checkpoint-10")


@pytest.mark.parametrize("status", ["failed", "error", "cancelled", "canceled", "stopped", "FAILED"])
def test_job_that_ended_without_success_is_409(client, make_job, status):
    make_job(status=status, checkpoints=(10,), final_model=True)
    response = client.get(MODEL_URL.format("abc123"))
    assert response.status_code == 409
    body = response.get_json()
    assert body["error"] == "job_not_completed"
    assert status.lower() in body["message"].lower()
    assert client.get(LIST_URL.format("abc123")).get_json()["state"] == "ended"


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_no_progress_but_config_and_weights_is_completed(client, make_job, sharded):
    job = make_job(progress=None, final_model=True, sharded=sharded)
    _, zf = get_zip(client, MODEL_URL.format("abc123"))
    assert zip_files(zf, "job_abc123/") == model_sources(job)


def test_no_progress_with_pytorch_weights_is_completed(client, make_job):
    make_job(progress=None, final_model=False, checkpoints=(),
             extra_files={"config.json": "{}", "pytorch_model.bin": b"\x80\x02weights"})
    assert client.get(MODEL_URL.format("abc123")).status_code == 200


@pytest.mark.parametrize("files", [{}, {"config.json": "{}"}, {"model.safetensors": b"x"}],
                         ids=["checkpoints-only", "config-only", "weights-only"])
def test_no_progress_and_no_final_model_is_409(client, make_job, files):
    make_job(progress=None, final_model=False, checkpoints=(10,), extra_files=files)
    response = client.get(MODEL_URL.format("abc123"))
    assert response.status_code == 409
    assert response.get_json()["error"] == "job_not_completed"


@pytest.mark.parametrize("content", ["{not json", "[]", '{"status": 3}', ""])
def test_unreadable_progress_is_never_taken_for_completed(client, make_job, content):
    job = make_job(final_model=True)
    (job / "progress.json").write_text(content)
    response = client.get(MODEL_URL.format("abc123"))
    assert response.status_code == 409
    assert response.get_json()["error"] == "job_not_completed"


# -- checkpoint listing -----------------------------------------------------------


def test_checkpoints_are_listed_by_step_as_a_number(client, make_job):
    make_job(checkpoints=(10000, 9, 100, 9000, 10), log=None)
    body = client.get(LIST_URL.format("abc123")).get_json()
    assert [c["name"] for c in body["checkpoints"]] == [
        "checkpoint-9", "checkpoint-10", "checkpoint-100", "checkpoint-9000", "checkpoint-10000"]
    assert [c["step"] for c in body["checkpoints"]] == [9, 10, 100, 9000, 10000]
    assert body["job_id"] == "abc123"
    assert body["status"] == "completed"


def test_checkpoint_listing_sizes_times_and_links(client, make_job):
    job = make_job(checkpoints=(10, 20), extra_files={"checkpoint-20/notes/empty.txt": b""})
    (job / "checkpoint-20" / "emptydir").mkdir()
    when = int(datetime(2024, 5, 1, 9, 0, 0, tzinfo=timezone.utc).timestamp())
    for path in (job / "checkpoint-20").rglob("*"):
        os.utime(path, (when, when))
    os.utime(job / "checkpoint-20" / "optimizer.pt", ns=(0, (when + 65) * 10**9 + 999_999_999))

    listed = {c["name"]: c for c in client.get(LIST_URL.format("abc123")).get_json()["checkpoints"]}
    for name in ("checkpoint-10", "checkpoint-20"):
        sources = files_under(job / name)
        entry = listed[name]
        assert entry["bytes"] == sum(len(b) for b in sources.values())
        assert entry["files"] == len(sources)
        assert entry["download_url"] == f"/api/training/abc123/download/model?checkpoint={name}"
        datetime.strptime(entry["modified"], "%Y-%m-%dT%H:%M:%SZ")

        response, zf = get_zip(client, entry["download_url"])
        files = zip_files(zf, f"{name}/")
        assert sum(len(b) for b in files.values()) == entry["bytes"]
        assert len(files) == entry["files"]
    assert listed["checkpoint-20"]["modified"] == "2024-05-01T09:01:05Z"


def test_listing_of_a_running_job(app, client, make_job):
    make_job(status="running", checkpoints=(10, 20))
    app.config["ARTIFACTS_SETTLE_SECONDS"] = 0
    body = client.get(LIST_URL.format("abc123")).get_json()
    assert body["status"] == "running"
    assert body["state"] == "in_progress"
    assert [c["name"] for c in body["checkpoints"]] == ["checkpoint-10", "checkpoint-20"]


def test_listing_of_a_job_without_checkpoints(client, make_job):
    make_job(checkpoints=())
    assert client.get(LIST_URL.format("abc123")).get_json()["checkpoints"] == []


# -- names ----------------------------------------------------------------------


def filename_star(value: str) -> str:
    assert "filename*=UTF-8''" in value, value
    return unquote(value.split("filename*=UTF-8''", 1)[1].split(";", 1)[0], errors="strict")


@pytest.mark.parametrize("job_id", ["модель-1", "日本", "café ü"])
def test_non_ascii_job_id_gets_a_latin1_safe_content_disposition(client, make_job, job_id):
    make_job(job_id, checkpoints=(10,))
    for url, suffix in ((MODEL_URL.format(quote(job_id)), "_model.zip"),
                        (MODEL_URL.format(quote(job_id)) + "?checkpoint=checkpoint-10",
                         "_checkpoint-10.zip"),
                        (LOGS_URL.format(quote(job_id)), "_logs.zip")):
        response = client.get(url)
        assert response.status_code == 200
        value = response.headers["Content-Disposition"]
        value.encode("latin-1")  # gunicorn refuses anything else
        assert value.isascii()
        assert value.startswith('attachment; filename="')
        fallback = value.split('filename="', 1)[1].split('"', 1)[0]
        assert fallback.startswith("job_") and fallback.endswith(suffix)
        assert filename_star(value) == f"job_{job_id}{suffix}"


def test_non_ascii_job_id_names_the_top_folder_in_utf8(client, make_job):
    job = make_job("модель-1", checkpoints=(10,))
    _, zf = get_zip(client, MODEL_URL.format(quote("модель-1")))
    assert zip_files(zf, "job_модель-1/") == model_sources(job)
    assert all(info.flag_bits & 0x800 for info in zf.infolist())
    listed = client.get(LIST_URL.format(quote("модель-1"))).get_json()
    assert listed["job_id"] == "модель-1"
    assert client.get(listed["checkpoints"][0]["download_url"]).status_code == 200


def test_ascii_job_id_has_no_filename_star(client, make_job):
    make_job("run-2024.05_a")
    value = client.get(MODEL_URL.format("run-2024.05_a")).headers["Content-Disposition"]
    assert value == 'attachment; filename="job_run-2024.05_a_model.zip"'


def test_quotes_in_a_job_id_cannot_break_the_header(client, make_job):
    make_job('a"b;c', checkpoints=())
    value = client.get(MODEL_URL.format(quote('a"b;c'))).headers["Content-Disposition"]
    fallback = value.split('filename="', 1)[1].split('"', 1)[0]
    assert '"' not in fallback and "\\" not in fallback
    assert filename_star(value) == 'job_a"b;c_model.zip'


@pytest.mark.parametrize("job_id", ["a b", "a#b?c", "100%", "x+y"])
def test_job_ids_that_need_quoting_work_on_every_route(client, make_job, job_id):
    make_job(job_id, checkpoints=(10,))
    quoted = quote(job_id, safe="")
    assert client.get(MODEL_URL.format(quoted)).status_code == 200
    assert client.get(LOGS_URL.format(quoted)).status_code == 200
    listed = client.get(LIST_URL.format(quoted)).get_json()
    assert listed["job_id"] == job_id
    response = client.get(listed["checkpoints"][0]["download_url"])
    assert response.status_code == 200
    assert open_zip(response.data).namelist()[0].startswith("checkpoint-10/")


def test_job_named_checkpoints_can_be_downloaded(client, make_job):
    # Its model URL has the shape of the listing route's: /api/training/checkpoints/...
    make_job("checkpoints", checkpoints=(10,))
    response = client.get(MODEL_URL.format("checkpoints"))
    assert response.status_code == 200, response.data[:200]
    assert open_zip(response.data).namelist()[0].startswith("job_checkpoints/")
    assert client.get(LOGS_URL.format("checkpoints")).status_code == 200
    listed = client.get(LIST_URL.format("checkpoints")).get_json()
    assert client.get(listed["checkpoints"][0]["download_url"]).status_code == 200


# -- empty files and folders --------------------------------------------------------


def test_empty_files_and_empty_folders_are_kept(client, make_job, tmp_path):
    job = make_job(checkpoints=(10,), extra_files={"empty.txt": b"",
                                                   "checkpoint-10/empty.bin": b""})
    (job / "emptydir").mkdir()
    (job / "nested" / "deeper").mkdir(parents=True)
    (job / "checkpoint-10" / "emptysub").mkdir()

    _, zf = get_zip(client, MODEL_URL.format("abc123"))
    infos = {i.filename: i for i in zf.infolist()}
    assert infos["job_abc123/empty.txt"].file_size == 0
    assert infos["job_abc123/checkpoint-10/empty.bin"].file_size == 0
    for folder in ("job_abc123/emptydir/", "job_abc123/nested/deeper/",
                   "job_abc123/checkpoint-10/emptysub/"):
        assert infos[folder].is_dir() and infos[folder].file_size == 0
    zf.extractall(tmp_path / "out")
    assert (tmp_path / "out/job_abc123/nested/deeper").is_dir()
    assert (tmp_path / "out/job_abc123/empty.txt").read_bytes() == b""

    _, zf = get_zip(client, MODEL_URL.format("abc123") + "?checkpoint=checkpoint-10")
    assert zf.getinfo("checkpoint-10/emptysub/").is_dir()
    assert zf.getinfo("checkpoint-10/empty.bin").file_size == 0


def test_symlinked_folder_inside_the_job_does_not_hide_its_target(client, make_job):
    # A "best -> checkpoint-10" link is common; the real checkpoint must stay in.
    job = make_job(checkpoints=(10, 20))
    os.symlink("checkpoint-10", job / "best")
    _, zf = get_zip(client, MODEL_URL.format("abc123"))
    files = zip_files(zf, "job_abc123/")
    for rel, data in files_under(job / "checkpoint-10").items():
        assert files.get(f"checkpoint-10/{rel}") == data, rel


# -- LOGS_DIR is never written ---------------------------------------------------------


def test_downloads_leave_logs_dir_unchanged_and_cache_outside_it(client, make_job, logs_dir,
                                                                 cache_dir):
    make_job(checkpoints=(10, 20))
    before = snapshot_tree(logs_dir)
    url = MODEL_URL.format("abc123")
    for request in (
        lambda: client.get(url),
        lambda: client.head(url),
        lambda: client.get(url, headers={"Range": "bytes=1000-"}),
        lambda: client.get(url + "?checkpoint=checkpoint-20"),
        lambda: client.get(url + "?compression=deflate"),
        lambda: client.get(LOGS_URL.format("abc123")),
        lambda: client.get(LIST_URL.format("abc123")),
    ):
        assert request().status_code in (200, 206)
    assert snapshot_tree(logs_dir) == before
    assert cache_dir.is_dir() and any(cache_dir.iterdir())
    assert not cache_dir.resolve().is_relative_to(logs_dir.resolve())


def test_cache_dir_inside_logs_dir_is_refused(make_job, logs_dir):
    make_job()
    app = make_app(logs_dir, logs_dir / "cache")
    before = snapshot_tree(logs_dir)
    with pytest.raises(RuntimeError, match="ARTIFACTS_CACHE_DIR"):
        app.test_client().get(MODEL_URL.format("abc123"))
    assert snapshot_tree(logs_dir) == before


# -- mounting ---------------------------------------------------------------------


def test_url_prefix_mounts_every_route(make_job, logs_dir, cache_dir):
    make_job(checkpoints=(10,))
    client = make_app(logs_dir, cache_dir, ARTIFACTS_URL_PREFIX="/artifacts").test_client()
    for path in (MODEL_URL, LOGS_URL, LIST_URL):
        assert client.get("/artifacts" + path.format("abc123")).status_code == 200
        assert client.get(path.format("abc123")).status_code == 404
    listed = client.get("/artifacts" + LIST_URL.format("abc123")).get_json()
    url = listed["checkpoints"][0]["download_url"]
    assert url == "/artifacts/api/training/abc123/download/model?checkpoint=checkpoint-10"
    assert client.get(url).status_code == 200


def test_init_app_twice_raises(logs_dir):
    app = Flask("host")
    app.config["ARTIFACTS_LOGS_DIR"] = str(logs_dir)
    artifacts = Artifacts()
    artifacts.init_app(app)
    assert "artifacts" in app.blueprints
    with pytest.raises(RuntimeError, match="already registered"):
        artifacts.init_app(app)
    with pytest.raises(RuntimeError, match="already registered"):
        Artifacts(app)


def test_one_extension_serves_several_apps(tmp_path):
    artifacts = Artifacts()
    clients = []
    for name in ("one", "two"):
        logs = tmp_path / name / "logs"
        write_job(logs, name, checkpoints=())
        app = Flask(name)
        app.config.update(ARTIFACTS_LOGS_DIR=str(logs),
                          ARTIFACTS_CACHE_DIR=str(tmp_path / name / "cache"))
        artifacts.init_app(app)
        clients.append(app.test_client())
    assert not hasattr(artifacts, "app")
    assert clients[0].head(MODEL_URL.format("one")).status_code == 200
    assert clients[0].head(MODEL_URL.format("two")).status_code == 404
    assert clients[1].head(MODEL_URL.format("two")).status_code == 200


def test_create_app_reads_logs_dir_from_the_environment(make_job, logs_dir, cache_dir, monkeypatch):
    make_job()
    monkeypatch.setenv("LOGS_DIR", str(logs_dir))
    app = create_app({"TESTING": True, "ARTIFACTS_CACHE_DIR": str(cache_dir)})
    response = app.test_client().head(MODEL_URL.format("abc123"))
    assert response.status_code == 200


# -- command line ---------------------------------------------------------------------


def test_cli_lists_jobs_with_their_state(runner, make_job):
    make_job("done")
    make_job("busy", status="running", checkpoints=(10,))
    result = runner.invoke(args=["artifacts", "jobs"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split("\t")[:2] for line in result.output.splitlines())
    assert lines == {"busy": "in_progress", "done": "completed"}


def test_cli_lists_checkpoints_by_step(runner, make_job):
    job = make_job(checkpoints=(100, 9, 10), log=None)
    result = runner.invoke(args=["artifacts", "checkpoints", "abc123"])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.output.splitlines()]
    assert [r[0] for r in rows] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]
    for name, size, *_ in rows:
        assert int(size) == sum(len(b) for b in files_under(job / name).values())


def test_cli_unknown_job_fails_cleanly(runner, logs_dir):
    result = runner.invoke(args=["artifacts", "checkpoints", "nope"])
    assert result.exit_code != 0
    assert "No job 'nope'" in result.output
