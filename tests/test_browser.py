"""The job page in a real headless Chromium (Selenium, the system browser and
driver; nothing is downloaded at test time), served by gunicorn with the
shipped configuration; and the same page without JavaScript.

Without chromium, chromedriver, curl or selenium the browser test is skipped,
unless the ``CI`` environment variable is set: CI installs them, so there a
missing tool is a failure.
"""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import time
import typing as t
import zipfile
from pathlib import Path

import pytest

from jobtree import files_under, make_job
from server import GunicornServer

from flask_artifacts import create_app

JOB = "web42"


def need(reason: str) -> t.NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so the browser test must run)")
    pytest.skip(reason)


def browser_tools() -> tuple[str, str, str]:
    """Paths of chromium, chromedriver and curl, or skip (fail under CI)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        need("selenium is not installed (pip install 'selenium>=4.10')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        need("no chromium on PATH (Debian: apt-get install chromium)")
    driver = shutil.which("chromedriver")
    if driver is None:
        need("no chromedriver on PATH (Debian: apt-get install chromium-driver)")
    curl = shutil.which("curl")
    if curl is None:
        need("no curl on PATH")
    return chromium, driver, curl


class Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "a":
            self._href, self._text = dict(attrs).get("href") or "", []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append(("".join(self._text).strip(), self._href))
            self._href = None


@pytest.fixture
def web_logs(tmp_path: Path) -> Path:
    logs = tmp_path / "logs"
    make_job(logs, JOB, checkpoints=(10, 20))
    return logs


def test_job_page_works_without_javascript(web_logs: Path, tmp_path: Path) -> None:
    app = create_app({"TESTING": True, "ARTIFACTS_LOGS_DIR": str(web_logs),
                      "ARTIFACTS_CACHE_DIR": str(tmp_path / "cache")})
    client = app.test_client()
    response = client.get(f"/jobs/{JOB}")
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    assert "<script" not in text.lower()
    page = Page()
    page.feed(text)
    for tag, attrs in page.tags:
        assert tag not in ("script", "noscript", "iframe", "object", "embed"), tag
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)
            assert "javascript:" not in (value or "").lower(), (tag, name)
    links = dict(page.links)
    assert links["Model"] == f"/api/training/{JOB}/download/model"
    assert links["checkpoint-10"] == f"/api/training/{JOB}/download/model?checkpoint=checkpoint-10"
    assert links["checkpoint-20"] == f"/api/training/{JOB}/download/model?checkpoint=checkpoint-20"
    assert links["Logs"] == f"/api/training/{JOB}/download/logs"
    for text_, href in page.links:
        response = client.get(href)
        assert response.status_code == 200, (text_, href)
        response.close()


def _wait_for_download(folder: Path, name: str, timeout: float = 30) -> Path:
    deadline = time.monotonic() + timeout
    target = folder / name
    while time.monotonic() < deadline:
        partial = [p.name for p in folder.iterdir() if p.name.endswith(".crdownload")]
        if target.is_file() and not partial:
            return target
        time.sleep(0.1)
    raise AssertionError(f"{name} did not appear within {timeout} s; the folder holds"
                         f" {sorted(p.name for p in folder.iterdir())}")


def test_model_link_downloads_in_chromium(web_logs: Path, tmp_path: Path) -> None:
    chromium, driver_path, curl = browser_tools()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    profile = tmp_path / "profile"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads),
        "download.prompt_for_download": False,
        "download.directory_upgrade": True,
        "safebrowsing.enabled": False,
    })
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})

    with GunicornServer(web_logs, tmp_path / "cache", workers=1, threads=4,
                        log_file=tmp_path / "gunicorn.log") as server:
        model_url = f"{server.url}/api/training/{JOB}/download/model"
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            driver.set_page_load_timeout(30)
            driver.get(f"{server.url}/jobs/{JOB}")
            assert f"Job {JOB}" in driver.title
            link = driver.find_element(By.LINK_TEXT, "Model")
            assert link.get_attribute("href") == model_url
            link.click()
            downloaded = _wait_for_download(downloads, f"job_{JOB}_model.zip")
            console = driver.get_log("browser")
        finally:
            driver.quit()
        severe = [entry for entry in console if entry.get("level") == "SEVERE"]
        assert severe == [], severe

        by_curl = tmp_path / "curl.zip"
        subprocess.run([curl, "--silent", "--show-error", "--fail", "--max-time", "30",
                        "--output", str(by_curl), model_url], check=True, timeout=40)

    assert downloaded.read_bytes() == by_curl.read_bytes()
    assert sorted(p.name for p in downloads.iterdir()) == [f"job_{JOB}_model.zip"]
    with zipfile.ZipFile(downloaded) as zf:
        assert zf.testzip() is None
        members = {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}
    job = web_logs / f"job_{JOB}"
    assert members == {f"job_{JOB}/{k}": v for k, v in files_under(job).items()
                       if k != "progress.json"}
