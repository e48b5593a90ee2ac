"""Downloads through a real gunicorn, started with the shipped ``gunicorn.conf.py``.

What only a real server shows: the worker's memory while it streams
gigabytes, a download outlasting gunicorn's worker timeout, a failure in the
middle of a stream reaching the client as a cut transfer, and resuming with
curl and wget. Linux only (the server is measured through /proc).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import typing as t
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

try:
    from tests.helpers import open_files_under, wait_for
    from tests.jobtree import make_job, sparse_file
    from tests.server import GunicornServer
except ImportError:  # tests/ itself on sys.path (pytest's rootdir-less import)
    from helpers import open_files_under, wait_for  # type: ignore[no-redef]
    from jobtree import make_job, sparse_file  # type: ignore[no-redef]
    from server import GunicornServer  # type: ignore[no-redef]

from flask_artifacts import create_app

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the server is measured through /proc (Linux)")

MiB = 1 << 20
GiB = 1 << 30


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(start_server: t.Callable[..., t.ContextManager[GunicornServer]]
           ) -> t.Iterator[GunicornServer]:
    """One gunicorn for the tests that only need it to serve; each adds its own job."""
    with start_server() as running:
        yield running


# -- helpers --------------------------------------------------------------------


def model_url(job_id: str, checkpoint: str | None = None) -> str:
    path = f"/api/training/{job_id}/download/model"
    return path + (f"?checkpoint={checkpoint}" if checkpoint else "")


def noise(seed: int, size: int) -> bytes:
    """Incompressible, reproducible bytes."""
    return np.random.default_rng(seed).bytes(size)


def connect(server: GunicornServer, *, recv_buffer: int | None = None,
            timeout: float = 60) -> http.client.HTTPConnection:
    """A connection to ``server``; ``recv_buffer`` shrinks the TCP window before connecting,

    so a client that stops reading holds the server back after a few
    hundred KiB instead of the several MiB loopback autotuning allows.
    """
    assert server.port is not None
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    if recv_buffer is not None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", server.port))
        conn.sock = sock
    return conn


def read_some(response: http.client.HTTPResponse, amount: int, chunk: int = 256 * 1024
              ) -> tuple[bytes, BaseException | None]:
    """Up to ``amount`` body bytes, stopping early (with the error) if the body ends."""
    parts, got = [], 0
    try:
        while got < amount:
            data = response.read(min(chunk, amount - got))
            if not data:
                break
            parts.append(data)
            got += len(data)
    except (http.client.HTTPException, OSError) as exc:
        return b"".join(parts), exc
    return b"".join(parts), None


def read_rest(response: http.client.HTTPResponse, chunk: int = MiB
              ) -> tuple[bytes, BaseException | None]:
    return read_some(response, 1 << 62, chunk)


def fetch(server: GunicornServer, path: str, headers: t.Mapping[str, str] | None = None
          ) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = connect(server)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        response = conn.getresponse()
        body, error = read_rest(response)
        assert error is None, f"GET {path} failed after {len(body)} bytes: {error!r}"
        return response.status, response.headers, body
    finally:
        conn.close()


def assert_serves(server: GunicornServer) -> None:
    """The server still answers, and still streams a whole archive."""
    status, _, _ = fetch(server, "/api/training/checkpoints/__still_up__")
    assert status == 404
    job = "still_up"
    if not (server.logs_dir / f"job_{job}").exists():
        make_job(server.logs_dir, job, checkpoints=(10,))
    status, headers, body = fetch(server, model_url(job))
    assert status == 200
    assert len(body) == int(headers["Content-Length"])
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None


class Layout(t.NamedTuple):
    """Where a member lies in an archive."""

    header_offset: int
    data_offset: int
    size: int
    crc: int


def layout(data: bytes) -> tuple[dict[str, Layout], int]:
    """Each member's place in the archive ``data``, and where its central directory starts."""
    found = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            header = data[info.header_offset:info.header_offset + 30]
            assert header[:4] == b"PK\x03\x04", info.filename
            name_len = int.from_bytes(header[26:28], "little")
            extra_len = int.from_bytes(header[28:30], "little")
            found[info.filename] = Layout(info.header_offset,
                                          info.header_offset + 30 + name_len + extra_len,
                                          info.file_size, info.CRC)
        start_dir = archive.start_dir  # type: ignore[attr-defined]
    return found, start_dir


