"""Faults and load against a real gunicorn running the shipped ``gunicorn.conf.py``.

What these tests pin down (issue 4, "Faults and load"):

* A client that stops reading is dropped after ``ARTIFACTS_STALL_TIMEOUT``
  seconds and its thread and download slot are freed.
* Downloads cut off at random points leave no open descriptors, no extra
  threads and no memory growth in the worker (measured from /proc).
* ``ARTIFACTS_MAX_DOWNLOADS`` (``threads - 2`` in the shipped config) caps
  simultaneous downloads with 429 + Retry-After, while listings still answer.
* Changing files. The semantics: **a download is a snapshot of the job at
  the time of the request.** The view records every member's (size,
  mtime_ns, inode) when the request starts and opens each file only when
  its turn comes; a member that no longer matches ends the transfer
  visibly (a body short of Content-Length, or a chunked body without its
  final chunk). A log that is still being appended to streams the prefix
  that existed when the request started. So whatever happens to the files,
  the client gets either a failed transfer or an archive whose contents
  equal a snapshot taken before the change; never a well-formed archive
  with other contents.
* Checkpoints still being written are left out of a running job's listing
  and answer 409 ``checkpoint_incomplete``.
* Unreadable files fail the request before the first byte (the server runs
  as an unprivileged user, since root reads anything).
* Member names are relative, ``/``-separated, without ``..`` or drive
  prefixes, whatever the names on disk.

Linux only: the worker is measured through /proc.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import random
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

try:
    from tests.helpers import open_files_under, wait_for
    from tests.jobtree import files_under, make_job, sparse_file
    from tests.server import REPO, GunicornServer
except ImportError:  # tests/ itself on sys.path
    from helpers import open_files_under, wait_for  # type: ignore[no-redef]
    from jobtree import files_under, make_job, sparse_file  # type: ignore[no-redef]
    from server import REPO, GunicornServer  # type: ignore[no-redef]

from flask_artifacts import create_app
from flask_artifacts.archives import plan_download
from flask_artifacts.cache import ChecksumCache
from flask_artifacts.jobs import LocalStore

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="the worker is measured through /proc (Linux)")

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(start_server: t.Callable[..., t.ContextManager[GunicornServer]]
           ) -> t.Iterator[GunicornServer]:
    """One gunicorn (1 worker, 4 threads) for tests that add a job of their own each."""
    with start_server(workers=1, threads=4) as running:
        yield running


# -- helpers --------------------------------------------------------------------------


def model_url(job_id: str, checkpoint: str | None = None) -> str:
    path = f"/api/training/{job_id}/download/model"
    return path + (f"?checkpoint={checkpoint}" if checkpoint else "")


def logs_url(job_id: str) -> str:
    return f"/api/training/{job_id}/download/logs"


def list_url(job_id: str) -> str:
    return f"/api/training/checkpoints/{job_id}"


def noise(seed: int, size: int) -> bytes:
    """Incompressible, reproducible bytes."""
    return np.random.default_rng(seed).bytes(size)


def get(server: GunicornServer, path: str, headers: t.Mapping[str, str] | None = None,
        timeout: float = 30) -> tuple[int, t.Any, bytes]:
    """``(status, headers, body)`` of one whole GET; HTTP errors are answers too."""
    request = urllib.request.Request(server.url + path, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()


def get_json(server: GunicornServer, path: str) -> tuple[int, t.Any, dict[str, t.Any]]:
    status, headers, body = get(server, path)
    assert headers["Content-Type"] == "application/json", (status, headers, body[:300])
    return status, headers, json.loads(body)



def backdate(root: Path, seconds: float = 3600) -> None:
    """Move the times of ``root`` and everything below it ``seconds`` into the past."""
    shift = int(seconds * 1e9)
    for path in [root, *root.rglob("*")]:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns - shift, st.st_mtime_ns - shift))


def plan_of(logs_dir: Path, job_id: str, kind: str = "model",
            checkpoint: str | None = None) -> t.Any:
    """The package's own plan of a download (no cache: offsets only, no CRCs)."""
    app = create_app({"ARTIFACTS_LOGS_DIR": str(logs_dir)})
    with app.app_context():
        store = LocalStore(logs_dir)
        return plan_download(store, ChecksumCache(None), store.job(job_id), kind,
                             checkpoint=checkpoint, settle_seconds=0)


def fd_targets(pid: int) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sorted(targets)


