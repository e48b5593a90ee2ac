"""Selections on model and checkpoint downloads, the manifest, and SHA256SUMS.

Issue 6: ``?preset=``, ``?include=``/``?exclude=`` globs, ``?checkpoint=latest``
and ``best``, ``GET /api/training/<id>/manifest`` and ``?sha256sums=1``. Every
test goes through HTTP with the test client against a real Trainer-layout
tree from :mod:`jobtree` and reads the archives with :mod:`zipfile`.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import typing as t
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

import flask_artifacts
from jobtree import files_under, make_job

JOB = "abc123"
MODEL_URL = f"/api/training/{JOB}/download/model"
MANIFEST_URL = f"/api/training/{JOB}/manifest"
TOP = f"job_{JOB}"

#: What ``?preset=weights`` keeps from a folder written by ``save_pretrained``
#: plus the tokenizer (the same in the job's top folder and in a checkpoint).
WEIGHTS_SINGLE = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
}
WEIGHTS_SHARDED = (WEIGHTS_SINGLE - {"model.safetensors"}) | {
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
}
TRAINING_STATE = {
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "training_args.bin",
    "trainer_state.json",
}


class _Client(FlaskClient):
    """Reads each body whole, so the response is closed (download slot freed)."""

    def open(self, *args: t.Any, buffered: bool = True, **kwargs: t.Any) -> t.Any:
        return super().open(*args, buffered=buffered, **kwargs)


# -- fixtures (named apart from tests/conftest.py's) ---------------------------


@pytest.fixture
def sel_logs(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def sel_cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def sel_make_app(sel_logs: Path, sel_cache: Path) -> t.Callable[..., Flask]:
    """An app over ``sel_logs`` with extra configuration."""

    def factory(**config: t.Any) -> Flask:
        app = flask_artifacts.create_app({
            "TESTING": True,
            "ARTIFACTS_LOGS_DIR": str(sel_logs),
            "ARTIFACTS_CACHE_DIR": str(sel_cache),
            **config,
        })
        app.test_client_class = _Client
        return app

    return factory


@pytest.fixture
def sel_app(sel_make_app: t.Callable[..., Flask]) -> Flask:
    return sel_make_app()


@pytest.fixture
def sel_client(sel_app: Flask) -> FlaskClient:
    return sel_app.test_client()


# -- helpers -------------------------------------------------------------------


def zip_of(response: t.Any) -> zipfile.ZipFile:
    assert response.status_code == 200, response.data[:500]
    assert response.mimetype == "application/zip"
    zf = zipfile.ZipFile(io.BytesIO(response.data))
    assert zf.testzip() is None
    return zf


def members(response: t.Any, top: str) -> dict[str, bytes]:
    """File members below ``top/`` by relative path, with their bytes."""
    zf = zip_of(response)
    out = {}
    for info in zf.infolist():
        assert info.filename.startswith(top + "/"), info.filename
        if not info.is_dir():
            out[info.filename[len(top) + 1:]] = zf.read(info)
    return out


def names(response: t.Any, top: str) -> set[str]:
    return set(members(response, top))


def error_of(response: t.Any, status: int, code: str) -> dict[str, t.Any]:
    assert response.status_code == status, (response.status_code, response.data[:500])
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] == code, body
    return body


def disposition_name(response: t.Any) -> str:
    value = response.headers["Content-Disposition"]
    assert value.startswith("attachment;"), value
    return value.split('filename="', 1)[1].split('"', 1)[0]


def selected(tree: dict[str, bytes], keep: t.Callable[[str], bool]) -> dict[str, bytes]:
    return {k: v for k, v in tree.items() if keep(k)}


def model_tree(job_dir: Path) -> dict[str, bytes]:
    """What the full model download holds: the job folder minus progress and log."""
    tree = files_under(job_dir)
    tree.pop("progress.json", None)
    tree.pop(f"{job_dir.name}.log", None)
    return tree


def index(app: Flask, job_id: str = JOB) -> None:
    result = app.test_cli_runner().invoke(args=["artifacts", "index", "--sha256", job_id])
    assert result.exit_code == 0, result.output


# -- presets -------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_weights_preset_on_model(sel_logs: Path, sel_client: FlaskClient, sharded: bool) -> None:
    job = make_job(sel_logs, JOB, sharded=sharded, checkpoints=(10, 20))
    got = members(sel_client.get(MODEL_URL, query_string={"preset": "weights"}), TOP)
    expected = WEIGHTS_SHARDED if sharded else WEIGHTS_SINGLE
    assert set(got) == expected
    assert got == {name: (job / name).read_bytes() for name in expected}
    assert not set(got) & TRAINING_STATE
    assert not any("/" in name for name in got)  # no nested checkpoint folders


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_weights_preset_on_checkpoint(sel_logs: Path, sel_client: FlaskClient,
                                      sharded: bool) -> None:
    job = make_job(sel_logs, JOB, sharded=sharded, checkpoints=(10, 20))
    response = sel_client.get(MODEL_URL, query_string={"checkpoint": "checkpoint-20",
                                                      "preset": "weights"})
    got = members(response, "checkpoint-20")
    expected = WEIGHTS_SHARDED if sharded else WEIGHTS_SINGLE
    assert set(got) == expected
    assert got == {name: (job / "checkpoint-20" / name).read_bytes() for name in expected}
    assert disposition_name(response) == f"job_{JOB}_checkpoint-20.zip"


def test_weights_preset_keeps_every_shard_of_many(sel_logs: Path, sel_client: FlaskClient) -> None:
    make_job(sel_logs, JOB, sharded=True, extra_files={
        "model-00003-of-00012.safetensors": b"x" * 10,
        "pytorch_model-00001-of-00002.bin": b"y" * 10,
        "pytorch_model.bin.index.json": "{}",
        "optimizer.pt": b"z" * 10,
        "notes/config.json": "{}",
    })
    got = names(sel_client.get(MODEL_URL, query_string={"preset": "weights"}), TOP)
    assert got == WEIGHTS_SHARDED | {"model-00003-of-00012.safetensors",
                                     "pytorch_model-00001-of-00002.bin",
                                     "pytorch_model.bin.index.json"}


def test_full_preset_is_the_default(sel_logs: Path, sel_client: FlaskClient) -> None:
    job = make_job(sel_logs, JOB, checkpoints=(10, 20))
    default = sel_client.get(MODEL_URL)
    full = sel_client.get(MODEL_URL, query_string={"preset": "full"})
    assert members(default, TOP) == model_tree(job)
    assert full.data == default.data
    assert "checkpoint-10/optimizer.pt" in names(full, TOP)


def test_full_preset_on_checkpoint_has_training_state(sel_logs: Path,
                                                      sel_client: FlaskClient) -> None:
    job = make_job(sel_logs, JOB, checkpoints=(10, 20))
    got = members(sel_client.get(MODEL_URL, query_string={"checkpoint": "checkpoint-10",
                                                         "preset": "full"}), "checkpoint-10")
    assert got == files_under(job / "checkpoint-10")
    assert TRAINING_STATE <= set(got)


@pytest.mark.parametrize("preset", ["nope", "Weights", "", "weights "])
def test_unknown_preset_is_400(sel_logs: Path, sel_client: FlaskClient, preset: str) -> None:
    make_job(sel_logs, JOB)
    for query in ({"preset": preset}, {"preset": preset, "checkpoint": "checkpoint-10"}):
        error_of(sel_client.get(MODEL_URL, query_string=query), 400, "invalid_parameter")
        error_of(sel_client.get(MANIFEST_URL, query_string=query), 400, "invalid_parameter")


# -- include / exclude ---------------------------------------------------------


@pytest.fixture
def sel_job(sel_logs: Path) -> Path:
    return make_job(sel_logs, JOB, checkpoints=(10, 20))


def test_include_only(sel_job: Path, sel_client: FlaskClient) -> None:
    response = sel_client.get(MODEL_URL, query_string={"include": "**/*.safetensors"})
    assert members(response, TOP) == selected(model_tree(sel_job),
                                              lambda p: p.endswith(".safetensors"))
    assert names(response, TOP) == {"model.safetensors", "checkpoint-10/model.safetensors",
                                    "checkpoint-20/model.safetensors"}


def test_include_is_repeatable(sel_job: Path, sel_client: FlaskClient) -> None:
    response = sel_client.get(MODEL_URL + "?include=*.safetensors&include=checkpoint-20/*.pt")
    assert names(response, TOP) == {"model.safetensors", "checkpoint-20/optimizer.pt",
                                    "checkpoint-20/scheduler.pt"}


def test_exclude_only(sel_job: Path, sel_client: FlaskClient) -> None:
    response = sel_client.get(MODEL_URL + "?exclude=**/optimizer.pt&exclude=**/*.pth")
    assert members(response, TOP) == selected(
        model_tree(sel_job),
        lambda p: not p.endswith("/optimizer.pt") and not p.endswith(".pth"))


def test_preset_then_include_then_exclude(sel_job: Path, sel_client: FlaskClient) -> None:
    # The preset keeps only top-level files, so **/*.json takes no checkpoint file.
    response = sel_client.get(MODEL_URL, query_string={
        "preset": "weights", "include": "**/*.json", "exclude": "tokenizer*"})
    assert names(response, TOP) == {"config.json", "generation_config.json",
                                    "special_tokens_map.json"}
    # Exclude wins over include.
    response = sel_client.get(MODEL_URL, query_string={
        "include": "**/*.json", "exclude": "**/trainer_state.json"})
    got = names(response, TOP)
    assert "checkpoint-10/config.json" in got and "config.json" in got
    assert not any(p.endswith("trainer_state.json") for p in got)
    assert all(p.endswith(".json") for p in got)


def test_double_star_matches_zero_or_more_folders(sel_job: Path, sel_client: FlaskClient) -> None:
    got = names(sel_client.get(MODEL_URL, query_string={"include": "**/*.json"}), TOP)
    assert "config.json" in got
    assert "checkpoint-10/config.json" in got
    assert got == {p for p in model_tree(sel_job) if p.endswith(".json")}
    got = names(sel_client.get(MODEL_URL, query_string={"include": "**/config.json"}), TOP)
    assert got == {"config.json", "checkpoint-10/config.json", "checkpoint-20/config.json"}


def test_double_star_deeper_folders(sel_logs: Path, sel_client: FlaskClient) -> None:
    make_job(sel_logs, JOB, checkpoints=(10,), extra_files={
        "eval/a/b/results.json": "{}", "eval/results.json": "{}"})
    got = names(sel_client.get(MODEL_URL, query_string={"include": "eval/**/results.json"}),
                TOP)
    assert got == {"eval/results.json", "eval/a/b/results.json"}


def test_star_does_not_cross_slash(sel_job: Path, sel_client: FlaskClient) -> None:
    got = names(sel_client.get(MODEL_URL, query_string={"include": "*.json"}), TOP)
    assert got == {p for p in model_tree(sel_job) if p.endswith(".json") and "/" not in p}
    assert "checkpoint-10/config.json" not in got
    # *.pt only at the top: there is none, so nothing is selected.
    error_of(sel_client.get(MODEL_URL, query_string={"include": "*.pt"}), 404,
             "nothing_selected")
    got = names(sel_client.get(MODEL_URL, query_string={"include": "*/*.pt"}), TOP)
    assert got == {f"checkpoint-{s}/{n}" for s in (10, 20)
                   for n in ("optimizer.pt", "scheduler.pt")}


def test_patterns_on_checkpoint_are_relative_to_its_folder(sel_job: Path,
                                                           sel_client: FlaskClient) -> None:
    response = sel_client.get(MODEL_URL, query_string={"checkpoint": "checkpoint-10",
                                                      "include": "*.json"})
    assert members(response, "checkpoint-10") == selected(
        files_under(sel_job / "checkpoint-10"), lambda p: p.endswith(".json"))
    assert "trainer_state.json" in names(response, "checkpoint-10")


def test_matching_is_case_sensitive(sel_job: Path, sel_client: FlaskClient) -> None:
    body = error_of(sel_client.get(MODEL_URL, query_string={"include": "*.JSON"}), 404,
                    "nothing_selected")
    assert "config.json" in body["available"]
    error_of(sel_client.get(MODEL_URL, query_string={"include": "**/CONFIG.json"}), 404,
             "nothing_selected")


def test_nothing_selected_lists_what_exists(sel_job: Path, sel_client: FlaskClient) -> None:
    for query in ({"include": "**/*.gguf"},
                  {"exclude": "**"},
                  {"preset": "weights", "include": "checkpoint-10/*"},
                  {"checkpoint": "checkpoint-10", "include": "*.gguf"}):
        response = sel_client.get(MODEL_URL, query_string=query)
        body = error_of(response, 404, "nothing_selected")
        assert response.mimetype != "application/zip"
        available = body["available"]
        assert isinstance(available, list) and available
        if "checkpoint" in query:
            assert "optimizer.pt" in available and "config.json" in available
        else:
            assert "config.json" in available
            assert "checkpoint-10/optimizer.pt" in available
        # The manifest says the same.
        error_of(sel_client.get(MANIFEST_URL, query_string=query), 404, "nothing_selected")


@pytest.mark.parametrize("pattern", ["pth", ".pth"])
@pytest.mark.parametrize("param", ["include", "exclude"])
def test_bare_extension_is_invalid_pattern(sel_job: Path, sel_client: FlaskClient,
                                           pattern: str, param: str) -> None:
    for query in ({param: pattern}, {param: pattern, "checkpoint": "checkpoint-10"}):
        body = error_of(sel_client.get(MODEL_URL, query_string=query), 400, "invalid_pattern")
        assert body["suggestion"] == "**/*.pth"
        assert "**/*.pth" in body["message"]
        body = error_of(sel_client.get(MANIFEST_URL, query_string=query), 400,
                        "invalid_pattern")
        assert body["suggestion"] == "**/*.pth"


def test_suggested_pattern_works(sel_job: Path, sel_client: FlaskClient) -> None:
    got = names(sel_client.get(MODEL_URL, query_string={"include": "**/*.pth"}), TOP)
    assert got == {"checkpoint-10/rng_state.pth", "checkpoint-20/rng_state.pth"}


def test_exact_file_name_is_not_an_extension_mistake(sel_job: Path,
                                                     sel_client: FlaskClient) -> None:
    got = members(sel_client.get(MODEL_URL, query_string={"include": "config.json"}), TOP)
    assert got == {"config.json": (sel_job / "config.json").read_bytes()}


def test_selection_keeps_the_file_name(sel_job: Path, sel_client: FlaskClient) -> None:
    for query, filename in (
        ({"preset": "weights"}, f"job_{JOB}_model.zip"),
        ({"include": "**/*.json", "exclude": "tokenizer*"}, f"job_{JOB}_model.zip"),
        ({"checkpoint": "checkpoint-10", "preset": "weights"}, f"job_{JOB}_checkpoint-10.zip"),
        ({"checkpoint": "checkpoint-20", "exclude": "optimizer.pt"},
         f"job_{JOB}_checkpoint-20.zip"),
    ):
        response = sel_client.get(MODEL_URL, query_string=query)
        assert response.status_code == 200, response.data[:300]
        assert disposition_name(response) == filename


# -- latest / best -------------------------------------------------------------


def test_latest_is_the_highest_step(sel_logs: Path, sel_client: FlaskClient) -> None:
    job = make_job(sel_logs, JOB, checkpoints=(9, 10, 100))
    response = sel_client.get(MODEL_URL, query_string={"checkpoint": "latest"})
    assert disposition_name(response) == f"job_{JOB}_checkpoint-100.zip"
    assert members(response, "checkpoint-100") == files_under(job / "checkpoint-100")
    manifest = sel_client.get(MANIFEST_URL, query_string={"checkpoint": "latest"}).get_json()
    assert manifest["checkpoint"] == "checkpoint-100"
    assert manifest["filename"] == f"job_{JOB}_checkpoint-100.zip"


def test_latest_with_weights_preset(sel_logs: Path, sel_client: FlaskClient) -> None:
    make_job(sel_logs, JOB, checkpoints=(9, 10, 100), sharded=True)
    response = sel_client.get(MODEL_URL, query_string={"checkpoint": "latest",
                                                      "preset": "weights"})
    assert names(response, "checkpoint-100") == WEIGHTS_SHARDED
    assert disposition_name(response) == f"job_{JOB}_checkpoint-100.zip"


def test_latest_of_a_running_job(sel_logs: Path, sel_client: FlaskClient) -> None:
    job = make_job(sel_logs, JOB, checkpoints=(9, 10, 100), status="running")
    old = 1_600_000_000
    for path in job.rglob("*"):
        os.utime(path, (old, old))  # settled
    response = sel_client.get(MODEL_URL, query_string={"checkpoint": "latest"})
    assert disposition_name(response) == f"job_{JOB}_checkpoint-100.zip"
    assert names(response, "checkpoint-100") == set(files_under(job / "checkpoint-100"))


def test_best_checkpoint(sel_logs: Path, sel_client: FlaskClient) -> None:
    job = make_job(sel_logs, JOB, checkpoints=(9, 10, 100), best_checkpoint=10)
    response = sel_client.get(MODEL_URL, query_string={"checkpoint": "best"})
    assert disposition_name(response) == f"job_{JOB}_checkpoint-10.zip"
    assert members(response, "checkpoint-10") == files_under(job / "checkpoint-10")
    manifest = sel_client.get(MANIFEST_URL, query_string={"checkpoint": "best"}).get_json()
    assert manifest["checkpoint"] == "checkpoint-10"
    response = sel_client.get(MODEL_URL, query_string={"checkpoint": "best",
                                                      "preset": "weights"})
    assert names(response, "checkpoint-10") == WEIGHTS_SINGLE


def test_best_without_best_model_checkpoint(sel_logs: Path, sel_client: FlaskClient) -> None:
    make_job(sel_logs, JOB, checkpoints=(9, 10, 100))
    for url in (MODEL_URL, MANIFEST_URL):
        body = error_of(sel_client.get(url, query_string={"checkpoint": "best"}), 404,
                        "checkpoint_not_found")
        assert "best_model_checkpoint" in body["message"]


def test_best_that_was_deleted(sel_logs: Path, sel_client: FlaskClient) -> None:
    job = make_job(sel_logs, JOB, checkpoints=(9, 10, 100), best_checkpoint=10)
    shutil.rmtree(job / "checkpoint-10")
    body = error_of(sel_client.get(MODEL_URL, query_string={"checkpoint": "best"}), 404,
                    "checkpoint_not_found")
    assert "checkpoint-10" in body["message"]
    assert sorted(body["available"]) == ["checkpoint-100", "checkpoint-9"]


def test_latest_without_checkpoints(sel_logs: Path, sel_client: FlaskClient) -> None:
    make_job(sel_logs, JOB, checkpoints=())
    for name in ("latest", "best"):
        error_of(sel_client.get(MODEL_URL, query_string={"checkpoint": name}), 404,
                 "checkpoint_not_found")


# -- manifest ------------------------------------------------------------------

MANIFEST_QUERIES = [
    {},
    {"preset": "weights"},
    {"checkpoint": "checkpoint-10"},
    {"checkpoint": "latest", "preset": "weights"},
    {"checkpoint": "best"},
    {"include": ["**/*.json", "**/*.safetensors"], "exclude": "checkpoint-9/*"},
    {"checkpoint": "checkpoint-100", "exclude": ["optimizer.pt", "*.pth"]},
]


@pytest.mark.parametrize("query", MANIFEST_QUERIES, ids=lambda q: repr(q) or "none")
def test_manifest_matches_the_download(sel_logs: Path, sel_client: FlaskClient,
                                       query: dict[str, t.Any]) -> None:
    job = make_job(sel_logs, JOB, checkpoints=(9, 10, 100), best_checkpoint=10, sharded=True)
    response = sel_client.get(MANIFEST_URL, query_string=query)
    assert response.status_code == 200, response.data[:500]
    manifest = response.get_json()
    download = sel_client.get(MODEL_URL, query_string=query)
    zf = zip_of(download)
    assert [m["name"] for m in manifest["members"]] == zf.namelist()
    assert manifest["filename"] == disposition_name(download)
    top = zf.namelist()[0].split("/", 1)[0]
    base = job if top == TOP else job / top
    for member in manifest["members"]:
        assert member["name"] == f"{top}/{member['path']}"
        assert member["name"].rsplit("/", 1)[-1] == member["path"].rsplit("/", 1)[-1]
        st = (base / member["path"]).stat()
        assert member["size"] == st.st_size == zf.getinfo(member["name"]).file_size
        modified = datetime.fromtimestamp(st.st_mtime_ns // 10**9, tz=timezone.utc)
        assert member["modified"] == modified.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert "sha256" not in member
    assert manifest["total_bytes"] == sum(m["size"] for m in manifest["members"])
    assert manifest["total_bytes"] == sum(i.file_size for i in zf.infolist())
    assert manifest["archive_bytes"] == int(download.headers["Content-Length"])
    assert manifest["archive_bytes"] == len(download.data)
    assert manifest["files"] == len(manifest["members"])


def test_manifest_sha256(sel_logs: Path, sel_client: FlaskClient) -> None:
    job = make_job(sel_logs, JOB, checkpoints=(10, 20), sharded=True)
    manifest = sel_client.get(MANIFEST_URL, query_string={"sha256": "1"}).get_json()
    assert manifest["members"]
    tree = model_tree(job)
    assert {m["path"] for m in manifest["members"]} == set(tree)
    for member in manifest["members"]:
        assert member["sha256"] == hashlib.sha256(tree[member["path"]]).hexdigest()
    assert "hint" not in manifest
    # And on a narrowed checkpoint selection.
    manifest = sel_client.get(MANIFEST_URL, query_string={
        "sha256": "1", "checkpoint": "checkpoint-20", "preset": "weights"}).get_json()
    assert {m["path"] for m in manifest["members"]} == WEIGHTS_SHARDED
    for member in manifest["members"]:
        data = (job / "checkpoint-20" / member["path"]).read_bytes()
        assert member["sha256"] == hashlib.sha256(data).hexdigest()


def test_manifest_sha256_over_the_limit_then_index(sel_logs: Path,
                                                   sel_make_app: t.Callable[..., Flask]) -> None:
    job = make_job(sel_logs, JOB, checkpoints=(10, 20))
    app = sel_make_app(ARTIFACTS_HASH_LIMIT=10)
    client = app.test_client()
    manifest = client.get(MANIFEST_URL, query_string={"sha256": "1"}).get_json()
    assert manifest["members"]
    assert all(m["sha256"] is None for m in manifest["members"])
    assert "flask artifacts index --sha256" in manifest["hint"]
    assert JOB in manifest["hint"]

    index(app)
    manifest = client.get(MANIFEST_URL, query_string={"sha256": "1"}).get_json()
    tree = model_tree(job)
    for member in manifest["members"]:
        assert member["sha256"] == hashlib.sha256(tree[member["path"]]).hexdigest()
    manifest = client.get(MANIFEST_URL, query_string={
        "sha256": "1", "checkpoint": "checkpoint-10"}).get_json()
    for member in manifest["members"]:
        data = (job / "checkpoint-10" / member["path"]).read_bytes()
        assert member["sha256"] == hashlib.sha256(data).hexdigest()


def test_manifest_sha256_of_a_changed_file_is_not_stale(sel_logs: Path,
                                                        sel_make_app: t.Callable[..., Flask]
                                                        ) -> None:
    job = make_job(sel_logs, JOB, checkpoints=(10,))
    app = sel_make_app(ARTIFACTS_HASH_LIMIT=10)
    index(app)
    (job / "config.json").write_text('{"changed": true}\n')
    manifest = app.test_client().get(MANIFEST_URL, query_string={"sha256": "1"}).get_json()
    by_path = {m["path"]: m["sha256"] for m in manifest["members"]}
    assert by_path["config.json"] is None
    assert by_path["model.safetensors"] == hashlib.sha256(
        (job / "model.safetensors").read_bytes()).hexdigest()


# -- SHA256SUMS ----------------------------------------------------------------


def check_sums(data: bytes, top: str, dest: Path) -> list[str]:
    """Extract the archive into ``dest`` and run the real ``sha256sum -c``."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.namelist()[-1] == f"{top}/SHA256SUMS"
    zf.extractall(dest)
    result = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=dest / top,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.endswith(": OK") for line in lines), result.stdout
    files = [n for n in zf.namelist() if not n.endswith("/") and n != f"{top}/SHA256SUMS"]
    assert sorted(line[:-len(": OK")] for line in lines) == sorted(
        n[len(top) + 1:] for n in files)
    return lines


