"""Signed, expiring download links.

``artifacts.signed_url`` gives a link that downloads without credentials
(here: an authorize callback that refuses everything). Tampering with it,
letting it expire or moving it to another job or selection answers 403,
the same for a real job and a made-up one. The signature never reaches the
access log of the shipped gunicorn configuration nor nginx's log format.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import time
import typing as t
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, parse_qsl, quote, urlencode, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient

from jobtree import files_under, make_job
from server import REPO, GunicornServer

from flask_artifacts import Artifacts

SECRET = "signed-links-test-secret"
MADE_UP = "nosuch99"
WEIGHTS = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
           "tokenizer_config.json", "special_tokens_map.json"}


class WholeBodyClient(FlaskClient):
    def open(self, *args: t.Any, buffered: bool = True, **kwargs: t.Any) -> t.Any:
        return super().open(*args, buffered=buffered, **kwargs)


class Signed(t.NamedTuple):
    app: Flask
    artifacts: Artifacts
    client: FlaskClient
    logs: Path


def build_app(logs: Path, cache: Path, prefix: str = "") -> tuple[Flask, Artifacts]:
    app = Flask(__name__)
    app.test_client_class = WholeBodyClient
    app.config.update(TESTING=True, SECRET_KEY=SECRET, ARTIFACTS_LOGS_DIR=str(logs),
                      ARTIFACTS_CACHE_DIR=str(cache), ARTIFACTS_URL_PREFIX=prefix)
    artifacts = Artifacts()

    @artifacts.authorize
    def nobody(job_id: str, kind: str, checkpoint: str | None) -> bool:
        return False

    artifacts.init_app(app)
    return app, artifacts


@pytest.fixture
def signed(tmp_path: Path) -> Signed:
    logs = tmp_path / "logs"
    make_job(logs, "abc123", checkpoints=(10, 20))
    make_job(logs, "other7", checkpoints=(10, 20))
    app, artifacts = build_app(logs, tmp_path / "cache")
    return Signed(app, artifacts, app.test_client(), logs)


def sign(s: Signed, job_id: str = "abc123", **kwargs: t.Any) -> str:
    with s.app.test_request_context():
        return s.artifacts.signed_url(job_id, **kwargs)


def zip_members(data: bytes) -> dict[str, bytes]:
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None
    return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


def with_query(url: str, edit: t.Callable[[list[tuple[str, str]]], list[tuple[str, str]]]) -> str:
    parts = urlsplit(url)
    return parts.path + "?" + urlencode(edit(parse_qsl(parts.query, keep_blank_values=True)))


def replace_param(name: str, value: str | None) -> t.Callable[[list[tuple[str, str]]], list[tuple[str, str]]]:
    def edit(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out = [(k, v) for k, v in pairs if k != name]
        if value is not None:
            out.insert(0, (name, value))
        return out
    return edit


def refusal(response: t.Any, code: str) -> tuple[int, bytes, list[tuple[str, str]]]:
    assert response.status_code == 403, response.get_data(as_text=True)
    assert response.get_json()["error"] == code
    assert b"PK\x03\x04" not in response.data
    return (response.status_code, response.data,
            sorted((k, v) for k, v in response.headers.items() if k.lower() != "date"))


# -- building links ---------------------------------------------------------------


def test_signed_url_is_a_path_with_expires_and_signature(signed: Signed) -> None:
    before = int(time.time())
    url = sign(signed)
    parts = urlsplit(url)
    assert not parts.scheme and not parts.netloc
    assert parts.path == "/api/training/abc123/download/model"
    query = parse_qs(parts.query)
    assert set(query) == {"expires", "signature"}
    assert before + 3600 <= int(query["expires"][0]) <= int(time.time()) + 3600
    assert query["signature"][0]

    with signed.app.test_request_context():
        checkpoint = signed.artifacts.signed_url("abc123", kind="checkpoint",
                                                 checkpoint="checkpoint-10", expires_in=60)
        logs = signed.artifacts.signed_url("abc123", kind="logs")
        weights = signed.artifacts.signed_url("abc123", preset="weights")
    assert urlsplit(checkpoint).path == "/api/training/abc123/download/model"
    assert parse_qs(urlsplit(checkpoint).query)["checkpoint"] == ["checkpoint-10"]
    assert urlsplit(logs).path == "/api/training/abc123/download/logs"
    assert parse_qs(urlsplit(weights).query)["preset"] == ["weights"]


def test_signed_url_external(signed: Signed) -> None:
    with signed.app.test_request_context(base_url="https://dash.example.org"):
        url = signed.artifacts.signed_url("abc123", _external=True)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == ("https", "dash.example.org")
    assert parts.path == "/api/training/abc123/download/model"
    assert {"expires", "signature"} <= set(parse_qs(parts.query))


def test_signed_url_under_a_prefix(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    make_job(logs, "abc123", checkpoints=(10,))
    app, artifacts = build_app(logs, tmp_path / "cache", prefix="/artifacts")
    with app.test_request_context():
        url = artifacts.signed_url("abc123")
    assert url.startswith("/artifacts/api/training/abc123/download/model?")
    assert app.test_client().get(url).status_code == 200


def test_signed_url_refuses_bad_arguments(signed: Signed) -> None:
    with signed.app.test_request_context():
        with pytest.raises(ValueError):
            signed.artifacts.signed_url("abc123", kind="listing")
        with pytest.raises(ValueError):
            signed.artifacts.signed_url("abc123", kind="checkpoint")
        with pytest.raises(TypeError):
            signed.artifacts.signed_url("abc123", colour="red")


# -- valid links ------------------------------------------------------------------


def test_without_signature_everything_is_refused(signed: Signed) -> None:
    response = signed.client.get("/api/training/abc123/download/model")
    assert response.status_code == 403
    assert response.get_json()["error"] == "forbidden"


def test_signed_model_link_downloads(signed: Signed) -> None:
    response = signed.client.get(sign(signed))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/zip"
    members = zip_members(response.data)
    job = signed.logs / "job_abc123"
    expected = {f"job_abc123/{k}": v for k, v in files_under(job).items() if k != "progress.json"}
    assert members == expected


def test_signed_checkpoint_link_downloads(signed: Signed) -> None:
    response = signed.client.get(sign(signed, kind="checkpoint", checkpoint="checkpoint-10"))
    assert response.status_code == 200, response.get_data(as_text=True)
    members = zip_members(response.data)
    ckpt = signed.logs / "job_abc123" / "checkpoint-10"
    assert {k.split("/", 1)[1] for k in members} == set(files_under(ckpt))
    # kind="model" with a checkpoint is the same download.
    again = signed.client.get(sign(signed, checkpoint="checkpoint-10"))
    assert again.status_code == 200 and again.data == response.data


def test_signed_logs_link_downloads(signed: Signed) -> None:
    response = signed.client.get(sign(signed, kind="logs"))
    assert response.status_code == 200, response.get_data(as_text=True)
    members = zip_members(response.data)
    assert members["logs/training.log"] == (signed.logs / "job_abc123.log").read_bytes()


def test_signed_link_with_selection(signed: Signed) -> None:
    response = signed.client.get(sign(signed, preset="weights"))
    assert response.status_code == 200, response.get_data(as_text=True)
    names = {k.split("/", 1)[1] for k in zip_members(response.data)}
    assert names == WEIGHTS
    both = signed.client.get(sign(signed, include=["*.json", "model.safetensors"],
                                  exclude="tokenizer*", sha256sums=True))
    assert both.status_code == 200, both.get_data(as_text=True)
    names = {k.split("/", 1)[1] for k in zip_members(both.data)}
    assert "model.safetensors" in names and "config.json" in names
    assert not any(n.startswith("tokenizer") for n in names)
    assert "SHA256SUMS" in names


# -- refused links ----------------------------------------------------------------


def _flip(signature: str) -> str:
    return ("A" if signature[0] != "A" else "B") + signature[1:]


def tampered(url: str) -> dict[str, str]:
    """Ways to change a valid link, by name."""
    sig = parse_qs(urlsplit(url).query)["signature"][0]
    return {
        "signature_flipped": with_query(url, replace_param("signature", _flip(sig))),
        "signature_truncated": with_query(url, replace_param("signature", sig[:-2])),
        "signature_empty": with_query(url, replace_param("signature", "")),
        "signature_not_ascii": with_query(url, replace_param("signature", sig[:-1] + "é")),
        "expires_moved": with_query(url, lambda p: [(k, str(int(v) + 1) if k == "expires" else v)
                                                    for k, v in p]),
        "expires_removed": with_query(url, replace_param("expires", None)),
        "preset_changed": with_query(url, replace_param("preset", "full")),
        "preset_removed": with_query(url, replace_param("preset", None)),
        "include_added": with_query(url, lambda p: p + [("include", "**")]),
        "checkpoint_added": with_query(url, lambda p: p + [("checkpoint", "checkpoint-20")]),
        "compression_added": with_query(url, lambda p: p + [("compression", "deflate")]),
    }


def test_tampered_links_are_refused(signed: Signed) -> None:
    for job_id in ("abc123", MADE_UP):
        url = sign(signed, job_id, preset="weights")
        for name, bad in tampered(url).items():
            refusal(signed.client.get(bad), "invalid_signature")


def test_tampered_answers_are_the_same_for_real_and_made_up_jobs(signed: Signed) -> None:
    real = tampered(sign(signed, "abc123", preset="weights"))
    made_up = tampered(sign(signed, MADE_UP, preset="weights"))
    for name in real:
        a = refusal(signed.client.get(real[name]), "invalid_signature")
        b = refusal(signed.client.get(made_up[name]), "invalid_signature")
        assert a == b, name


def test_checkpoint_changed_is_refused(signed: Signed) -> None:
    url = sign(signed, kind="checkpoint", checkpoint="checkpoint-10")
    for bad in (with_query(url, replace_param("checkpoint", "checkpoint-20")),
                with_query(url, replace_param("checkpoint", "latest")),
                with_query(url, replace_param("checkpoint", None))):
        refusal(signed.client.get(bad), "invalid_signature")


def test_a_link_does_not_open_another_kind(signed: Signed) -> None:
    model = sign(signed)
    logs_path = "/api/training/abc123/download/logs"
    refusal(signed.client.get(logs_path + "?" + urlsplit(model).query), "invalid_signature")
    logs = sign(signed, kind="logs")
    model_path = "/api/training/abc123/download/model"
    refusal(signed.client.get(model_path + "?" + urlsplit(logs).query), "invalid_signature")


def test_expired_link_is_refused(signed: Signed) -> None:
    for kwargs in ({}, {"kind": "logs"}, {"checkpoint": "checkpoint-10"}, {"preset": "weights"}):
        real = refusal(signed.client.get(sign(signed, expires_in=-10, **kwargs)), "link_expired")
        made_up = refusal(signed.client.get(sign(signed, MADE_UP, expires_in=-10, **kwargs)),
                          "link_expired")
        assert real == made_up, kwargs


def test_a_link_for_one_job_does_not_open_another(signed: Signed) -> None:
    url = sign(signed, "abc123")
    query = urlsplit(url).query
    other = refusal(signed.client.get(f"/api/training/other7/download/model?{query}"),
                    "invalid_signature")
    missing = refusal(signed.client.get(f"/api/training/{MADE_UP}/download/model?{query}"),
                      "invalid_signature")
    assert other == missing
    # Nor another job's checkpoint or logs.
    ckpt = sign(signed, "abc123", checkpoint="checkpoint-10")
    refusal(signed.client.get("/api/training/other7/download/model?" + urlsplit(ckpt).query),
            "invalid_signature")
    logs = sign(signed, "abc123", kind="logs")
    refusal(signed.client.get("/api/training/other7/download/logs?" + urlsplit(logs).query),
            "invalid_signature")


def test_a_checkpoint_link_does_not_open_another_checkpoints_files(signed: Signed) -> None:
    """The signature for checkpoint-10 must not serve checkpoint-20's files."""
    url = sign(signed, checkpoint="checkpoint-10")
    query = urlsplit(url).query
    own = signed.client.get(f"/api/training/abc123/files/checkpoint-10/optimizer.pt?{query}")
    assert own.status_code in (200, 403)  # whether /files honours signatures is a choice
    response = signed.client.get(f"/api/training/abc123/files/checkpoint-20/optimizer.pt?{query}")
    assert response.status_code == 403, (
        f"{response.status_code}: a link signed for checkpoint-10 served"
        f" {len(response.data)} bytes of checkpoint-20/optimizer.pt")