class RawDownload:
    """One GET over a plain socket; the test decides how much of the body to read.

    ``rcvbuf`` shrinks the TCP receive buffer before connecting, so a client
    that stops reading holds the server back within a few hundred KiB.
    """

    def __init__(self, server: GunicornServer, path: str, *, rcvbuf: int | None = None,
                 timeout: float = 30) -> None:
        assert server.port is not None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", server.port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          f"Connection: close\r\n\r\n".encode("ascii"))
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.received = 0
        self.head = b""  # the first body bytes, kept for checks
        self._pending = b""

    def read_headers(self) -> int:
        data = b""
        while b"\r\n\r\n" not in data:
            more = self.sock.recv(64 * KiB)
            if not more:
                raise AssertionError(f"the connection closed before the headers: {data!r}")
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self._pending = rest
        self.received = len(rest)
        self.head = rest
        return self.status

    @property
    def length(self) -> int:
        return int(self.headers["content-length"])

    def read_until(self, amount: int, piece: int = 16 * KiB) -> int:
        """Read body bytes until ``amount`` have arrived (or the body ends)."""
        while self.received < amount:
            data = self.sock.recv(min(piece, amount - self.received))
            if not data:
                break
            self.received += len(data)
            if len(self.head) < 64 * KiB:
                self.head += data
        return self.received

    def read_to_end(self) -> BaseException | None:
        """Read until EOF; a reset or timeout is returned, not raised."""
        try:
            while True:
                data = self.sock.recv(MiB)
                if not data:
                    return None
                self.received += len(data)
        except OSError as exc:
            return exc

    def close(self, reset: bool = False) -> None:
        """Close; with ``reset`` send RST (SO_LINGER 0) instead of FIN."""
        if reset:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def __enter__(self) -> RawDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Outcome(t.NamedTuple):
    status: int
    length: int | None  # Content-Length, or None for a chunked body
    body: bytes
    error: BaseException | None

    @property
    def complete(self) -> bool:
        """The transfer ended as the server announced it (all bytes, final chunk)."""
        return self.error is None and (self.length is None or len(self.body) == self.length)


def slow_connection(server: GunicornServer, timeout: float = 30) -> http.client.HTTPConnection:
    """An http.client connection with a 64 KiB receive buffer."""
    assert server.port is not None
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", server.port))
    conn.sock = sock
    return conn


def download_with_change(server: GunicornServer, path: str, after: int,
                         change: t.Callable[[], None], settle: float = 0.3) -> Outcome:
    """GET ``path`` slowly; once ``after`` body bytes have arrived run ``change``, then read on.

    http.client raises IncompleteRead for a body short of its Content-Length
    and for a chunked body without its final chunk; both come back as ``error``.
    """
    conn = slow_connection(server)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200, (response.status, response.read()[:300])
        length = response.headers.get("Content-Length")
        parts, got, error = [], 0, None
        try:
            while got < after:
                data = response.read(min(16 * KiB, after - got))
                if not data:
                    break
                parts.append(data)
                got += len(data)
            assert got == after, f"the body ended after {got} bytes, before the change"
            time.sleep(settle)  # let the server fill the socket buffers and block
            change()
            while True:
                data = response.read(MiB)
                if not data:
                    break
                parts.append(data)
        except (http.client.HTTPException, OSError) as exc:
            error = exc
        return Outcome(response.status, None if length is None else int(length),
                       b"".join(parts), error)
    finally:
        conn.close()


def archive_files(body: bytes) -> dict[str, bytes]:
    """Every file member of a well-formed archive, by name; fails on a damaged one."""
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        return {i.filename: archive.read(i) for i in archive.infolist() if not i.is_dir()}


def assert_failed_or_snapshot(outcome: Outcome, snapshot: dict[str, bytes]) -> str:
    """The rule for changing files: a visibly failed transfer, or exactly the snapshot.

    Returns which of the two happened, for the tests that expect one of them.
    """
    if not outcome.complete:
        if outcome.length is not None:
            assert len(outcome.body) < outcome.length, outcome
        return "failed"
    files = archive_files(outcome.body)
    assert set(files) == set(snapshot), (
        f"a complete archive whose members differ from the snapshot:"
        f" extra {sorted(set(files) - set(snapshot))}, missing {sorted(set(snapshot) - set(files))}")
    different = sorted(name for name in files if files[name] != snapshot[name])
    assert not different, (
        f"a complete, well-formed archive whose contents differ from the snapshot taken"
        f" when the request started: {different}")
    return "snapshot"


def snapshot_of(directory: Path, prefix: str) -> dict[str, bytes]:
    """Every file below ``directory`` by the member name it has in an archive."""
    return {f"{prefix}{rel}": data for rel, data in files_under(directory).items()}


# -- stalled clients -----------------------------------------------------------------------

STALL = 2  # ARTIFACTS_STALL_TIMEOUT for these tests, in seconds


