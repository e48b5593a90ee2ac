"""Several gunicorn hosts behind a real nginx, built from ``deploy/nginx.conf``.

Two hosts, each with its own checksum cache, serve the same job from the
same storage (a shared local folder, and S3 through a real moto server);
nginx balances them round-robin with the shipped upstream block. A
download cut half-way on one host and resumed through nginx on the other
must be byte-identical to an uninterrupted one, and every host must give
the same ETag and size.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import typing as t
import zipfile
from pathlib import Path

import numpy as np
import pytest

try:
    from tests.jobtree import make_job
    from tests.motoserver import AWS_ENV, MotoServer, need_s3, upload_tree
    from tests.server import REPO, GunicornServer, free_port
except ImportError:  # tests/ itself on sys.path
    from jobtree import make_job  # type: ignore[no-redef]
    from motoserver import AWS_ENV, MotoServer, need_s3, upload_tree  # type: ignore[no-redef]
    from server import REPO, GunicornServer, free_port  # type: ignore[no-redef]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the servers are run and watched as on Linux")

MiB = 1 << 20
JOB = "multi"
MODEL = f"/api/training/{JOB}/download/model"
BUCKET = "shared"


def _missing(reason: str) -> t.NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is not skipped)")
    pytest.skip(reason)


def nginx_executable() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if found is None:
        _missing("nginx is not installed")
    return found


def site_config(upstreams: t.Sequence[int], listen: int, base: Path) -> str:
    """``deploy/nginx.conf`` with its upstream block listing ``upstreams``, on ``listen``.

    Everything else (log format, locations, the proxy snippet) is the
    shipped file's; only addresses and file locations change.
    """
    text = (REPO / "deploy" / "nginx.conf").read_text()
    block = re.search(r"upstream artifacts \{\n(.*?)\n\}", text, re.S)
    assert block, "deploy/nginx.conf has no 'upstream artifacts' block"
    first = re.search(r"^\s*server \S+((?: [a-z_]+=\S+)*);", block.group(1), re.M)
    assert first, "the upstream block lists no server"
    body = [line for line in block.group(1).splitlines()
            if not re.match(r"\s*#?\s*server ", line)]
    servers = [f"    server 127.0.0.1:{port}{first.group(1)};" for port in upstreams]
    text = text.replace(block.group(0), "upstream artifacts {\n" + "\n".join(servers + body) + "\n}")
    text = re.sub(r"upstream training_server \{.*?\}",
                  f"upstream training_server {{ server 127.0.0.1:{free_port()}; }}", text, flags=re.S)
    assert "listen 80;" in text
    text = text.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    text = text.replace("/etc/nginx/snippets/artifacts-proxy.conf",
                        str(REPO / "deploy" / "artifacts-proxy.conf"))
    text = re.sub(r"access_log \S+ artifacts;", f"access_log {base / 'access.log'} artifacts;", text)
    return text


class Nginx:
    """nginx in the foreground with its own prefix, config and logs under ``base``."""

    def __init__(self, base: Path, upstreams: t.Sequence[int]) -> None:
        self.base = base
        self.port = free_port()
        for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (base / "tmp" / name).mkdir(parents=True, exist_ok=True)
        (base / "artifacts.conf").write_text(site_config(upstreams, self.port, base))
        user = "user root;\n" if os.geteuid() == 0 else ""
        temp = "".join(f"    {name}_temp_path {base / 'tmp' / folder};\n" for name, folder in
                       (("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"),
                        ("uwsgi", "uwsgi"), ("scgi", "scgi")))
        (base / "nginx.conf").write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {base / 'nginx.pid'};\n"
            f"error_log {base / 'error.log'} info;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n{temp}    include {base / 'artifacts.conf'};\n}}\n")
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nginx:
        command = [nginx_executable(), "-p", str(self.base), "-c", str(self.base / "nginx.conf"),
                   "-e", str(self.base / "error.log")]
        check = subprocess.run(command + ["-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                status, _, _ = fetch(self.port, "/healthz")
                if status in (200, 503):
                    return self
            time.sleep(0.05)
        raise RuntimeError("nginx did not answer:\n" + (self.base / "error.log").read_text())

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def fetch(port: int, path: str, headers: t.Mapping[str, str] | None = None,
            method: str = "GET", limit: int | None = None
            ) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request; with ``limit``, read that many body bytes and drop the connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, headers=dict(headers or {}))
        response = conn.getresponse()
        if method == "HEAD":
            return response.status, response.headers, b""
        body = response.read(limit) if limit is not None else response.read()
        return response.status, response.headers, body
    finally:
        conn.close()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    logs = tmp_path_factory.mktemp("multihost") / "logs"
    make_job(logs, JOB, checkpoints=(10, 20), extra_files={
        "weights/big.bin": np.random.default_rng(5).bytes(8 * MiB)})
    return logs


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory, job: Path) -> t.Iterator[MotoServer]:
    need_s3()
    with MotoServer(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        upload_tree(server.endpoint, BUCKET, "jobs", job)
        yield server


@contextlib.contextmanager
def two_hosts(tmp: Path, storage: str, job: Path, moto: MotoServer | None
              ) -> t.Iterator[tuple[GunicornServer, GunicornServer, Nginx]]:
    env = {"FLASK_ARTIFACTS_TRUST_PROXY": "true", "FLASK_SECRET_KEY": json.dumps("shared secret")}
    if storage == "s3":
        assert moto is not None
        env.update({**AWS_ENV, "AWS_ENDPOINT_URL": moto.endpoint, "LOGS_DIR": f"s3://{BUCKET}/jobs"})
    with contextlib.ExitStack() as stack:
        hosts = [stack.enter_context(GunicornServer(
            job, tmp / f"cache-{name}", extra_env=env, log_file=tmp / f"{name}.log"))
            for name in ("a", "b")]
        proxy = stack.enter_context(Nginx(tmp / "nginx", [h.port for h in hosts]))  # type: ignore[misc]
        yield hosts[0], hosts[1], proxy


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_download_cut_on_one_host_resumes_identically_on_the_other(storage, job, tmp_path, request):
    moto = request.getfixturevalue("moto") if storage == "s3" else None
    with two_hosts(tmp_path, storage, job, moto) as (a, b, proxy):
        assert a.port is not None and b.port is not None
        # Every host, and nginx, tell the same size and ETag.
        heads = [request_head(port) for port in (a.port, b.port, proxy.port)]
        assert len(set(heads)) == 1, heads
        etag, length = heads[0]

        # Cut half-way on host a (the client drops the connection).
        status, headers, first = fetch(a.port, MODEL, limit=length // 2)
        assert status == 200 and headers["ETag"] == etag and len(first) == length // 2

        # Resumed through nginx: round-robin sends one resume to each host.
        marks = (len(a.log), len(b.log))
        since = moto.mark() if moto is not None else 0
        resume = {"Range": f"bytes={len(first)}-", "If-Range": etag}
        tails = []
        for _ in range(2):
            status, headers, tail = fetch(proxy.port, MODEL, resume)
            assert status == 206, tail[:300]
            assert headers["Content-Range"] == f"bytes {len(first)}-{length - 1}/{length}"
            assert headers["ETag"] == etag
            tails.append(tail)
        assert tails[0] == tails[1]
        # gunicorn logs a request once it has sent the last byte: wait for the lines.
        deadline = time.monotonic() + 10
        while not (" 206 " in a.log[marks[0]:] and " 206 " in b.log[marks[1]:]):
            assert time.monotonic() < deadline, "not one resume per host"
            time.sleep(0.05)
        if moto is not None:
            # With stored checksums, a resume reads only the objects it covers.
            read = {r.path for r in moto.object_gets(since, BUCKET, f"jobs/job_{JOB}/")}
            assert read <= {f"/{BUCKET}/jobs/job_{JOB}/weights/big.bin",
                            f"/{BUCKET}/jobs/job_{JOB}/progress.json"}, read

        body = first + tails[0]
        status, _, whole = fetch(proxy.port, MODEL)
        assert status == 200 and body == whole
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            assert archive.testzip() is None
            for info in archive.infolist():
                if not info.is_dir():
                    assert archive.read(info) == (job / info.filename).read_bytes()

        # Health through the balancer.
        assert fetch(proxy.port, "/healthz")[0] == 200


def request_head(port: int) -> tuple[str, int]:
    status, headers, _ = fetch(port, MODEL, method="HEAD")
    assert status == 200
    return headers["ETag"], int(headers["Content-Length"])