def test_a_weights_link_does_not_open_files_outside_its_selection(signed: Signed) -> None:
    """The signature for ``preset=weights`` must not serve training_args.bin."""
    url = sign(signed, preset="weights")
    query = urlsplit(url).query
    response = signed.client.get(f"/api/training/abc123/files/training_args.bin?{query}")
    assert response.status_code == 403, (
        f"{response.status_code}: a link signed for preset=weights served"
        f" {len(response.data)} bytes of training_args.bin, which that selection leaves out")


def test_signature_needs_a_secret_key(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    make_job(logs, "abc123", checkpoints=())
    app, artifacts = build_app(logs, tmp_path / "cache")
    app.config["SECRET_KEY"] = None
    with app.test_request_context():
        with pytest.raises(RuntimeError, match="SECRET_KEY"):
            artifacts.signed_url("abc123")


def test_links_from_another_secret_are_refused(signed: Signed, tmp_path: Path) -> None:
    app, artifacts = build_app(signed.logs, tmp_path / "cache-other")
    app.config["SECRET_KEY"] = "a-different-secret"
    with app.test_request_context():
        url = artifacts.signed_url("abc123")
    refusal(signed.client.get(url), "invalid_signature")


# -- logs -------------------------------------------------------------------------


def _fetch(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_signature_never_reaches_gunicorn_access_log(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    make_job(logs, "abc123", checkpoints=(10,))
    app, artifacts = build_app(logs, tmp_path / "cache-sign")
    with app.test_request_context():
        urls = [artifacts.signed_url("abc123"),
                artifacts.signed_url("abc123", checkpoint="checkpoint-10", preset="weights"),
                artifacts.signed_url("abc123", kind="logs")]
        expired = artifacts.signed_url("abc123", expires_in=-10)
    signatures = [parse_qs(urlsplit(u).query)["signature"][0] for u in urls + [expired]]
    server = GunicornServer(logs, tmp_path / "cache", workers=1, threads=4,
                            log_file=tmp_path / "gunicorn.log",
                            extra_env={"FLASK_SECRET_KEY": json.dumps(SECRET)})
    with server:
        for url in urls:
            status, body = _fetch(server.port, url)
            assert status == 200, body[:300]
            zip_members(body)
        tampered_url = with_query(urls[0], replace_param("signature", _flip(signatures[0])))
        assert _fetch(server.port, tampered_url)[0] == 403
        assert _fetch(server.port, expired)[0] == 403
        time.sleep(0.2)  # let the access log line of the last request be written
    output = server.log
    assert output.count('"GET /api/training/abc123/download/model HTTP/1.1" 200') == 2, output
    assert '"GET /api/training/abc123/download/logs HTTP/1.1" 200' in output, output
    assert '"GET /api/training/abc123/download/model HTTP/1.1" 403' in output, output
    for signature in signatures + [_flip(signatures[0])]:
        assert signature not in output
        assert quote(signature, safe="") not in output
    assert "signature=" not in output
    assert "expires=" not in output


def test_shipped_gunicorn_access_log_format_leaves_the_query_out() -> None:
    namespace: dict[str, t.Any] = {}
    exec(compile((REPO / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"), namespace)
    fmt = namespace["access_log_format"]
    assert "%(U)s" in fmt
    for leaky in ("%(r)s", "%(q)s", "{raw_uri}", "%(f)s"):
        assert leaky not in fmt, leaky


def test_nginx_log_format_leaves_the_query_out() -> None:
    text = (REPO / "deploy" / "nginx.conf").read_text()
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    match = re.search(r"\blog_format\s+artifacts\b(.*?);", text, re.S)
    assert match, "deploy/nginx.conf has no 'log_format artifacts'"
    fmt = match.group(1)
    assert re.search(r"\$uri\b", fmt)
    for leaky in (r"\$request(?![A-Za-z0-9_])", r"\$request_uri\b", r"\$args\b",
                  r"\$query_string\b", r"\$arg_\w+", r"\$is_args\b"):
        assert not re.search(leaky, fmt), leaky
    # Every access log of the file writes that format.
    for directive in re.findall(r"\baccess_log\s+([^;]*);", text):
        words = directive.split()
        assert words == ["off"] or (len(words) >= 2 and words[1] == "artifacts"), directive