@pytest.mark.parametrize("query, top", [
    ({}, TOP),
    ({"checkpoint": "checkpoint-20"}, "checkpoint-20"),
    ({"checkpoint": "latest", "preset": "weights"}, "checkpoint-20"),
    ({"include": "**/*.json"}, TOP),
], ids=["model", "checkpoint", "latest-weights", "include"])
def test_sha256sums_verifies_with_sha256sum(sel_logs: Path, sel_client: FlaskClient,
                                            tmp_path: Path, query: dict[str, str],
                                            top: str) -> None:
    make_job(sel_logs, JOB, checkpoints=(10, 20), sharded=True)
    response = sel_client.get(MODEL_URL, query_string={**query, "sha256sums": "1"})
    zip_of(response)
    check_sums(response.data, top, tmp_path / "out")


def test_sha256sums_content_length_cold_and_warm(sel_logs: Path, sel_client: FlaskClient,
                                                 tmp_path: Path) -> None:
    make_job(sel_logs, JOB, checkpoints=(10, 20))
    cold = sel_client.get(MODEL_URL, query_string={"sha256sums": "1"})
    assert cold.status_code == 200
    assert int(cold.headers["Content-Length"]) == len(cold.data)
    warm = sel_client.get(MODEL_URL, query_string={"sha256sums": "1"})
    assert warm.status_code == 200
    assert int(warm.headers["Content-Length"]) == len(warm.data)
    assert warm.data == cold.data
    check_sums(warm.data, TOP, tmp_path / "out")
    manifest = sel_client.get(MANIFEST_URL, query_string={"sha256sums": "1"}).get_json()
    assert manifest["archive_bytes"] == len(cold.data)
    assert [m["name"] for m in manifest["members"]] == zipfile.ZipFile(
        io.BytesIO(cold.data)).namelist()[:-1]


