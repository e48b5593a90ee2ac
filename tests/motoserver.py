"""A real S3 API server for tests: moto's server mode on a free loopback port.

:class:`MotoServer` runs ``moto_server -H 127.0.0.1 -p PORT`` as a
subprocess (from ``.venv-moto``, where ``.ci/run`` installs it apart from the
app's packages, or ``$MOTO_SERVER``, or ``PATH``), and reads the requests it
received from its log (werkzeug's access lines), so tests can count the GETs
a download made. :class:`FaultProxy` sits between the app and moto to slow
responses down or answer 503 SlowDown, as a throttled endpoint would.
Linux only, like ``tests/server.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import typing as t
import urllib.parse
from pathlib import Path

import pytest

try:
    from tests.server import REPO, free_port
except ImportError:  # tests/ itself on sys.path
    from server import REPO, free_port  # type: ignore[no-redef]

__all__ = ["MotoServer", "FaultProxy", "moto_executable", "need_s3", "s3_client", "upload_tree",
           "AWS_ENV"]

#: What s3fs and botocore read, for moto (which accepts any credentials).
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ACCESS = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3})')


def _missing(reason: str) -> t.NoReturn:
    """Skip locally; in CI (``CI`` set) a missing service is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is not skipped)")
    pytest.skip(reason)


def moto_executable() -> str:
    """``moto_server``: ``$MOTO_SERVER``, ``.venv-moto/bin/moto_server`` or one on PATH."""
    for candidate in (os.environ.get("MOTO_SERVER"), str(REPO / ".venv-moto" / "bin" / "moto_server"),
                      shutil.which("moto_server")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    _missing("moto_server is not installed: python3 -m venv .venv-moto &&"
             " .venv-moto/bin/pip install 'moto[server]' (or set MOTO_SERVER)")


def need_s3() -> None:
    """s3fs (and so botocore) must be importable in the app's environment."""
    try:
        import botocore  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as exc:
        _missing(f"s3fs is not installed ({exc}): pip install -e '.[test]'")


class Request(t.NamedTuple):
    method: str
    #: Path without the query string, URL-decoded (``/bucket/key``).
    path: str
    query: str
    status: int


class MotoServer:
    """``moto_server`` on 127.0.0.1; state lives in its memory until it stops."""

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.log_path = log_path
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {**AWS_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        executable = moto_executable()
        if self.port is None:
            self.port = free_port()
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [executable, "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited ({self.process.returncode}):\n{self.log}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            time.sleep(0.05)
        raise RuntimeError(f"moto_server did not listen on {self.port}:\n{self.log}")

    def kill(self) -> None:
        """SIGKILL: the endpoint vanishes mid-whatever, as a crashed server would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def mark(self) -> int:
        """A point in the log; :meth:`requests` since it."""
        return len(self.log)

    def requests(self, since: int = 0) -> list[Request]:
        out = []
        for line in _ANSI.sub("", self.log[since:]).splitlines():
            match = _ACCESS.search(line)
            if match:
                target = urllib.parse.urlsplit(match.group(2))
                out.append(Request(match.group(1), urllib.parse.unquote(target.path),
                                   target.query, int(match.group(3))))
        return out

    def object_gets(self, since: int, bucket: str, prefix: str = "") -> list[Request]:
        """GETs of objects (not listings) under ``bucket/prefix`` since ``since``."""
        lead = f"/{bucket}/{prefix}"
        return [r for r in self.requests(since)
                if r.method == "GET" and r.path.startswith(lead) and "list-type" not in r.query]


def s3_client(endpoint: str, *, checksums: bool = True) -> t.Any:
    """A botocore S3 client; ``checksums=False`` sends no checksum unless required.

    botocore 1.36+ adds a CRC32 to every upload by default, so an upload
    without one has to ask for that.
    """
    import botocore.config
    import botocore.session

    options: dict[str, t.Any] = {}
    if not checksums:
        options["request_checksum_calculation"] = "when_required"
    try:
        config = botocore.config.Config(**options)
    except TypeError:  # older botocore: it never sent checksums on its own
        config = botocore.config.Config()
    session = botocore.session.get_session()
    return session.create_client("s3", endpoint_url=endpoint, config=config,
                                 aws_access_key_id="testing", aws_secret_access_key="testing",
                                 region_name="us-east-1")


def upload_tree(endpoint: str, bucket: str, prefix: str, root: Path, *,
                checksums: bool = True, only: t.Callable[[str], bool] | None = None) -> list[str]:
    """Put every file below ``root`` at ``bucket/prefix/<relative path>``; return the keys.

    ``checksums`` stores each object's CRC-32 (``ChecksumAlgorithm="CRC32"``).
    """
    client = s3_client(endpoint, checksums=checksums)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                             client.exceptions.BucketAlreadyExists):
        client.create_bucket(Bucket=bucket)
    keys = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if only is not None and not only(rel):
            continue
        key = f"{prefix}/{rel}" if prefix else rel
        extra = {"ChecksumAlgorithm": "CRC32"} if checksums else {}
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), **extra)
        keys.append(key)
    return keys


class FaultProxy:
    """A TCP relay in front of moto that can delay, throttle, refuse with SlowDown, or cut.

    ``latency`` (seconds) holds back each answer's first bytes after a
    request, as a distant endpoint would; ``rate`` limits the bytes per
    second moto's answers reach the app, per connection; ``slowdown = True``
    drops every open connection and answers each new request with
    ``503 SlowDown``, as S3 does when throttling.
    """

    SLOWDOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
                b"<Message>Please reduce your request rate.</Message></Error>")

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.rate: float | None = None
        self.latency = 0.0
        self._slowdown = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def slowdown(self) -> bool:
        return self._slowdown

    @slowdown.setter
    def slowdown(self, on: bool) -> None:
        self._slowdown = on
        if on:
            self.cut()

    def cut(self) -> None:
        """Close every relayed connection now."""
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self._slowdown:
            self._refuse(client)
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            client.close()  # the endpoint is down: the app sees the connection drop
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets.update((client, upstream))
        asked: list[float] = []  # when requests went out that have had no answer yet
        threading.Thread(target=self._pipe, args=(client, upstream, False, asked),
                         daemon=True).start()
        self._pipe(upstream, client, True, asked)

    def _refuse(self, client: socket.socket) -> None:
        with contextlib.closing(client):
            client.settimeout(5)
            data = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in data:
                    piece = client.recv(65536)
                    if not piece:
                        return
                    data += piece
                self.refused += 1
                client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                               b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                               % (len(self.SLOWDOWN), self.SLOWDOWN))

    def _pipe(self, source: socket.socket, sink: socket.socket, answers: bool,
              asked: list[float]) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if not answers:
                    asked.append(time.monotonic())
                else:
                    if asked and self.latency:
                        time.sleep(max(0.0, asked[-1] + self.latency - time.monotonic()))
                    asked.clear()
                    if self.rate:
                        time.sleep(len(data) / self.rate)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(sink)
            source.close()
