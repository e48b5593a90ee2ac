"""Real nginx (Debian's package) in front of a real gunicorn, with the shipped configs.

The site is ``deploy/nginx.conf`` itself with only what a deployment changes
replaced: the upstream address (the test gunicorn's port), ``listen 80`` (a
free port), the access log path, and the include of
``/etc/nginx/snippets/artifacts-proxy.conf`` (the shipped
``deploy/artifacts-proxy.conf``). Each replacement is asserted, so these
tests break when the shipped files change shape instead of testing
something else. One test copy of the snippet lowers ``proxy_read_timeout``
and ``send_timeout`` to 3 s to show a slow client does not hit them.

Skips locally when nginx or curl is missing; fails in CI (``CI`` set).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import typing as t
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

try:
    from tests.helpers import wait_for
    from tests.jobtree import make_job, sparse_file
    from tests.server import REPO, GunicornServer, free_port, gunicorn_server_factory
except ImportError:  # tests/ itself on sys.path
    from helpers import wait_for  # type: ignore[no-redef]
    from jobtree import make_job, sparse_file  # type: ignore[no-redef]
    from server import REPO, GunicornServer, free_port, gunicorn_server_factory  # type: ignore[no-redef]

MiB = 1 << 20
GiB = 1 << 30

SITE = REPO / "deploy" / "nginx.conf"
SNIPPET = REPO / "deploy" / "artifacts-proxy.conf"
LOWERED_TIMEOUT = 3  # seconds, proxy_read_timeout and send_timeout of the slow proxy
# curl --limit-rate reads in bursts and the kernel buffers several MiB for it,
# so the archive is large enough that nginx itself spends over 2 x 3 s on it.
SLOW_RATE = 4 * MiB
SLOW_SIZE = 40 * MiB


def need(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path is None:
        message = f"{tool} is not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; .ci/run installs it")
        pytest.skip(message)
    return path


def replace(text: str, old: str, new: str, *, count: int | None = 1) -> str:
    """``text`` with ``old`` replaced, failing unless it occurs ``count`` times (None: any, >0)."""
    found = text.count(old)
    if count is None:
        assert found > 0, f"the shipped nginx config no longer contains {old!r}"
    else:
        assert found == count, (
            f"the shipped nginx config contains {old!r} {found} times, expected {count}")
    return text.replace(old, new)


def site_config(*, upstream_port: int, listen_port: int, access_log: Path, snippet: Path) -> str:
    """deploy/nginx.conf for this test run, plus a /dash/ location that sets X-Forwarded-Prefix."""
    text = SITE.read_text()
    text = replace(text, "server 127.0.0.1:8000 ", f"server 127.0.0.1:{upstream_port} ")
    text = replace(text, "listen 80;", f"listen 127.0.0.1:{listen_port};")
    text = replace(text, "access_log /var/log/nginx/artifacts.access.log artifacts;",
                   f"access_log {access_log} artifacts;")
    text = replace(text, "include /etc/nginx/snippets/artifacts-proxy.conf;",
                   f"include {snippet};", count=None)
    # The app mounted under a path prefix by the proxy: nginx strips /dash and
    # says so in X-Forwarded-Prefix, which the app honours with TRUST_PROXY.
    dash = ("    location /dash/ {\n"
            "        proxy_pass http://artifacts/;\n"
            f"        include {snippet};\n"
            "        proxy_set_header X-Forwarded-Prefix /dash;\n"
            "    }\n")
    text = replace(text, "    location = /healthz {", dash + "    location = /healthz {")
    return text


class Nginx:
    """nginx with a main config of its own in ``prefix``, serving ``site`` (an http-block file)."""

    def __init__(self, prefix: Path, site: str, port: int) -> None:
        self.prefix = prefix
        self.port = port
        self.error_log = prefix / "error.log"
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "site.conf").write_text(site)
        temp = {name: prefix / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(
            "worker_processes 1;\n"
            f"error_log {self.error_log} info;\n"
            f"pid {prefix / 'nginx.pid'};\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            + "".join(f"    {name}_temp_path {path};\n" for name, path in temp.items())
            + f"    include {prefix / 'site.conf'};\n"
            "}\n")
        self.binary = need("nginx")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _args(self) -> list[str]:
        return [self.binary, "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.error_log)]

    def __enter__(self) -> Nginx:
        check = subprocess.run(self._args() + ["-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"nginx -t rejected the config:\n{check.stderr}"
        self.process = subprocess.Popen(self._args() + ["-g", "daemon off;"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.process.stderr.read().decode()}")  # type: ignore[union-attr]
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                return self
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"nginx did not listen on {self.port}:\n{self.errors}")

    def __exit__(self, *exc: object) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGQUIT)  # graceful shutdown
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        if process.stderr is not None:
            process.stderr.close()

    @property
    def errors(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("nginx")
    need("curl")
    path = tmp_path_factory.mktemp("nginx-jobs") / "logs"
    job = make_job(path, "huge", checkpoints=(10,))
    # Past nginx's default 1 GiB temp-file cap, so spooling would break it.
    sparse_file(job / "model-00001-of-00002.safetensors", GiB + GiB // 5)
    make_job(path, "slow", checkpoints=(10,), extra_files={
        "pytorch_model.bin": np.random.default_rng(5).bytes(SLOW_SIZE)})
    make_job(path, "small", checkpoints=(10, 20))
    return path


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, logs: Path) -> t.Iterator[GunicornServer]:
    start = gunicorn_server_factory(tmp_path_factory)
    with start(logs, workers=1, threads=4, extra_env={
            "FLASK_ARTIFACTS_TRUST_PROXY": "true",
            "FLASK_SECRET_KEY": json.dumps("nginx-test-secret")}) as server:
        yield server


def _start_proxy(tmp_path_factory: pytest.TempPathFactory, upstream: GunicornServer,
                 name: str, snippet: Path) -> t.Iterator[Nginx]:
    prefix = tmp_path_factory.mktemp(name)
    port = free_port()
    assert upstream.port is not None
    site = site_config(upstream_port=upstream.port, listen_port=port,
                       access_log=prefix / "access.log", snippet=snippet)
    with Nginx(prefix, site, port) as nginx:
        yield nginx


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, upstream: GunicornServer) -> t.Iterator[Nginx]:
    """The shipped site and the shipped snippet, unchanged but for the replacements."""
    yield from _start_proxy(tmp_path_factory, upstream, "nginx", SNIPPET)


@pytest.fixture(scope="module")
def slow_proxy(tmp_path_factory: pytest.TempPathFactory, upstream: GunicornServer
               ) -> t.Iterator[Nginx]:
    """The same, with a copy of the snippet whose read and send timeouts are 3 s."""
    snippet = tmp_path_factory.mktemp("snippet") / "artifacts-proxy.conf"
    text = SNIPPET.read_text()
    text = replace(text, "proxy_read_timeout 60s;", f"proxy_read_timeout {LOWERED_TIMEOUT}s;")
    text = replace(text, "send_timeout 300s;", f"send_timeout {LOWERED_TIMEOUT}s;")
    snippet.write_text(text)
    yield from _start_proxy(tmp_path_factory, upstream, "nginx-slow", snippet)


# -- helpers ------------------------------------------------------------------------------------


class Fetched(t.NamedTuple):
    returncode: int
    status: int | None
    headers: dict[str, str]
    size: int
    sha256: str
    body: bytes  # kept only when small
    stderr: str
    seconds: float


def curl(url: str, *options: str, keep: int = 4 * MiB, timeout: float = 120) -> Fetched:
    """Run curl, hashing the body as it streams; the headers of the last response parsed."""
    binary = need("curl")
    began = time.monotonic()
    with subprocess.Popen([binary, "-sS", "--max-time", str(int(timeout)), "-D", "/dev/stderr",
                           "-o", "-", *options, url], bufsize=0,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None and process.stderr is not None
        digest = hashlib.sha256()
        size = 0
        kept = bytearray()
        # Headers and errors go to stderr; read it alongside so neither pipe fills.
        err_chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: err_chunks.append(process.stderr.read()))  # type: ignore[union-attr]
        reader.start()
        while True:
            chunk = process.stdout.read(MiB)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
            if len(kept) < keep:
                kept += chunk[:keep - len(kept)]
        process.wait(timeout)
        reader.join(timeout)
    err = b"".join(err_chunks).decode("latin-1")
    status, headers = None, {}
    for block in re.split(r"\r\n\r\n", err):
        lines = block.strip("\r\n").split("\r\n")
        if lines and lines[0].startswith("HTTP/"):
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
    return Fetched(process.returncode, status, headers, size, digest.hexdigest(), bytes(kept),
                   err, time.monotonic() - began)


def get(url: str, headers: t.Mapping[str, str] | None = None) -> tuple[int, t.Any, bytes]:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()


MODEL = "/api/training/{}/download/model"


# -- tests ----------------------------------------------------------------------------------------


def test_archive_over_1_gib_streams_through_nginx_byte_for_byte(upstream, proxy):
    """A 1.2 GiB archive through nginx equals the direct download, with its exact size."""
    path = MODEL.format("huge")
    direct = curl(upstream.url + path)
    through = curl(proxy.url + path)

    assert direct.returncode == 0 and direct.status == 200, direct.stderr[-2000:]
    assert through.returncode == 0 and through.status == 200, (through.stderr[-2000:], proxy.errors)
    length = int(direct.headers["content-length"])
    assert length > GiB + GiB // 5
    assert direct.size == length
    assert direct.headers["x-accel-buffering"] == "no"
    # nginx acts on X-Accel-Buffering and does not pass it on; the size it announces is exact.
    assert "x-accel-buffering" not in through.headers
    assert through.headers.get("content-length") == str(length), through.headers
    assert through.size == length
    assert through.sha256 == direct.sha256
    assert through.body[:4] == b"PK\x03\x04"
    assert "temporary file" not in proxy.errors, proxy.errors
    print(f"\nFIGURES nginx: {length / GiB:.2f} GiB archive, direct {direct.seconds:.1f} s,"
          f" through nginx {through.seconds:.1f} s, sha256 equal")


def test_range_request_through_nginx(upstream, proxy):
    """Range through nginx: 206, the same bytes and Content-Range as from gunicorn directly."""
    path = MODEL.format("huge")
    for spec in ("bytes=1000-2999999", "bytes=-70000", f"bytes={GiB}-{GiB + MiB - 1}"):
        direct = curl(upstream.url + path, "-H", f"Range: {spec}")
        through = curl(proxy.url + path, "-H", f"Range: {spec}")
        assert direct.returncode == 0 and direct.status == 206, (spec, direct.stderr[-1000:])
        assert through.returncode == 0 and through.status == 206, (spec, through.headers)
        assert through.headers["content-range"] == direct.headers["content-range"], spec
        assert through.headers["content-length"] == direct.headers["content-length"], spec
        assert through.size == direct.size == int(direct.headers["content-length"]), spec
        assert through.sha256 == direct.sha256, spec
    # A resumed download (-C -) through nginx ends with the whole archive's bytes.
    whole = curl(upstream.url + MODEL.format("small"))
    partial = curl(proxy.url + MODEL.format("small"), "-r", "0-99999")
    assert partial.size == 100_000 and partial.body == whole.body[:100_000]


def test_slow_client_outlasts_lowered_proxy_timeouts(upstream, slow_proxy, tmp_path):
    """A download ~2x longer than proxy_read_timeout and send_timeout (3 s) completes intact."""
    path = MODEL.format("slow")
    direct = curl(upstream.url + path)
    slow = curl(slow_proxy.url + path, "--limit-rate", str(SLOW_RATE))

    assert slow.returncode == 0, (slow.returncode, slow.stderr[-2000:], slow_proxy.errors[-2000:])
    assert slow.status == 200
    assert slow.seconds >= 2 * LOWERED_TIMEOUT, f"the download took only {slow.seconds:.1f} s"
    assert slow.size == int(direct.headers["content-length"]) == direct.size
    assert slow.sha256 == direct.sha256
    assert "timed out" not in slow_proxy.errors, slow_proxy.errors
    # nginx's own account of the request: its duration ($request_time) and bytes.
    access_log = slow_proxy.prefix / "access.log"
    line = re.compile(r'"GET /api/training/slow/download/model HTTP/1\.1" 200 (\d+) ([\d.]+) "')
    assert wait_for(lambda: line.search(access_log.read_text()) is not None), access_log.read_text()
    sent, seconds = line.search(access_log.read_text()).groups()  # type: ignore[union-attr]
    assert int(sent) == slow.size
    print(f"\nFIGURES nginx slow client: {slow.size / MiB:.0f} MiB at {SLOW_RATE // MiB} MiB/s took"
          f" {slow.seconds:.1f} s (nginx: {seconds} s) with proxy_read_timeout/send_timeout"
          f" {LOWERED_TIMEOUT}s: intact")
    assert float(seconds) >= 2 * LOWERED_TIMEOUT, f"nginx spent only {seconds} s on it"


def test_forwarded_prefix_reaches_the_urls_the_app_builds(upstream, proxy):
    """With ARTIFACTS_TRUST_PROXY, links built behind /dash/ (X-Forwarded-Prefix) start with /dash."""
    status, _, body = get(proxy.url + "/dash/api/training/checkpoints/small")
    assert status == 200, body[:300]
    listing = json.loads(body)
    urls = [c["download_url"] for c in listing["checkpoints"]]
    assert len(urls) == 2
    assert all(u.startswith("/dash/api/training/small/download/model?") for u in urls), urls

    status, _, body = get(proxy.url + "/dash/jobs/small")
    assert status == 200
    links = [link for link in re.findall(r'href="([^"]+)"', body.decode())
             if not link.startswith("data:")]  # the page's empty icon
    assert len(links) >= 4, body[:1000]
    assert all(link.startswith("/dash/") for link in links), links

    # The links work through the proxy.
    status, headers, archive = get(proxy.url + urls[0])
    assert status == 200 and archive[:4] == b"PK\x03\x04"
    assert len(archive) == int(headers["Content-Length"])

    # Control: without the prefix header the same listing has no prefix.
    for base in (proxy.url, upstream.url):
        status, _, body = get(base + "/api/training/checkpoints/small")
        assert status == 200
        assert all(c["download_url"].startswith("/api/") for c in json.loads(body)["checkpoints"])


def test_access_logs_never_hold_a_signature(upstream, proxy):
    """A signed-link request through nginx: neither nginx's nor gunicorn's log holds the query."""
    path = MODEL.format("small") + "?signature=abcSECRETsig&expires=1"
    status, headers, body = get(proxy.url + path)
    assert status == 403, body[:300]
    assert json.loads(body)["error"] == "invalid_signature"
    # A valid-looking one as well, for the download route that would stream.
    get(proxy.url + MODEL.format("small") + "?checkpoint=checkpoint-10&expires=99999999999"
        "&signature=abcSECRETsig")

    access_log = proxy.prefix / "access.log"
    assert wait_for(lambda: access_log.exists() and access_log.read_text().count(
        "/api/training/small/download/model") >= 2), "nginx logged no request"
    logged = access_log.read_text()
    assert "abcSECRETsig" not in logged and "signature=" not in logged, logged
    assert "expires=" not in logged
    assert "abcSECRETsig" not in upstream.log and "signature=" not in upstream.log