def test_sha256sums_ranges_cold_then_indexed(sel_logs: Path, sel_app: Flask) -> None:
    make_job(sel_logs, JOB, checkpoints=(10, 20))
    client = sel_app.test_client()
    query = {"checkpoint": "checkpoint-20", "sha256sums": "1"}

    head = client.head(MODEL_URL, query_string=query)
    assert head.headers["Accept-Ranges"] == "none"
    size = int(head.headers["Content-Length"])
    cold = client.get(MODEL_URL, query_string=query, headers={"Range": "bytes=100-599"})
    assert cold.status_code == 200
    assert cold.headers["Accept-Ranges"] == "none"
    assert "Content-Range" not in cold.headers
    assert len(cold.data) == size == int(cold.headers["Content-Length"])
    zip_of(cold)

    index(sel_app)
    full = client.get(MODEL_URL, query_string=query)
    assert full.headers["Accept-Ranges"] == "bytes"
    assert full.data == cold.data

    ranged = client.get(MODEL_URL, query_string=query, headers={"Range": "bytes=100-599"})
    assert ranged.status_code == 206
    assert ranged.headers["Content-Range"] == f"bytes 100-599/{size}"
    assert ranged.data == full.data[100:600]

    # A range inside the SHA256SUMS member itself, and the tail of the archive.
    zf = zipfile.ZipFile(io.BytesIO(full.data))
    info = zf.getinfo("checkpoint-20/SHA256SUMS")
    start = info.header_offset + 30 + len(info.filename) + 9  # header, name, UT extra
    first = hashlib.sha256(zf.read(zf.namelist()[0])).hexdigest().encode()
    assert full.data[start:start + 64] == first
    for spec, (lo, hi) in ((f"bytes={start + 3}-{start + 80}", (start + 3, start + 81)),
                           ("bytes=-300", (size - 300, size)),
                           (f"bytes={info.header_offset}-", (info.header_offset, size))):
        ranged = client.get(MODEL_URL, query_string=query, headers={"Range": spec})
        assert ranged.status_code == 206, spec
        assert ranged.data == full.data[lo:hi], spec


