"""The ``flask artifacts`` command group, through Flask's CLI runner."""

from __future__ import annotations

import io
import os
import typing as t
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from safetensors.numpy import load_file

from jobtree import files_under, make_job

from flask_artifacts import create_app


class WholeBodyClient(FlaskClient):
    def open(self, *args: t.Any, buffered: bool = True, **kwargs: t.Any) -> t.Any:
        return super().open(*args, buffered=buffered, **kwargs)


@pytest.fixture
def cli_logs(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def cli_app(cli_logs: Path, tmp_path: Path) -> Flask:
    app = create_app({"TESTING": True, "ARTIFACTS_LOGS_DIR": str(cli_logs),
                      "ARTIFACTS_CACHE_DIR": str(tmp_path / "cache")})
    app.test_client_class = WholeBodyClient
    return app


@pytest.fixture
def cli(cli_app: Flask) -> FlaskCliRunner:
    return cli_app.test_cli_runner()


def lines(output: str) -> list[list[str]]:
    return [line.split("\t") for line in output.splitlines() if line.strip()]


def test_jobs_lists_each_job_with_its_state(cli: FlaskCliRunner, cli_logs: Path) -> None:
    make_job(cli_logs, "done1", checkpoints=(10,))
    make_job(cli_logs, "run2", status="running", checkpoints=(10,))
    make_job(cli_logs, "fail3", status="failed", checkpoints=(10,))
    make_job(cli_logs, "logonly4", checkpoints=(), log="root", progress=None,
             final_model=False)
    result = cli.invoke(args=["artifacts", "jobs"])
    assert result.exit_code == 0, result.output
    listed = {row[0]: row[1] for row in lines(result.output)}
    assert listed == {"done1": "completed", "run2": "in_progress", "fail3": "ended",
                      "logonly4": "unknown"}


def test_jobs_on_an_empty_folder(cli: FlaskCliRunner) -> None:
    result = cli.invoke(args=["artifacts", "jobs"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == ""


def test_checkpoints_by_numeric_step_with_sizes(cli: FlaskCliRunner, cli_logs: Path) -> None:
    job = make_job(cli_logs, "abc123", checkpoints=(5, 100, 10))
    result = cli.invoke(args=["artifacts", "checkpoints", "abc123"])
    assert result.exit_code == 0, result.output
    rows = lines(result.output)
    assert [row[0] for row in rows] == ["checkpoint-5", "checkpoint-10", "checkpoint-100"]
    for row in rows:
        size = sum(len(b) for b in files_under(job / row[0]).values())
        assert int(row[1]) == size, row


def test_index_fills_the_cache(cli: FlaskCliRunner, cli_app: Flask, cli_logs: Path,
                               tmp_path: Path) -> None:
    job = make_job(cli_logs, "abc123", checkpoints=(10, 20))
    count = len(files_under(job))
    first = cli.invoke(args=["artifacts", "index", "abc123"])
    assert first.exit_code == 0, first.output
    assert first.output.strip() == f"abc123: {count} files, {count} read, 0 already cached"
    assert any((tmp_path / "cache").rglob("*")), "nothing was written to the cache folder"
    second = cli.invoke(args=["artifacts", "index", "abc123"])
    assert second.exit_code == 0, second.output
    assert second.output.strip() == f"abc123: {count} files, 0 read, {count} already cached"
    # A fresh app on the same cache folder finds it filled too.
    again = create_app({"TESTING": True, "ARTIFACTS_LOGS_DIR": str(cli_logs),
                        "ARTIFACTS_CACHE_DIR": str(tmp_path / "cache")})
    third = again.test_cli_runner().invoke(args=["artifacts", "index", "abc123"])
    assert f"{count} files, 0 read" in third.output, third.output
    # The SHA-256 pass reads again, once.
    sha = cli.invoke(args=["artifacts", "index", "--sha256", "abc123"])
    assert sha.exit_code == 0 and f"{count} read" in sha.output, sha.output
    sha2 = cli.invoke(args=["artifacts", "index", "--sha256", "abc123"])
    assert sha2.exit_code == 0 and ", 0 read" in sha2.output, sha2.output


def test_demo_writes_a_job_that_downloads(cli: FlaskCliRunner, cli_app: Flask,
                                          cli_logs: Path) -> None:
    result = cli.invoke(args=["artifacts", "demo", str(cli_logs)])
    assert result.exit_code == 0, result.output
    root = cli_logs / "job_demo"
    assert str(root) in result.output
    tensors = load_file(str(root / "model.safetensors"))
    assert tensors, "no tensors"
    for name, array in tensors.items():
        assert array.size > 0 and np.isfinite(array).all(), name
    for ckpt in root.glob("checkpoint-*"):
        assert load_file(str(ckpt / "model.safetensors")).keys() == tensors.keys()
        assert (ckpt / "trainer_state.json").is_file()

    listed = lines(cli.invoke(args=["artifacts", "jobs"]).output)
    assert ["demo", "completed"] in listed
    assert lines(cli.invoke(args=["artifacts", "checkpoints", "demo"]).output)

    client = cli_app.test_client()
    response = client.get("/api/training/demo/download/model")
    assert response.status_code == 200, response.get_data(as_text=True)
    zf = zipfile.ZipFile(io.BytesIO(response.data))
    assert zf.testzip() is None
    members = {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}
    assert members["job_demo/model.safetensors"] == (root / "model.safetensors").read_bytes()
    expected = {f"job_demo/{k}": v for k, v in files_under(root).items() if k != "progress.json"}
    assert members == expected
    logs = client.get("/api/training/demo/download/logs")
    assert logs.status_code == 200
    assert zipfile.ZipFile(io.BytesIO(logs.data)).testzip() is None


def test_demo_with_another_job_id(cli: FlaskCliRunner, cli_logs: Path) -> None:
    result = cli.invoke(args=["artifacts", "demo", "--job-id", "try1", str(cli_logs)])
    assert result.exit_code == 0, result.output
    assert load_file(str(cli_logs / "job_try1" / "model.safetensors"))


@pytest.mark.parametrize("command", ["checkpoints", "index"])
def test_unknown_job_fails_clearly(cli: FlaskCliRunner, cli_logs: Path, command: str) -> None:
    make_job(cli_logs, "abc123", checkpoints=(10,))
    result = cli.invoke(args=["artifacts", command, "nosuch99"])
    assert result.exit_code != 0
    assert "No job 'nosuch99'" in result.output, result.output
    assert "Traceback" not in result.output


def test_invalid_job_id_fails_clearly(cli: FlaskCliRunner) -> None:
    result = cli.invoke(args=["artifacts", "checkpoints", ".."])
    assert result.exit_code != 0
    assert "job id" in result.output.lower(), result.output
    assert "Traceback" not in result.output


def test_jobs_command_skips_job_names_that_lead_outside(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    make_job(logs, "real")
    os.symlink("/etc", logs / "job_etc")
    os.symlink(tmp_path / "missing", logs / "job_dangling")
    app = create_app({"TESTING": True, "ARTIFACTS_LOGS_DIR": str(logs),
                      "ARTIFACTS_CACHE_DIR": str(tmp_path / "cache")})
    result = app.test_cli_runner().invoke(args=["artifacts", "jobs"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["real", "completed"]