def in_process_download(logs_dir: Path, cache_dir: Path, path: str) -> bytes:
    """The same archive from Flask's test client, for comparing bytes."""
    app = create_app({"ARTIFACTS_LOGS_DIR": str(logs_dir), "ARTIFACTS_CACHE_DIR": str(cache_dir)})
    response = app.test_client().get(path)
    assert response.status_code == 200
    return response.get_data()


def crc_of_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 * MiB):
            crc = zlib.crc32(chunk, crc)
    return crc


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            with contextlib.suppress(OSError, LookupError):
                self.samples.append(GunicornServer.rss_kib(self.pid))
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(5)
        assert self.samples, "no VmRSS sample was taken"
        return max(self.samples)


def run(cmd: list[str], *, timeout: float = 60, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


# -- worker memory ------------------------------------------------------------------


def test_worker_memory_stays_flat_while_streaming_gigabytes(start_server, tmp_path):
    """A 4.5 GiB archive streams through a worker whose VmRSS grows by < 50 MiB."""
    logs = tmp_path / "logs"
    job = make_job(logs, "huge", checkpoints=(10,))
    sparse_file(job / "model-00001-of-00002.safetensors", 3 * GiB)
    sparse_file(job / "model-00002-of-00002.safetensors", 3 * GiB // 2)

    with start_server(logs, workers=1, threads=4) as server:
        worker = server.worker_pid()
        # Warm up: the first archive imports and builds everything a download needs.
        status, headers, body = fetch(server, model_url("huge", "checkpoint-10"))
        assert status == 200 and len(body) == int(headers["Content-Length"])
        fetch(server, "/api/training/checkpoints/huge")
        idle = max(server.rss_kib(worker) for _ in range(5))

        sampler = RssSampler(worker)
        sampler.start()
        conn = connect(server, timeout=120)
        tail_size = 256 * 1024
        tail = b""
        try:
            conn.request("GET", model_url("huge"))
            response = conn.getresponse()
            assert response.status == 200
            length = int(response.headers["Content-Length"])
            assert length > 4 * GiB + GiB // 2
            buffer = memoryview(bytearray(MiB))
            received = 0
            while True:
                n = response.readinto(buffer)
                if not n:
                    break
                received += n
                if received > length - tail_size - MiB:
                    tail = (tail + bytes(buffer[:n]))[-tail_size:]
        finally:
            conn.close()
            peak = sampler.stop()

        assert len(sampler.samples) > 20, "the download ended before VmRSS could be watched"
        growth_mib = (peak - idle) / 1024
        assert growth_mib < 50, (
            f"worker VmRSS went from {idle} KiB idle to {peak} KiB while streaming"
            f" ({growth_mib:.1f} MiB more)")
        assert received == length

        # The end of what streamed is the same central directory a Range request gets.
        status, headers, ranged = fetch(server, model_url("huge"),
                                        {"Range": f"bytes=-{tail_size}"})
        assert status == 206
        assert headers["Content-Range"] == f"bytes {length - tail_size}-{length - 1}/{length}"
        assert ranged == tail

    # Read the central directory with zipfile: a sparse copy of the archive
    # holding only its tail is all zipfile needs for the listing.
    shell = tmp_path / "tail-only.zip"
    with open(shell, "wb") as f:
        f.truncate(length)
        f.seek(length - tail_size)
        f.write(tail)
    with zipfile.ZipFile(shell) as archive:
        infos = {i.filename: i for i in archive.infolist()}
    expected = {f"job_huge/{p.relative_to(job).as_posix()}": p
                for p in job.rglob("*") if p.is_file() and p.name != "progress.json"}
    assert set(infos) == set(expected)
    for name, path in expected.items():
        assert infos[name].file_size == path.stat().st_size, name
        assert infos[name].compress_type == zipfile.ZIP_STORED, name
        assert infos[name].CRC == crc_of_file(path), name
    big = infos["job_huge/model-00001-of-00002.safetensors"]
    assert big.file_size == 3 * GiB and big.header_offset < length


# -- gunicorn's worker timeout ------------------------------------------------------------

SLOW_TIMEOUT = 2  # gunicorn's worker timeout, in seconds
SLOW_RATE = 5 * MiB  # curl's --limit-rate, bytes per second
SLOW_SIZE = 48 * MiB  # the archive takes SLOW_SIZE / SLOW_RATE, about 9.6 s


@pytest.fixture(scope="module")
def slow_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    logs = tmp_path_factory.mktemp("slow") / "logs"
    make_job(logs, "slow", checkpoints=(10,),
             extra_files={"pytorch_model.bin": noise(7, SLOW_SIZE)})
    return logs


def test_download_outlasts_worker_timeout(start_server, slow_job, tmp_path):
    """With the shipped gthread worker, a download 3x longer than gunicorn's timeout completes."""
    curl = need("curl")
    out = tmp_path / "slow.zip"
    with start_server(slow_job, timeout=SLOW_TIMEOUT) as server:
        began = time.monotonic()
        done = run([curl, "--silent", "--show-error", "--fail", "--max-time", "60",
                    "--limit-rate", str(SLOW_RATE), "-o", str(out),
                    server.url + model_url("slow")], timeout=90)
        took = time.monotonic() - began
        status, _, unthrottled = fetch(server, model_url("slow"))
        log = server.log

    assert done.returncode == 0, f"curl exit {done.returncode}: {done.stderr}\n{log}"
    assert took >= 3 * SLOW_TIMEOUT, f"the download took only {took:.1f} s"
    assert "WORKER TIMEOUT" not in log
    body = out.read_bytes()
    assert status == 200 and body == unthrottled
    assert body == in_process_download(slow_job, tmp_path / "cache", model_url("slow"))
    with zipfile.ZipFile(out) as archive:
        assert archive.testzip() is None
        assert archive.read("job_slow/pytorch_model.bin") == noise(7, SLOW_SIZE)


def test_control_sync_worker_is_cut_by_timeout(start_server, slow_job, tmp_path):
    """Control for the test above: the same download under ``--worker-class sync`` is cut.

    It shows the timeout test can fail: gunicorn's sync worker stops
    telling the arbiter it is alive while it streams, so the arbiter kills
    it mid-download. (threads=1: with more, gunicorn swaps sync for gthread.)
    """
    curl = need("curl")
    out = tmp_path / "cut.zip"
    with start_server(slow_job, timeout=SLOW_TIMEOUT, threads=1,
                      extra_args=["--worker-class", "sync"]) as server:
        assert "Using worker: sync" in server.log
        began = time.monotonic()
        done = run([curl, "--silent", "--show-error", "--fail", "--max-time", "30",
                    "--limit-rate", str(SLOW_RATE), "-o", str(out),
                    server.url + model_url("slow")], timeout=60)
        took = time.monotonic() - began
        assert wait_for(lambda: "WORKER TIMEOUT" in server.log), server.log

    assert done.returncode != 0, "the sync worker finished a download longer than its timeout"
    assert took < SLOW_SIZE / SLOW_RATE
    assert out.stat().st_size < SLOW_SIZE


# -- failures in the middle of a stream --------------------------------------------------------

PART_SIZE = 16 * MiB
PARTS = 4


def make_parted_job(logs: Path, job_id: str) -> Path:
    """A finished job whose last members are ``PARTS`` files of ``PART_SIZE`` random bytes."""
    return make_job(logs, job_id, checkpoints=(), extra_files={
        f"weights/part-{i}.bin": noise(100 + i, PART_SIZE) for i in range(1, PARTS + 1)})


def start_slow_download(server: GunicornServer, job_id: str
                        ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, int]:
    """Open a download with a tiny TCP window and read only its headers."""
    conn = connect(server, recv_buffer=64 * 1024)
    conn.request("GET", model_url(job_id))
    response = conn.getresponse()
    assert response.status == 200
    return conn, response, int(response.headers["Content-Length"])


def overwrite_in_place(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` keeping the file's size, inode and mtime."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


@pytest.mark.parametrize("change", ["overwrite", "truncate", "delete"])
def test_change_mid_stream_cuts_the_transfer(server, change, tmp_path):
    """A member changed while its archive streams ends the body short of Content-Length.

    * overwrite: bytes near the end of the member being streamed are rewritten
      in place, size and mtime kept, after its CRC pass (its local header,
      which carries the CRC, has reached the client); stream-zip's CRC check
      must catch it.
    * truncate / delete: the last member, not reached yet, shrinks or goes.

    The server's checksum cache has never seen the job, so each CRC is
    computed just before its member's header, after the plan.
    """
    job_id = f"mid_{change}"
    job = make_parted_job(server.logs_dir, job_id)
    expected = in_process_download(server.logs_dir, tmp_path / "cache", model_url(job_id))
    members, central_offset = layout(expected)
    last = members[f"job_{job_id}/weights/part-{PARTS}.bin"]
    assert max(m.header_offset for m in members.values()) == last.header_offset
    target = job / "weights" / f"part-{PARTS}.bin"
    original = target.read_bytes()

    log_mark = len(server.log)
    conn, response, length = start_slow_download(server, job_id)
    try:
        assert length == len(expected)
        if change == "overwrite":
            # Past the target's local header and its first MiB: its CRC is fixed.
            head, error = read_some(response, last.data_offset + MiB)
            assert error is None and len(head) == last.data_offset + MiB
            header = head[last.header_offset:last.data_offset]
            assert header[:4] == b"PK\x03\x04"
            assert int.from_bytes(header[14:18], "little") == zlib.crc32(original) == last.crc
            time.sleep(0.3)  # let the server fill the socket and block
            overwrite_in_place(target, PART_SIZE - 2 * MiB, noise(999, 2 * MiB))
        else:
            head, error = read_some(response, MiB)
            assert error is None and len(head) == MiB
            assert len(head) < last.header_offset
            if change == "truncate":
                os.truncate(target, PART_SIZE // 2)
            else:
                target.unlink()
        time.sleep(0.05)
        rest, error = read_rest(response)
    finally:
        conn.close()

    body = head + rest
    assert len(body) < length, f"the whole {length} bytes arrived despite the {change}"
    if change == "overwrite":
        # Everything before the changed bytes went out as planned; the directory did not.
        changed_at = last.data_offset + PART_SIZE - 2 * MiB
        assert len(body) >= changed_at
        assert len(body) <= central_offset
        assert body[:changed_at] == expected[:changed_at]
    else:
        assert len(body) <= last.header_offset
        assert body == expected[:len(body)]
    # The package logs the failed transfer.
    assert wait_for(lambda: "stopped after" in server.log[log_mark:]), server.log[log_mark:]
    assert wait_for(lambda: not any(open_files_under(pid, job) for pid in server.worker_pids())), (
        "files of the job still open after the failed download: "
        f"{ {pid: open_files_under(pid, job) for pid in server.worker_pids()} }")
    assert_serves(server)


def test_rewrite_before_its_turn_is_never_a_wrong_archive(server):
    """A member rewritten in place (size and mtime kept) before its turn: the transfer fails.

    A download is a snapshot of the job when the request starts; the rewrite
    moves the file's ctime, so the member no longer matches when its turn
    comes and the body ends short of its Content-Length.
    """
    job_id = "mid_early_rewrite"
    job = make_parted_job(server.logs_dir, job_id)
    target = job / "weights" / f"part-{PARTS}.bin"
    replacement = noise(555, PART_SIZE)

    conn, response, length = start_slow_download(server, job_id)
    try:
        head, error = read_some(response, MiB)
        assert error is None
        overwrite_in_place(target, 0, replacement)
        rest, error = read_rest(response)
    finally:
        conn.close()

    body = head + rest
    assert len(body) < length
    assert replacement[:4096] not in body
    assert_serves(server)


# -- resuming with curl and wget -----------------------------------------------------------


@pytest.fixture(scope="module")
def resume_job(server: GunicornServer, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[str, bytes]:
    """A job no one has downloaded through ``server`` yet, and its archive's bytes.

    The bytes come from Flask's test client with a cache of its own, so the
    server's checksum cache is still cold for the first resumed download.
    """
    job_id = "resume"
    make_job(server.logs_dir, job_id, checkpoints=(10, 20), extra_files={
        "pytorch_model.bin": noise(11, 6 * MiB),
        "checkpoint-20/extra_state.pt": noise(12, 3 * MiB),
    })
    cache = tmp_path_factory.mktemp("resume-cache")
    return job_id, in_process_download(server.logs_dir, cache, model_url(job_id))


def cut_points(data: bytes) -> dict[str, int]:
    """Offsets to interrupt a download at: inside a header, a member, the directory."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = sorted(archive.infolist(), key=lambda i: i.header_offset)
        start_dir = archive.start_dir  # type: ignore[attr-defined]
    biggest = max(infos, key=lambda i: i.file_size)
    second = infos[1]
    return {
        "inside the biggest member": biggest.header_offset + 100 + biggest.file_size // 2,
        "inside a local header": second.header_offset + 11,
        "inside the central directory": start_dir + 50,
        "before the last byte": len(data) - 1,
    }


def test_curl_resumes_an_interrupted_download(server, resume_job, tmp_path):
    """``curl -C -`` after ``curl -r 0-N`` gives the same bytes as one whole download."""
    curl = need("curl")
    job_id, expected = resume_job
    url = server.url + model_url(job_id)
    for label, cut in cut_points(expected).items():
        part = tmp_path / f"part-{cut}.zip"
        first = run([curl, "-sS", "--fail", "-r", f"0-{cut - 1}", "-o", str(part), url])
        assert first.returncode == 0, first.stderr
        assert part.read_bytes() == expected[:cut], label
        resumed = run([curl, "-sS", "--fail", "-C", "-", "-o", str(part), url])
        assert resumed.returncode == 0, f"{label}: {resumed.stderr}"
        assert part.stat().st_size == len(expected), label
        assert hashlib.sha256(part.read_bytes()).digest() == hashlib.sha256(expected).digest(), label

    whole = tmp_path / "whole.zip"
    done = run([curl, "-sS", "--fail", "-o", str(whole), url])
    assert done.returncode == 0, done.stderr
    assert whole.read_bytes() == expected
    with zipfile.ZipFile(whole) as archive:
        assert archive.testzip() is None


def test_curl_resumes_after_being_cut(server, resume_job, tmp_path):
    """A curl transfer cut by ``--max-time``, then ``curl -C -``, gives the whole archive."""
    curl = need("curl")
    job_id, expected = resume_job
    part = tmp_path / "cut.zip"
    url = server.url + model_url(job_id)
    # curl throttles in bursts: at 100 KiB/s it sleeps for seconds after the first.
    cut = run([curl, "-sS", "--limit-rate", str(100 * 1024), "--max-time", "1.5",
               "-o", str(part), url])
    assert cut.returncode == 28, f"curl exit {cut.returncode} (28: timed out): {cut.stderr}"
    size = part.stat().st_size
    assert 0 < size < len(expected)
    assert part.read_bytes() == expected[:size]
    resumed = run([curl, "-sS", "--fail", "-C", "-", "-o", str(part), url])
    assert resumed.returncode == 0, resumed.stderr
    assert part.read_bytes() == expected


def test_wget_continues_an_interrupted_download(server, resume_job, tmp_path):
    """``wget -c`` completes a partial file to the same bytes as one whole download."""
    wget = need("wget")
    job_id, expected = resume_job
    url = server.url + model_url(job_id)
    for label, cut in cut_points(expected).items():
        part = tmp_path / f"wget-{cut}.zip"
        part.write_bytes(expected[:cut])
        done = run([wget, "-q", "-c", "-O", str(part), url])
        assert done.returncode == 0, f"{label}: wget exit {done.returncode}: {done.stderr}"
        assert part.read_bytes() == expected, label