def test_sha256sums_default_from_config(sel_logs: Path, sel_make_app: t.Callable[..., Flask],
                                        tmp_path: Path) -> None:
    make_job(sel_logs, JOB, checkpoints=(10, 20))
    client = sel_make_app(ARTIFACTS_SHA256SUMS=True).test_client()
    on = client.get(MODEL_URL, query_string={"checkpoint": "checkpoint-10"})
    assert zip_of(on).namelist()[-1] == "checkpoint-10/SHA256SUMS"
    check_sums(on.data, "checkpoint-10", tmp_path / "out")
    off = client.get(MODEL_URL, query_string={"checkpoint": "checkpoint-10",
                                             "sha256sums": "0"})
    assert not any(n.endswith("SHA256SUMS") for n in zip_of(off).namelist())
    assert len(off.data) < len(on.data)
    model = client.get(MODEL_URL)
    assert zip_of(model).namelist()[-1] == f"{TOP}/SHA256SUMS"
    assert int(model.headers["Content-Length"]) == len(model.data)


def test_sha256sums_off_by_default(sel_logs: Path, sel_client: FlaskClient) -> None:
    make_job(sel_logs, JOB, checkpoints=(10,))
    response = sel_client.get(MODEL_URL)
    assert not any(n.endswith("SHA256SUMS") for n in zip_of(response).namelist())
    assert response.headers["Accept-Ranges"] == "bytes"
