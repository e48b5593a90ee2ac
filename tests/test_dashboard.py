"""flask-artifacts inside a host dashboard: a hand-built Flask app with its own
routes, a session login and an authorize callback registers the extension.

Covers ``init_app`` and ``app.extensions``, every route built with
``url_for`` under ``ARTIFACTS_URL_PREFIX``, refusals that say nothing of a
job's existence, the job status loader, the HTML pages and their settings,
template overrides and the ``download_links`` macro, the JSON job index, and
the download signals.
"""

from __future__ import annotations

import datetime
import html.parser
import io
import os
import typing as t
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flask import Flask, redirect, render_template, request, session, url_for
from flask.testing import FlaskClient
from werkzeug.exceptions import Unauthorized

from jobtree import files_under, make_job

import flask_artifacts
from flask_artifacts import Artifacts
from flask_artifacts.signals import download_finished, download_started

PREFIX = "/artifacts"
SECRET = "host-dashboard-test-secret"
MADE_UP = "nosuch99"


# -- the host app -----------------------------------------------------------------


class WholeBodyClient(FlaskClient):
    """Reads each body whole (running its ``close()``) unless ``buffered=False``."""

    def open(self, *args: t.Any, buffered: bool = True, **kwargs: t.Any) -> t.Any:
        return super().open(*args, buffered=buffered, **kwargs)


class Host(t.NamedTuple):
    app: Flask
    artifacts: Artifacts
    calls: list[tuple[str, str, str | None]]


def build_host(logs_dir: Path, cache_dir: Path, *, owners: dict[str, set[str]] | None = None,
               template_folder: Path | None = None, **config: t.Any) -> Host:
    """A dashboard of its own, with the extension registered through ``init_app``."""
    kwargs: dict[str, t.Any] = {}
    if template_folder is not None:
        kwargs["template_folder"] = str(template_folder)
    app = Flask(__name__, **kwargs)
    app.test_client_class = WholeBodyClient
    app.config.update(
        TESTING=True,
        SECRET_KEY=SECRET,
        ARTIFACTS_LOGS_DIR=str(logs_dir),
        ARTIFACTS_CACHE_DIR=str(cache_dir),
        ARTIFACTS_URL_PREFIX=PREFIX,
    )
    app.config.update(config)
    owned = owners if owners is not None else {"alice": {"abc123"}, "bob": {"bobjob"}}
    calls: list[tuple[str, str, str | None]] = []

    artifacts = Artifacts()

    @artifacts.authorize
    def may_see(job_id: str, kind: str, checkpoint: str | None) -> bool:
        calls.append((job_id, kind, checkpoint))
        user = session.get("user")
        if user is None:
            raise Unauthorized("Log in to the dashboard first.")
        return job_id in owned.get(user, set())

    @app.get("/")
    def home() -> str:
        return f"Dashboard home; user={session.get('user')}"

    @app.route("/login", methods=["GET", "POST"])
    def login() -> t.Any:
        if request.method == "GET":
            return "<form method=post><input name=user></form>"
        session["user"] = request.form["user"]
        return redirect(url_for("home"))

    @app.get("/mine/<job_id>")
    def mine(job_id: str) -> str:
        return render_template("dash.html", job_id=job_id)

    artifacts.init_app(app)
    return Host(app, artifacts, calls)


def login(client: FlaskClient, user: str) -> None:
    response = client.post("/login", data={"user": user})
    assert response.status_code == 302