@pytest.fixture(scope="module")
def stall_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job whose checkpoint-10 archive is over 1 GiB (a sparse optimizer.pt), and a small one."""
    logs = tmp_path_factory.mktemp("stall") / "logs"
    job = make_job(logs, "stall", checkpoints=(10,))
    (job / "checkpoint-10" / "optimizer.pt").unlink()
    sparse_file(job / "checkpoint-10" / "optimizer.pt", GiB)
    make_job(logs, "small", checkpoints=(10,))
    return logs


def stall(server: GunicornServer, path: str, read: int = 16 * KiB) -> RawDownload:
    """Start a download with a 4 KiB receive window, read ``read`` body bytes, stop reading."""
    client = RawDownload(server, path, rcvbuf=4 * KiB, timeout=30)
    assert client.read_headers() == 200, client.headers
    assert client.length > GiB
    client.read_until(read)
    assert client.received == read
    return client


ACCESS_LINE = re.compile(r'"GET (?P<path>\S+) HTTP/1\.1" (?P<status>\d+) (?P<bytes>\d+|-) (?P<us>\d+)us')


def served(log: str, path: str) -> list[tuple[int, int, float]]:
    """``(status, body bytes, seconds)`` of each request for ``path`` in gunicorn's access log.

    The shipped access log format ends with the request's duration (``%(D)s``),
    written the moment the response ends: for a dropped client, when the
    write timed out.
    """
    out = []
    for match in ACCESS_LINE.finditer(log):
        if match["path"] == path:
            sent = 0 if match["bytes"] == "-" else int(match["bytes"])
            out.append((int(match["status"]), sent, int(match["us"]) / 1e6))
    return out


def test_stalled_client_is_dropped_and_its_slot_freed(start_server, stall_logs):
    """A client that stops reading is dropped after ARTIFACTS_STALL_TIMEOUT; its slot serves again.

    GUNICORN_THREADS=3, so the shipped config allows one download at a time:
    while the stalled client holds it, another download answers 429. The
    server's write times out STALL seconds into the response (gunicorn logs
    the TimeoutError and the access line with the duration), the slot is
    given back and a new download is served. When the stalled client reads
    again it gets what was buffered, then EOF or a reset, short of
    Content-Length.
    """
    with start_server(stall_logs, workers=1, threads=3,
                      extra_env={"FLASK_ARTIFACTS_STALL_TIMEOUT": str(STALL)}) as server:
        big = model_url("stall", "checkpoint-10")
        probe = model_url("small", "checkpoint-10")
        # Fill the checksum cache (a Range past the members computes every CRC),
        # so the stalled download streams at once instead of reading 1 GiB first.
        status, _, _ = get(server, big, {"Range": "bytes=-64"})
        assert status == 206

        client = stall(server, big)
        stopped = time.monotonic()
        try:
            status, headers, body = get(server, probe)
            assert status == 429, "the one download slot (threads - 2) should be taken"
            assert json.loads(body)["error"] == "too_many_downloads"
            assert int(headers["Retry-After"]) > 0
            # Listings are not downloads: they answer while the slot is taken.
            assert get(server, list_url("stall"))[0] == 200

            served_after = None
            while time.monotonic() - stopped < STALL + 10:
                status, _, body = get(server, probe)
                if status == 200:
                    served_after = time.monotonic() - stopped
                    break
                assert status == 429, (status, body[:300])
                time.sleep(0.1)
            assert served_after is not None, f"the stalled client was never dropped\n{server.log}"
            with zipfile.ZipFile(io.BytesIO(body)) as archive:
                assert archive.testzip() is None
            assert wait_for(lambda: "TimeoutError" in server.log), server.log
            assert "Socket error processing request" in server.log

            error = client.read_to_end()
            assert error is None or isinstance(error, ConnectionResetError), repr(error)
            assert client.received < client.length
        finally:
            client.close()
        log = server.log
    assert "WORKER TIMEOUT" not in log
    [(status, sent, dropped_after)] = [r for r in served(log, "/api/training/stall/download/model")
                                       if r[0] == 200]
    assert sent < client.length

    print(f"\nFIGURES stalled client (STALL_TIMEOUT={STALL}s): its write timed out"
          f" {dropped_after:.2f} s into the response; a new download was served"
          f" {served_after:.2f} s after the client stopped reading; the client got"
          f" {client.received} of {client.length} bytes")
    assert STALL - 0.05 <= dropped_after <= STALL + 1.0, dropped_after
    # gunicorn (27.x) then lingers up to 2 s in close_graceful() on the worker's
    # main thread before it accepts anything else; see the next test.
    assert served_after <= STALL + 2 + 2.0, served_after


def test_stalled_clients_holding_every_thread_are_all_dropped(start_server, stall_logs):
    """Three stalled clients on a 3-thread worker: all dropped, and the worker keeps answering.

    ``ARTIFACTS_MAX_DOWNLOADS=3`` lets the downloads take every thread, so a
    listing sent meanwhile can only be answered once the stall timeout has
    freed a thread: the threads themselves come back, not only the slots.
    Then the worker must answer promptly again: every listing sent after the
    drop within a second.
    """
    with start_server(stall_logs, workers=1, threads=3, extra_env={
            "FLASK_ARTIFACTS_STALL_TIMEOUT": str(STALL),
            "FLASK_ARTIFACTS_MAX_DOWNLOADS": "3"}) as server:
        big = model_url("stall", "checkpoint-10")
        assert get(server, big, {"Range": "bytes=-64"})[0] == 206
        worker = server.worker_pid()
        clients = [stall(server, big) for _ in range(3)]
        stopped = time.monotonic()
        latencies: list[tuple[float, float]] = []  # (sent after the stop, seconds to answer)
        try:
            time.sleep(0.3)
            began = time.monotonic()
            status, _, _ = get(server, list_url("stall"), timeout=STALL + 20)
            waited = time.monotonic() - began
            assert status == 200
            # Keep asking for a while after the drop: the worker should answer each at once.
            while time.monotonic() - stopped < STALL + 9:
                sent = time.monotonic()
                status, _, _ = get(server, list_url("stall"), timeout=30)
                latencies.append((sent - stopped, time.monotonic() - sent))
                assert status == 200
                time.sleep(0.1)
            errors = [c.read_to_end() for c in clients]
            for client, error in zip(clients, errors):
                assert error is None or isinstance(error, ConnectionResetError), repr(error)
                assert client.received < client.length
        finally:
            for client in clients:
                client.close()
        assert wait_for(lambda: server.log.count("TimeoutError") >= 3), server.log
        status, headers, body = get(server, model_url("small", "checkpoint-10"))
        assert status == 200 and len(body) == int(headers["Content-Length"])
        assert server.worker_pid() == worker
        log = server.log
    assert "WORKER TIMEOUT" not in log
    drops = [r for r in served(log, "/api/training/stall/download/model") if r[0] == 200]
    assert len(drops) == 3, drops
    worst = max(latencies, key=lambda item: item[1])

    print(f"\nFIGURES 3 stalled clients held all 3 threads: writes timed out after"
          f" {', '.join(f'{d[2]:.2f}' for d in drops)} s; a listing sent meanwhile waited"
          f" {waited:.2f} s; slowest listing after that: {worst[1]:.2f} s (sent"
          f" {worst[0]:.2f} s after the clients stopped); 3 dropped")
    for _, sent, seconds in drops:
        assert sent < clients[0].length
        assert STALL - 0.05 <= seconds <= STALL + 1.0, drops
    assert 0.5 <= waited <= STALL + 2.0, f"the listing waited {waited:.2f} s for a thread"
    # gunicorn 27's gthread worker closes a finished connection with
    # util.close_graceful() (shutdown, then drain reads for up to 2 s) from its
    # main loop; a dropped client that neither reads nor closes holds that loop,
    # and with it every accept and keep-alive connection of the worker.
    assert worst[1] < 1.0, (
        f"the worker answered nothing for {worst[1]:.2f} s after dropping the stalled"
        f" clients: {[(round(a, 2), round(b, 2)) for a, b in latencies if b > 0.2]}")


# -- cancelled downloads -----------------------------------------------------------------------

CANCELS = 100


def test_hundred_cancelled_downloads_leak_nothing(start_server, tmp_path):
    """100 downloads cut at random offsets: same descriptors, threads and memory afterwards.

    Half the clients close with FIN, half with RST (SO_LINGER 0); two run at
    a time (the shipped cap with 4 threads). Measured against the worker
    after a warm-up that has every pool thread started and holding its
    SQLite connection to the checksum cache.
    """
    logs = tmp_path / "logs"
    job = make_job(logs, "cancel", checkpoints=(10,), extra_files={
        f"checkpoint-10/extra-{i}.bin": noise(40 + i, 12 * MiB) for i in range(3)})
    (job / "checkpoint-10" / "optimizer.pt").unlink()
    sparse_file(job / "checkpoint-10" / "optimizer.pt", 160 * MiB)
    path = model_url("cancel", "checkpoint-10")
    rng = random.Random(4)

    with start_server(logs, workers=1, threads=4) as server:
        worker = server.worker_pid()
        status, headers, body = get(server, path)
        assert status == 200
        length = int(headers["Content-Length"])
        assert length == len(body) > 190 * MiB
        del body

        busy = [0]  # 429s met on the way: a slot still held by a cut client not yet noticed
        errors: list[BaseException] = []

        def cut(offset: int, reset: bool) -> None:
            try:
                for _ in range(200):
                    with RawDownload(server, path, timeout=30) as client:
                        if offset < 0:  # close right after sending the request
                            client.close(reset=reset)
                            return
                        status = client.read_headers()
                        if status == 429:
                            busy[0] += 1
                            client.close()
                            time.sleep(0.02)
                            continue
                        assert status == 200, client.headers
                        client.read_until(offset)
                        client.close(reset=reset)
                        return
                raise AssertionError("no download slot came free for 4 s")
            except BaseException as exc:  # reported by the test, not the thread
                errors.append(exc)

        def cut_pair(offsets: list[tuple[int, bool]]) -> None:
            threads = [threading.Thread(target=cut, args=o) for o in offsets]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
            if errors:
                raise errors[0]

        def burst() -> None:
            """Four download requests at once while two downloads are held: every thread works."""
            held: list[RawDownload] = []
            try:
                while len(held) < 2:  # a cut client's slot may not be given back yet
                    client = RawDownload(server, path, rcvbuf=4 * KiB)
                    if client.read_headers() == 200:
                        held.append(client)
                    else:
                        assert client.status == 429, client.headers
                        client.close()
                        time.sleep(0.02)
                results: list[int] = []
                threads = [threading.Thread(target=lambda: results.append(get(server, path)[0]))
                           for _ in range(4)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join(30)
                assert set(results) <= {200, 429}, results
            finally:
                for client in held:
                    client.close(reset=True)

        # Warm-up: every pool thread started, each with its cache connection.
        pool = 4
        for _ in range(10):
            burst()
            cut_pair([(rng.randrange(length), False), (rng.randrange(length), True)])
            time.sleep(0.2)
            caches = sum(1 for f in fd_targets(worker) if f.endswith("checksums.sqlite3"))
            if server.threads(worker) >= pool + 1 and caches >= pool:
                break
        time.sleep(1)
        fds_before = fd_targets(worker)
        threads_before = server.threads(worker)
        rss_before = max(server.rss_kib(worker) for _ in range(3))
        assert threads_before == pool + 1, f"warm-up did not start the whole pool: {threads_before}"

        offsets = []
        for i in range(CANCELS):
            if i % 25 == 0:
                offset = -1  # close right after sending the request
            elif i % 25 == 1:
                offset = 0  # after the headers
            else:
                offset = rng.randrange(length)
            offsets.append((offset, i % 2 == 1))
        busy[0] = 0
        began = time.monotonic()
        for i in range(0, CANCELS, 2):
            cut_pair(offsets[i:i + 2])
        took = time.monotonic() - began

        def settled() -> bool:
            return len(fd_targets(worker)) <= len(fds_before) and not open_files_under(worker, logs)

        wait_for(settled, timeout=5)
        time.sleep(1)
        fds_after = fd_targets(worker)
        leaked_into_logs = open_files_under(worker, logs)
        threads_after = server.threads(worker)
        rss_after = max(server.rss_kib(worker) for _ in range(3))

        # The server still serves whole archives, from the same worker.
        status, headers, body = get(server, path)
        assert status == 200 and len(body) == length
        assert server.worker_pid() == worker
        log = server.log

    growth_mib = (rss_after - rss_before) / 1024
    print(f"\nFIGURES {CANCELS} cancelled downloads of a {length / MiB:.0f} MiB archive in"
          f" {took:.1f} s: fds {len(fds_before)} -> {len(fds_after)}, files of the job still"
          f" open {len(leaked_into_logs)}, threads {threads_before} -> {threads_after},"
          f" VmRSS {rss_before} -> {rss_after} KiB ({growth_mib:+.1f} MiB);"
          f" {busy[0]} retries after 429 while a cut client's slot was not yet given back")
    assert "WORKER TIMEOUT" not in log and "Booting worker" in log
    assert log.count("Booting worker") == 1, "the worker was restarted"
    assert not leaked_into_logs
    assert fds_after == fds_before, (
        f"descriptors changed: new {sorted(set(fds_after) - set(fds_before))},"
        f" gone {sorted(set(fds_before) - set(fds_after))}")
    assert threads_after == threads_before
    assert growth_mib < 20


# -- concurrency and the download cap -----------------------------------------------------------


class SlowReader(threading.Thread):
    """Reads a download at about ``rate`` bytes/s until told to finish or to be cut off."""

    def __init__(self, server: GunicornServer, path: str, rate: int = 2 * MiB) -> None:
        super().__init__(daemon=True)
        self.client = RawDownload(server, path, rcvbuf=64 * KiB)
        assert self.client.read_headers() == 200, self.client.headers
        self.rate = rate
        self.finish = threading.Event()
        self.cut = False
        self.error: BaseException | None = None

    def run(self) -> None:
        piece = 32 * KiB
        try:
            while not self.finish.is_set():
                if self.client.read_until(self.client.received + piece) >= self.client.length:
                    return
                time.sleep(piece / self.rate)
            if not self.cut:
                self.error = self.client.read_to_end()
        except OSError as exc:
            self.error = exc


def test_download_cap_answers_429_and_listings_stay_fast(start_server, tmp_path):
    """threads=4: two downloads stream, a third gets 429; listings answer meanwhile; slots come back."""
    logs = tmp_path / "logs"
    job = make_job(logs, "busy", checkpoints=(10, 20, 30))
    sparse_file(job / "checkpoint-30" / "big.bin", 512 * MiB)
    path = model_url("busy", "checkpoint-30")
    with start_server(logs, workers=1, threads=4) as server:
        assert get(server, path, {"Range": "bytes=-64"})[0] == 206  # CRCs cached
        readers = [SlowReader(server, path), SlowReader(server, path)]
        for reader in readers:
            reader.start()
        try:
            status, headers, body = get(server, path)
            assert status == 429, (status, body[:300])
            assert headers["Content-Type"] == "application/json"
            error = json.loads(body)
            assert error["error"] == "too_many_downloads" and error["message"]
            retry_after = int(headers["Retry-After"])
            assert retry_after > 0
            assert b"PK\x03\x04" not in body

            latencies = []
            for _ in range(20):
                began = time.perf_counter()
                status, _, listing = get_json(server, list_url("busy"))
                latencies.append(time.perf_counter() - began)
                assert status == 200
                assert [c["name"] for c in listing["checkpoints"]] == [
                    "checkpoint-10", "checkpoint-20", "checkpoint-30"]
            assert all(r.is_alive() for r in readers), "the slow downloads ended too early"
            assert get(server, path)[0] == 429, "a slot came free while both still stream"
        finally:
            readers[1].cut = True
            for reader in readers:
                reader.finish.set()
            for reader in readers:
                reader.join(60)
            readers[1].client.close(reset=True)
            readers[0].client.close()
        finished = readers[0].client
        assert readers[0].error is None and finished.received == finished.length
        assert readers[1].client.received < readers[1].client.length

        # Both slots are free again, the cut-off one included: two at once are served.
        def both_served() -> bool:
            results: list[int] = []
            held = [RawDownload(server, path) for _ in range(2)]
            try:
                results = [h.read_headers() for h in held]
            finally:
                for h in held:
                    h.close(reset=True)
            return results == [200, 200]

        assert wait_for(both_served, timeout=5, step=0.2), "the download slots were not released"
        small = model_url("busy", "checkpoint-10")
        assert wait_for(lambda: get(server, small)[0] == 200, timeout=5)
        status, headers, body = get(server, small)
        assert status == 200 and len(body) == int(headers["Content-Length"])

    median_ms = statistics.median(latencies) * 1000
    print(f"\nFIGURES cap 2 (threads 4): third download 429, Retry-After {retry_after};"
          f" listing latency with both slots streaming: median {median_ms:.1f} ms,"
          f" max {max(latencies) * 1000:.1f} ms over {len(latencies)}")
    assert median_ms < 250
    assert max(latencies) < 2


# -- changing files -------------------------------------------------------------------------------

# Shape of every weight tensor: model.safetensors is 12 MiB and optimizer.pt
# 32 MiB, so what a checkpoint archive reads late lies well past what the
# socket buffers hold when the client pauses.
BIG_SHAPE = (1024, 512)


def test_checkpoint_rotated_away_mid_download_fails_visibly(server):
    """save_total_limit deletes the checkpoint being downloaded: a short body, never an archive."""
    job = make_job(server.logs_dir, "rotate", status="running", checkpoints=(10, 20),
                   shape=BIG_SHAPE)
    backdate(job)  # both checkpoints settled
    plan = plan_of(server.logs_dir, "rotate", "checkpoint", "checkpoint-10")
    members = {m.name: m for m in plan.members}
    later = members["checkpoint-10/optimizer.pt"]
    current = members["checkpoint-10/model.safetensors"]
    snapshot = snapshot_of(job / "checkpoint-10", "checkpoint-10/")

    outcome = download_with_change(server, model_url("rotate", "checkpoint-10"),
                                   current.data_offset + 64 * KiB,
                                   lambda: shutil.rmtree(job / "checkpoint-10"))
    assert outcome.length == plan.size
    assert assert_failed_or_snapshot(outcome, snapshot) == "failed"
    # The transfer ends once the member being streamed (still readable through
    # its open descriptor, but unlinked) or the next one (gone when its turn
    # comes) no longer matches: before optimizer.pt's data.
    assert current.data_offset + 64 * KiB <= len(outcome.body) <= later.data_offset, (
        len(outcome.body), later)
    changed = re.compile(r"stopped after \d+ bytes: checkpoint-10/\S+ was (deleted|modified)")
    assert wait_for(lambda: changed.search(server.log) is not None), server.log[-3000:]
    status, _, listing = get_json(server, list_url("rotate"))
    assert status == 200 and [c["name"] for c in listing["checkpoints"]] == ["checkpoint-20"]


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_file_rewritten_in_place_before_its_turn(server, cache):
    """optimizer.pt rewritten in place (same size, mtime restored) before it is streamed.

    Only its ctime and contents change. The rule: a failed transfer or an
    archive equal to the snapshot taken when the request started. With a
    warm cache the planned CRC no longer matches and stream-zip cuts the
    transfer. With a cold cache the CRC pass happens when the member's turn
    comes, after the rewrite.
    """
    job_id = f"rewrite_{cache}"
    job = make_job(server.logs_dir, job_id, checkpoints=(10,), shape=BIG_SHAPE)
    path = model_url(job_id, "checkpoint-10")
    if cache == "warm":
        assert get(server, path, {"Range": "bytes=-64"})[0] == 206
    target = job / "checkpoint-10" / "optimizer.pt"
    snapshot = snapshot_of(job / "checkpoint-10", "checkpoint-10/")
    plan = plan_of(server.logs_dir, job_id, "checkpoint", "checkpoint-10")
    current = {m.name: m for m in plan.members}["checkpoint-10/model.safetensors"]

    def rewrite() -> None:
        st = target.stat()
        with open(target, "r+b") as f:
            f.write(noise(77, st.st_size))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        after = target.stat()
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
            st.st_size, st.st_mtime_ns, st.st_ino)
        assert target.read_bytes() != snapshot["checkpoint-10/optimizer.pt"]

    outcome = download_with_change(server, path, current.data_offset + 64 * KiB, rewrite)
    assert outcome.length == plan.size
    result = assert_failed_or_snapshot(outcome, snapshot)
    print(f"\nFIGURES rewrite before its turn, {cache} cache: {result}"
          f" ({len(outcome.body)} of {outcome.length} bytes)")


def test_file_rewritten_after_it_was_streamed_keeps_the_snapshot(server):
    """config.json rewritten once it has gone out: the archive completes, equal to the snapshot."""
    job = make_job(server.logs_dir, "rewrite_done", checkpoints=(10,), shape=BIG_SHAPE)
    target = job / "checkpoint-10" / "config.json"
    snapshot = snapshot_of(job / "checkpoint-10", "checkpoint-10/")
    plan = plan_of(server.logs_dir, "rewrite_done", "checkpoint", "checkpoint-10")
    first = plan.members[0]
    assert first.name == "checkpoint-10/config.json"

    def rewrite() -> None:
        st = target.stat()
        target.write_bytes(b"X" * st.st_size)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

    outcome = download_with_change(server, model_url("rewrite_done", "checkpoint-10"),
                                   first.end + MiB, rewrite)
    assert outcome.complete, outcome.error
    assert assert_failed_or_snapshot(outcome, snapshot) == "snapshot"


def test_log_appended_while_the_logs_archive_streams(server):
    """The log grows during the download: a complete chunked archive holding the starting prefix."""
    job = make_job(server.logs_dir, "appending", status="running", checkpoints=(10,))
    log = server.logs_dir / "job_appending.log"
    rng = np.random.default_rng(3)
    # Incompressible lines, so the deflated archive is large and streams slowly.
    with open(log, "a") as f:
        for i in range(200_000):
            f.write(f"2024-05-01 10:00:00,000 - DEBUG - trainer.loop - step {i}"
                    f" noise={rng.bytes(64).hex()}\n")
    size_at_start = log.stat().st_size
    assert size_at_start > 30 * MiB
    snapshot = {"logs/training.log": log.read_bytes(),
                "logs/progress.json": (job / "progress.json").read_bytes()}
    appended = threading.Event()

    def append() -> None:
        with open(log, "a") as f:
            for i in range(20_000):
                f.write(f"2024-05-01 11:00:00,000 - INFO - appended line {i}\n")
                if i % 1000 == 0:
                    f.flush()
        appended.set()

    outcome = download_with_change(server, logs_url("appending"), 512 * KiB, append)
    assert appended.is_set()
    assert log.stat().st_size > size_at_start
    assert outcome.length is None, "the deflated logs archive has no Content-Length"
    assert outcome.complete, f"the chunked logs archive did not end properly: {outcome.error!r}"
    assert len(outcome.body) > 8 * MiB  # most of it streamed after the append
    assert assert_failed_or_snapshot(outcome, snapshot) == "snapshot"


# -- checkpoints still being written ---------------------------------------------------------------


def test_checkpoints_still_being_written_are_left_out(server):
    """A running job: no trainer_state.json yet, or a file modified just now: not listed, 409."""
    job_dir = make_job(server.logs_dir, "writing", status="running", checkpoints=(10, 20, 30, 40))
    backdate(job_dir)
    (job_dir / "checkpoint-30" / "trainer_state.json").unlink()
    fresh = job_dir / "checkpoint-40" / "optimizer.pt"
    os.utime(fresh)  # written just now

    status, _, listing = get_json(server, list_url("writing"))
    assert status == 200 and listing["state"] == "in_progress"
    assert [c["name"] for c in listing["checkpoints"]] == ["checkpoint-10", "checkpoint-20"]

    for name, why in [("checkpoint-30", "trainer_state.json"),
                      ("checkpoint-40", "modified")]:
        for path in (model_url("writing", name), f"/api/training/writing/manifest?checkpoint={name}"):
            status, headers, body = get_json(server, path)
            assert status == 409, (path, body)
            assert body["error"] == "checkpoint_incomplete", body
            assert name in body["message"] and why in body["message"], body
    # latest is the newest settled checkpoint.
    status, headers, _ = get(server, model_url("writing", "latest"))
    assert status == 200
    assert "checkpoint-20" in headers["Content-Disposition"]

    # Once the file is older than ARTIFACTS_SETTLE_SECONDS (10), checkpoint-40 is listed.
    old = time.time() - 11
    os.utime(fresh, (old, old))
    status, _, listing = get_json(server, list_url("writing"))
    assert [c["name"] for c in listing["checkpoints"]] == [
        "checkpoint-10", "checkpoint-20", "checkpoint-40"]

    # When the job has completed, every checkpoint is offered as it is.
    os.utime(fresh)
    (job_dir / "progress.json").write_text(json.dumps({"status": "completed"}))
    status, _, listing = get_json(server, list_url("writing"))
    assert listing["state"] == "completed"
    assert [c["name"] for c in listing["checkpoints"]] == [
        "checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40"]
    for name in ("checkpoint-30", "checkpoint-40"):
        status, headers, body = get(server, model_url("writing", name))
        assert status == 200 and len(body) == int(headers["Content-Length"])
        assert archive_files(body) == snapshot_of(job_dir / name, f"{name}/")


# -- unreadable files -------------------------------------------------------------------------------


class UnprivilegedServer(GunicornServer):
    """The shipped config run without root's power to read anything, when the tests run as root.

    Preferably as ``nobody`` from the start (``setpriv``), not only its
    workers (gunicorn's ``--user``): a worker that drops privileges after
    the interpreter started as root cannot import the standard-library
    modules it loads lazily when the interpreter lives in a directory only root can read.
    Where ``nobody`` cannot run this checkout at all (a clone or venv under
    /root), the server runs as root without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH, the capabilities that let root bypass permission
    bits: a file with mode 000 is then unreadable to it like to anyone.
    """

    mode = "current user"

    def command(self) -> list[str]:
        command = super().command()
        if os.geteuid() != 0:
            return command  # already unprivileged
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.fail("setpriv (util-linux) is needed to run the server unprivileged")
        as_nobody = [setpriv, "--reuid=nobody", f"--regid={_nobody_gid()}", "--clear-groups", "--"]
        probe = subprocess.run([*as_nobody, sys.executable, "-c", "import wsgi"], cwd=REPO,
                               capture_output=True, timeout=60)
        if probe.returncode == 0:
            self.mode = "nobody"
            return [*as_nobody, *command]
        self.mode = "root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH"
        return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *command]


def _nobody_gid() -> int:
    import grp

    for name in ("nogroup", "nobody"):
        with contextlib.suppress(KeyError):
            return grp.getgrnam(name).gr_gid
    raise LookupError("no nogroup or nobody group")


def _can_bypass_permissions(pid: int) -> bool:
    """Whether ``pid`` runs as root with a capability that overrides file permissions."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    if fields["Uid"][1] != "0":
        return False
    effective = int(fields["CapEff"][0], 16)
    return bool(effective & (1 << 1 | 1 << 2))  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH


@pytest.fixture
def shared_dir() -> t.Iterator[Path]:
    """A folder any user can read: pytest's own tmp_path is private to its owner (0700)."""
    base = Path(tempfile.mkdtemp(prefix="artifacts-perm-"))
    try:
        os.chmod(base, 0o755)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unreadable_file_fails_before_the_first_byte(shared_dir):
    """A file the server cannot read: 500 file_unreadable naming it, as JSON; others still download."""
    logs = shared_dir / "logs"
    job = make_job(logs, "locked", checkpoints=(10, 20))
    for path in [logs, *logs.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    cache = shared_dir / "cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    locked = job / "checkpoint-20" / "optimizer.pt"
    os.chmod(locked, 0)

    with UnprivilegedServer(logs, cache, workers=1, threads=4,
                            log_file=shared_dir / "gunicorn.log") as server:
        worker = server.worker_pid()
        assert not _can_bypass_permissions(worker), "the worker can read anything"

        for path in (model_url("locked", "checkpoint-20"), model_url("locked"),
                     "/api/training/locked/files/checkpoint-20/optimizer.pt"):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
            finally:
                conn.close()
            assert response.status == 500, (path, response.status, body[:300])
            assert response.headers["Content-Type"] == "application/json"
            assert b"PK" not in body[:4]
            error = json.loads(body)
            assert error["error"] == "file_unreadable", error
            assert "checkpoint-20/optimizer.pt" in error["message"], error
            assert "permission" in error["message"].lower(), error

        status, headers, body = get(server, model_url("locked", "checkpoint-10"))
        assert status == 200 and len(body) == int(headers["Content-Length"])
        assert archive_files(body) == snapshot_of(job / "checkpoint-10", "checkpoint-10/")
        assert get(server, list_url("locked"))[0] == 200
        assert "stopped after" not in server.log  # nothing failed mid-stream
    print(f"\nFIGURES unreadable file: server ran as {server.mode}; 500 file_unreadable"
          " before the first byte, other downloads 200")


# -- member names -----------------------------------------------------------------------------------

ODD_NAMES = {
    "..foo": b"dotdot-prefixed",
    "foo..": b"dotdot-suffixed",
    "...": b"three dots",
    ".hidden": b"hidden",
    "name with spaces.txt": b"spaces",
    " leading and trailing ": b"edge spaces",
    "C:evil.txt": b"drive-like",
    "c:": b"bare drive",
    "模型 ünïcode.txt": "non-ASCII".encode(),
    "x" * 250 + ".bin": b"long name",
    "/".join(["d" * 200] * 12) + "/deep.bin": b"long path",
    "sub/..bar/file": b"nested odd folder",
}
BACKSLASH = "a\\b.bin"


def test_member_names_are_safe_whatever_is_on_disk(server):
    """Odd names on disk: each member name is relative, '/'-separated, without '..' or drive."""
    files = {f"checkpoint-10/{name}": data for name, data in ODD_NAMES.items()}
    files[f"checkpoint-10/{BACKSLASH}"] = b"backslash"
    files.update({name: data for name, data in ODD_NAMES.items() if "/" not in name})
    job = make_job(server.logs_dir, "odd", checkpoints=(10,), extra_files=files)
    assert (job / "checkpoint-10" / BACKSLASH).is_file()
    log_mark = len(server.log)

    names = {}
    for path, top in ((model_url("odd", "checkpoint-10"), "checkpoint-10/"),
                      (model_url("odd"), "job_odd/")):
        status, headers, body = get(server, path)
        assert status == 200 and len(body) == int(headers["Content-Length"])
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            assert archive.testzip() is None
            names[top] = [info.filename for info in archive.infolist()]
        status, _, manifest = get_json(server, path.replace("/download/model", "/manifest"))
        assert status == 200
        assert [m["name"] for m in manifest["members"]] == names[top]
        for name in names[top]:
            assert name.startswith(top), name
            assert not name.startswith("/") and "\\" not in name, name
            assert not re.match(r"^[A-Za-z]:", name), name
            parts = name.rstrip("/").split("/")
            assert ".." not in parts and "." not in parts and "" not in parts, name
        if top == "checkpoint-10/":
            expected = {k: v for k, v in files.items() if k.startswith(top)}
        else:
            expected = {f"{top}{k}": v for k, v in files.items()}
        got = archive_files(body)
        for name, data in expected.items():
            if BACKSLASH in name:
                assert name not in got
            else:
                assert got.get(name) == data, name
    assert not any("\\" in n for n in names["job_odd/"])
    assert wait_for(lambda: "backslash" in server.log[log_mark:]), server.log[log_mark:][-2000:]
    assert "Leaving out" in server.log[log_mark:]