@pytest.fixture
def dash_logs(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def dash_cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def dash_job(dash_logs: Path) -> Path:
    """alice's completed job ``abc123`` with checkpoints 10 and 20 and a log."""
    return make_job(dash_logs, "abc123", checkpoints=(10, 20))


@pytest.fixture
def host(dash_logs: Path, dash_cache: Path, dash_job: Path) -> Host:
    make_job(dash_logs, "bobjob", checkpoints=(10,))
    return build_host(dash_logs, dash_cache)


@pytest.fixture
def alice(host: Host) -> FlaskClient:
    client = host.app.test_client()
    login(client, "alice")
    return client


# -- helpers ----------------------------------------------------------------------


class Anchors(html.parser.HTMLParser):
    """Collects ``<a>`` elements (href, text) and every tag name seen."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text).strip()))
            self._href = None


def anchors(page: str) -> dict[str, str]:
    """Link text -> href."""
    parser = Anchors()
    parser.feed(page)
    return {text: href for href, text in parser.links}


def human(size: int) -> str:
    """The size in the units a person reads (1024-based, one decimal)."""
    if size < 1024:
        return f"{size} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size_f = size / 1024 ** (("KiB", "MiB", "GiB", "TiB").index(unit) + 1)
        if size_f < 1024 or unit == "TiB":
            return f"{size_f:.1f} {unit}"
    raise AssertionError("unreachable")


def tree_size(root: Path) -> int:
    return sum(len(data) for data in files_under(root).values())


def job_urls(app: Flask, job_id: str) -> dict[str, str]:
    """Every job-scoped route, built with url_for."""
    with app.test_request_context():
        return {
            "download_model": url_for("artifacts.download_model", job_id=job_id),
            "download_model_checkpoint": url_for("artifacts.download_model", job_id=job_id,
                                                 checkpoint="checkpoint-10"),
            "download_logs": url_for("artifacts.download_logs", job_id=job_id),
            "list_checkpoints": url_for("artifacts.list_checkpoints", job_id=job_id),
            "manifest": url_for("artifacts.manifest", job_id=job_id),
            "download_file": url_for("artifacts.download_file", job_id=job_id,
                                     path="config.json"),
            "download_file_checkpoint": url_for("artifacts.download_file", job_id=job_id,
                                                path="checkpoint-10/config.json"),
            "log_file": url_for("artifacts.log_file", job_id=job_id),
            "job_page": url_for("artifacts.job_page", job_id=job_id),
        }


def comparable(response: t.Any) -> tuple[int, bytes, list[tuple[str, str]]]:
    headers = sorted((k, v) for k, v in response.headers.items() if k.lower() != "date")
    return response.status_code, response.get_data(), headers


# -- registration -----------------------------------------------------------------


def test_registered_through_init_app(host: Host) -> None:
    app = host.app
    assert "artifacts" in app.extensions
    assert app.extensions["artifacts"].artifacts is host.artifacts
    with pytest.raises(RuntimeError):
        host.artifacts.init_app(app)
    with pytest.raises(RuntimeError):
        Artifacts().init_app(app)
    with pytest.raises(RuntimeError):
        Artifacts(app)


def test_host_routes_still_work(host: Host) -> None:
    client = host.app.test_client()
    assert client.get("/").get_data(as_text=True) == "Dashboard home; user=None"
    assert client.get("/login").status_code == 200
    login(client, "alice")
    assert client.get("/").get_data(as_text=True) == "Dashboard home; user=alice"


def test_url_for_builds_every_route_under_the_prefix(host: Host, alice: FlaskClient) -> None:
    urls = job_urls(host.app, "abc123")
    with host.app.test_request_context():
        urls["list_jobs"] = url_for("artifacts.list_jobs")
        urls["job_index"] = url_for("artifacts.job_index")
    assert urls["download_model"] == f"{PREFIX}/api/training/abc123/download/model"
    assert urls["job_page"] == f"{PREFIX}/jobs/abc123"
    assert urls["job_index"] == f"{PREFIX}/jobs"
    assert urls["list_jobs"] == f"{PREFIX}/api/training/jobs"
    expected_type = {
        "download_model": "application/zip", "download_model_checkpoint": "application/zip",
        "download_logs": "application/zip", "list_checkpoints": "application/json",
        "manifest": "application/json", "download_file": "application/json",
        "download_file_checkpoint": "application/json", "log_file": "text/plain",
        "job_page": "text/html", "list_jobs": "application/json", "job_index": "text/html",
    }
    for name, url in urls.items():
        assert url.startswith(PREFIX + "/"), (name, url)
        response = alice.get(url)
        assert response.status_code == 200, (name, url, response.get_data(as_text=True)[:300])
        assert response.mimetype == expected_type[name], (name, response.mimetype)
        if response.mimetype == "application/zip":
            assert zipfile.ZipFile(io.BytesIO(response.data)).testzip() is None
        # Without the prefix nothing answers.
        assert alice.get(url[len(PREFIX):]).status_code == 404, name


@pytest.mark.parametrize("user", [None, "bob"], ids=["logged_out_401", "not_owner_403"])
def test_refusals_say_nothing_of_existence(host: Host, user: str | None) -> None:
    client = host.app.test_client()
    if user is not None:
        login(client, user)
    status = 401 if user is None else 403
    real, made_up = job_urls(host.app, "abc123"), job_urls(host.app, MADE_UP)
    for name in real:
        a, b = client.get(real[name]), client.get(made_up[name])
        assert a.status_code == status, (name, a.status_code, a.get_data(as_text=True))
        assert a.mimetype == "application/json", name
        body = a.get_json()
        assert body["error"] == ("unauthorized" if status == 401 else "forbidden"), (name, body)
        assert b"PK\x03\x04" not in a.data and b"PK\x05\x06" not in a.data, name
        assert "abc123" not in a.get_data(as_text=True), name
        assert comparable(a) == comparable(b), name
        # The same for HEAD.
        ha, hb = client.head(real[name]), client.head(made_up[name])
        assert ha.status_code == status and comparable(ha) == comparable(hb), name


def test_refusal_comes_before_any_archive_byte(host: Host) -> None:
    client = host.app.test_client()
    login(client, "bob")
    response = client.get(job_urls(host.app, "abc123")["download_model"], buffered=False)
    try:
        assert response.status_code == 403
        assert response.headers.get("Content-Disposition") is None
        assert response.mimetype == "application/json"
        assert b"PK" not in b"".join(response.response)
    finally:
        response.close()


def test_authorize_sees_kind_and_checkpoint(host: Host, alice: FlaskClient) -> None:
    urls = job_urls(host.app, "abc123")
    for name in ("download_model", "download_model_checkpoint", "download_logs",
                 "list_checkpoints", "job_page"):
        alice.get(urls[name])
    assert ("abc123", "model", None) in host.calls
    assert ("abc123", "checkpoint", "checkpoint-10") in host.calls
    assert ("abc123", "logs", None) in host.calls
    assert ("abc123", "listing", None) in host.calls
    assert ("abc123", "page", None) in host.calls


def test_allowed_model_download_is_the_job(host: Host, alice: FlaskClient, dash_job: Path) -> None:
    response = alice.get(job_urls(host.app, "abc123")["download_model"])
    assert response.status_code == 200
    zf = zipfile.ZipFile(io.BytesIO(response.data))
    files = {i.filename[len("job_abc123/"):]: zf.read(i) for i in zf.infolist()
             if not i.is_dir()}
    expected = {k: v for k, v in files_under(dash_job).items() if k != "progress.json"}
    assert files == expected


# -- job status loader ------------------------------------------------------------


def test_job_status_loader_overrides_progress_json(host: Host, alice: FlaskClient,
                                                   dash_logs: Path) -> None:
    make_job(dash_logs, "other7", checkpoints=(10,))
    host.calls.clear()
    asked: list[str] = []

    @host.artifacts.job_status_loader
    def status_from_db(job_id: str) -> str | None:
        asked.append(job_id)
        return "running" if job_id == "abc123" else None

    urls = job_urls(host.app, "abc123")
    response = alice.get(urls["download_model"])
    assert response.status_code == 409, response.get_data(as_text=True)
    assert response.get_json()["error"] == "job_not_completed"
    assert "abc123" in asked

    assert alice.get(urls["list_checkpoints"]).get_json()["status"] == "running"
    page = alice.get(urls["job_page"]).get_data(as_text=True)
    assert "<strong>running</strong>" in page
    assert "Model" not in anchors(page)

    # None falls back to progress.json ("completed").
    bob = host.app.test_client()
    login(bob, "bob")
    assert bob.get(job_urls(host.app, "bobjob")["download_model"]).status_code == 200
    assert "bobjob" in asked


# -- pages ------------------------------------------------------------------------


def test_job_page_lists_every_download(host: Host, alice: FlaskClient, dash_job: Path) -> None:
    urls = job_urls(host.app, "abc123")
    response = alice.get(urls["job_page"])
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "<strong>completed</strong>" in page
    links = anchors(page)
    assert links["Model"] == urls["download_model"]
    model_size = tree_size(dash_job) - (dash_job / "progress.json").stat().st_size
    assert f"({human(model_size)}, ZIP)" in page
    with host.app.test_request_context():
        for step in (10, 20):
            name = f"checkpoint-{step}"
            assert links[name] == url_for("artifacts.download_model", job_id="abc123",
                                          checkpoint=name)
            size = tree_size(dash_job / name)
            assert f"(step {step}, {human(size)}, ZIP)" in page, (name, human(size))
        assert links["Logs"] == url_for("artifacts.download_logs", job_id="abc123")
        assert links["All jobs"] == url_for("artifacts.job_index")
    # Each link answers.
    for text, href in links.items():
        assert alice.get(href).status_code == 200, text


def test_job_page_of_unknown_job_is_404(host: Host, alice: FlaskClient, dash_logs: Path) -> None:
    owners = {"alice": {"abc123", MADE_UP}}
    app = build_host(dash_logs, dash_logs.parent / "cache2", owners=owners).app
    client = app.test_client()
    login(client, "alice")
    assert client.get(f"{PREFIX}/jobs/{MADE_UP}").status_code == 404


def test_job_index_page(host: Host, alice: FlaskClient) -> None:
    response = alice.get(f"{PREFIX}/jobs")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    links = anchors(page)
    assert links["abc123"] == f"{PREFIX}/jobs/abc123"
    assert "completed" in page
    assert "bobjob" not in page  # alice may not see it


def test_pages_can_be_turned_off(dash_logs: Path, dash_cache: Path, dash_job: Path) -> None:
    app = build_host(dash_logs, dash_cache, ARTIFACTS_PAGES=False).app
    client = app.test_client()
    login(client, "alice")
    assert client.get(f"{PREFIX}/jobs").status_code == 404
    assert client.get(f"{PREFIX}/jobs/abc123").status_code == 404
    with app.test_request_context():
        with pytest.raises(Exception):
            url_for("artifacts.job_page", job_id="abc123")
    assert client.get(f"{PREFIX}/api/training/abc123/download/model").status_code == 200
    assert client.get(f"{PREFIX}/api/training/abc123/download/logs").status_code == 200
    assert client.get(f"{PREFIX}/api/training/checkpoints/abc123").status_code == 200
    listed = client.get(f"{PREFIX}/api/training/jobs")
    assert listed.status_code == 200
    assert [j["job_id"] for j in listed.get_json()["jobs"]] == ["abc123"]


def test_pages_prefix_moves_them(dash_logs: Path, dash_cache: Path, dash_job: Path) -> None:
    app = build_host(dash_logs, dash_cache, ARTIFACTS_PAGES_PREFIX="/runs").app
    client = app.test_client()
    login(client, "alice")
    with app.test_request_context():
        assert url_for("artifacts.job_page", job_id="abc123") == f"{PREFIX}/runs/abc123"
        assert url_for("artifacts.job_index") == f"{PREFIX}/runs"
    assert client.get(f"{PREFIX}/runs/abc123").status_code == 200
    assert client.get(f"{PREFIX}/runs").status_code == 200
    assert client.get(f"{PREFIX}/jobs/abc123").status_code == 404
    assert client.get(f"{PREFIX}/jobs").status_code == 404
    listed = client.get(f"{PREFIX}/api/training/jobs").get_json()
    assert listed["jobs"][0]["page_url"] == f"{PREFIX}/runs/abc123"


def test_host_template_overrides_job_page(dash_logs: Path, dash_cache: Path, dash_job: Path,
                                          tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    (templates / "artifacts").mkdir(parents=True)
    (templates / "artifacts" / "job.html").write_text(
        "<p>HOST JOB PAGE {{ job_id }}: {{ links.status }}</p>"
        '<a href="{{ links.model.url }}">Get the model</a>')
    app = build_host(dash_logs, dash_cache, template_folder=templates).app
    client = app.test_client()
    login(client, "alice")
    page = client.get(f"{PREFIX}/jobs/abc123").get_data(as_text=True)
    assert "HOST JOB PAGE abc123: completed" in page
    assert anchors(page) == {"Get the model": f"{PREFIX}/api/training/abc123/download/model"}
    assert "<h2>Downloads</h2>" not in page


def test_download_links_macro_in_a_host_template(dash_logs: Path, dash_cache: Path,
                                                 dash_job: Path, tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "dash.html").write_text(
        '{% from "artifacts/macros.html" import download_links %}'
        "<h1>My dashboard: {{ job_id }}</h1>{{ download_links(job_id) }}")
    app = build_host(dash_logs, dash_cache, template_folder=templates).app
    client = app.test_client()
    login(client, "alice")
    response = client.get("/mine/abc123")
    assert response.status_code == 200, response.get_data(as_text=True)
    page = response.get_data(as_text=True)
    assert "My dashboard: abc123" in page
    links = anchors(page)
    assert links["Model"] == f"{PREFIX}/api/training/abc123/download/model"
    assert links["checkpoint-10"] == (
        f"{PREFIX}/api/training/abc123/download/model?checkpoint=checkpoint-10")
    assert links["checkpoint-20"] == (
        f"{PREFIX}/api/training/abc123/download/model?checkpoint=checkpoint-20")
    assert links["Logs"] == f"{PREFIX}/api/training/abc123/download/logs"
    for href in links.values():
        assert client.get(href).status_code == 200, href


# -- the JSON job index -----------------------------------------------------------


def _set_mtime(path: Path, when: float) -> None:
    os.utime(path, (when, when))


def _iso(when: float) -> str:
    return datetime.datetime.fromtimestamp(int(when), tz=datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def indexed(dash_logs: Path, dash_cache: Path) -> tuple[Host, dict[str, float]]:
    """Three of alice's jobs with known folder times, and one of bob's (newest)."""
    times = {"old1": 1_700_000_000.0, "mid2": 1_700_100_000.0, "new3": 1_700_200_000.0}
    make_job(dash_logs, "mid2", checkpoints=(10,))
    make_job(dash_logs, "new3", status="running", checkpoints=(10,))
    make_job(dash_logs, "old1", checkpoints=())
    make_job(dash_logs, "bobjob", checkpoints=(10,))
    for job_id, when in times.items():
        _set_mtime(dash_logs / f"job_{job_id}", when)
    _set_mtime(dash_logs / "job_bobjob", 1_800_000_000.0)
    owners = {"alice": set(times), "bob": {"bobjob"}}
    return build_host(dash_logs, dash_cache, owners=owners), times


def test_list_jobs_shape_and_order(indexed: tuple[Host, dict[str, float]],
                                   dash_logs: Path) -> None:
    host, times = indexed
    client = host.app.test_client()
    login(client, "alice")
    response = client.get(f"{PREFIX}/api/training/jobs")
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"jobs", "page", "per_page", "total"}
    assert (body["page"], body["per_page"], body["total"]) == (1, 50, 3)
    assert [j["job_id"] for j in body["jobs"]] == ["new3", "mid2", "old1"]
    statuses = {j["job_id"]: j["status"] for j in body["jobs"]}
    assert statuses == {"new3": "running", "mid2": "completed", "old1": "completed"}
    for job in body["jobs"]:
        assert {"job_id", "status", "bytes", "modified", "page_url"} <= set(job)
        job_id = job["job_id"]
        assert job["modified"] == _iso(times[job_id])
        assert job["page_url"] == f"{PREFIX}/jobs/{job_id}"
        expected = tree_size(dash_logs / f"job_{job_id}")
        expected += (dash_logs / f"job_{job_id}.log").stat().st_size
        assert job["bytes"] == expected, job_id


def test_list_jobs_pagination(indexed: tuple[Host, dict[str, float]]) -> None:
    host, _ = indexed
    client = host.app.test_client()
    login(client, "alice")
    url = f"{PREFIX}/api/training/jobs"
    first = client.get(url, query_string={"per_page": 2}).get_json()
    assert [j["job_id"] for j in first["jobs"]] == ["new3", "mid2"]
    assert (first["page"], first["per_page"], first["total"]) == (1, 2, 3)
    second = client.get(url, query_string={"per_page": 2, "page": 2}).get_json()
    assert [j["job_id"] for j in second["jobs"]] == ["old1"]
    assert (second["page"], second["per_page"], second["total"]) == (2, 2, 3)
    beyond = client.get(url, query_string={"per_page": 2, "page": 3}).get_json()
    assert beyond["jobs"] == [] and beyond["total"] == 3
    assert client.get(url, query_string={"per_page": 500}).status_code == 200
    for bad in ({"per_page": 501}, {"per_page": 0}, {"page": 0}, {"page": "x"}):
        response = client.get(url, query_string=bad)
        assert response.status_code == 400, bad
        assert response.get_json()["error"] == "invalid_parameter", bad
    # The HTML index pages the same way.
    page = client.get(f"{PREFIX}/jobs", query_string={"per_page": 2}).get_data(as_text=True)
    links = anchors(page)
    assert "new3" in links and "mid2" in links and "old1" not in links
    assert "Older" in links
    assert client.get(f"{PREFIX}/jobs", query_string={"per_page": 501}).status_code == 400


def test_index_hides_refused_jobs(indexed: tuple[Host, dict[str, float]]) -> None:
    host, _ = indexed
    client = host.app.test_client()
    login(client, "bob")
    host.calls.clear()
    body = client.get(f"{PREFIX}/api/training/jobs").get_json()
    assert [j["job_id"] for j in body["jobs"]] == ["bobjob"]
    assert body["total"] == 1
    assert {c for c in host.calls} == {(j, "index", None)
                                       for j in ("bobjob", "mid2", "new3", "old1")}
    page = client.get(f"{PREFIX}/jobs").get_data(as_text=True)
    assert "bobjob" in page
    for hidden in ("mid2", "new3", "old1"):
        assert hidden not in page
    # Logged out: the callback's 401.
    anonymous = host.app.test_client()
    assert anonymous.get(f"{PREFIX}/api/training/jobs").status_code == 401


# -- signals ----------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.started: list[tuple[t.Any, dict[str, t.Any]]] = []
        self.finished: list[tuple[t.Any, dict[str, t.Any]]] = []

    def on_started(self, sender: t.Any, **kwargs: t.Any) -> None:
        self.started.append((sender, kwargs))

    def on_finished(self, sender: t.Any, **kwargs: t.Any) -> None:
        self.finished.append((sender, kwargs))


@pytest.fixture
def recorder(host: Host) -> t.Iterator[Recorder]:
    rec = Recorder()
    with download_started.connected_to(rec.on_started, sender=host.app), \
            download_finished.connected_to(rec.on_finished, sender=host.app):
        yield rec


def test_signals_are_exported() -> None:
    assert flask_artifacts.download_started is download_started
    assert flask_artifacts.download_finished is download_finished


@pytest.mark.parametrize("kind", ["model", "checkpoint", "logs"])
def test_signals_for_a_full_download(host: Host, alice: FlaskClient, recorder: Recorder,
                                     kind: str) -> None:
    urls = job_urls(host.app, "abc123")
    url = {"model": urls["download_model"], "checkpoint": urls["download_model_checkpoint"],
           "logs": urls["download_logs"]}[kind]
    checkpoint = "checkpoint-10" if kind == "checkpoint" else None
    response = alice.get(url)
    assert response.status_code == 200
    record = {"job_id": "abc123", "kind": kind, "checkpoint": checkpoint,
              "remote_addr": "127.0.0.1"}
    assert recorder.started == [(host.app, record)]
    assert recorder.finished == [(host.app, {**record, "bytes_sent": len(response.data),
                                             "completed": True})]


def test_no_signals_for_refused_download(host: Host, recorder: Recorder) -> None:
    client = host.app.test_client()
    login(client, "bob")
    assert client.get(job_urls(host.app, "abc123")["download_model"]).status_code == 403
    assert recorder.started == [] and recorder.finished == []


def test_signals_for_a_cut_off_download(dash_logs: Path, dash_cache: Path) -> None:
    big = np.random.default_rng(5).bytes(6 << 20)
    make_job(dash_logs, "big", checkpoints=(10,), extra_files={"blob.bin": big})
    host = build_host(dash_logs, dash_cache, owners={"alice": {"big"}},
                      ARTIFACTS_CHUNK_SIZE=65536)
    client = host.app.test_client()
    login(client, "alice")
    rec = Recorder()
    with download_started.connected_to(rec.on_started, sender=host.app), \
            download_finished.connected_to(rec.on_finished, sender=host.app):
        response = client.get(f"{PREFIX}/api/training/big/download/model", buffered=False)
        assert response.status_code == 200
        total = int(response.headers["Content-Length"])
        it = iter(response.response)
        first = next(it)
        assert 0 < len(first) < total
        response.close()
    record = {"job_id": "big", "kind": "model", "checkpoint": None, "remote_addr": "127.0.0.1"}
    assert rec.started == [(host.app, record)]
    assert len(rec.finished) == 1
    sender, finished = rec.finished[0]
    assert sender is host.app
    assert finished["completed"] is False
    assert {k: finished[k] for k in record} == record
    assert 0 < finished["bytes_sent"] < total
