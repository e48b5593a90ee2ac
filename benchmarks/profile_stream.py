"""Where a stored download's time goes, measured in-process without HTTP.

::

    python benchmarks/profile_stream.py [--size-gib 1.5] [--repeat 5] [--quick]
                                        [--logs-dir DIR]

Runs :class:`flask_artifacts.streaming.ArchiveBody` over the large job of
``bench.py`` (generated in a temporary folder, or an existing ``LOGS_DIR``
holding ``job_large``, for example one kept by ``bench.py --keep``) and
times, for chunk sizes of 256 KiB, 1 MiB and 4 MiB, each part of the work
on the same bytes: file reads, CRC-32 in zlib and in the fast backend,
stream-zip alone on bytes already in memory (with its CRC check as shipped,
swapped to the fast backend, and stubbed out), the whole body warm and
cold, and socket writes to a curl on loopback (plain ``sendall``, the same
with the socket timeout the download view sets, ``sendfile``, and the warm
body itself). Every figure is a median of ``--repeat`` rounds (each round
runs every step once, so a busy spell on a shared machine hits all steps
alike), in GB/s of the bytes handled (GB = 10^9 bytes); files are read
from the page cache.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import stream_zip
from stream_zip import NO_COMPRESSION_32, NO_COMPRESSION_64

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the job generator, and the repository on sys.path)

from flask_artifacts import archives, create_app, fast  # noqa: E402
from flask_artifacts.cache import ChecksumCache  # noqa: E402
from flask_artifacts.extension import get_store  # noqa: E402
from flask_artifacts.streaming import ArchiveBody  # noqa: E402

KiB, MiB, GiB = bench.KiB, bench.MiB, bench.GiB
CHUNKS = (256 * KiB, 1 * MiB, 4 * MiB)


def drain(chunks: Iterable[bytes]) -> int:
    total = 0
    for chunk in chunks:
        total += len(chunk)
    return total


@contextlib.contextmanager
def stream_zip_crc(crc32: Callable[..., int]) -> Iterator[None]:
    """Diagnostic only: the CRC function stream-zip's member check calls."""
    original = stream_zip.zlib
    shim = types.SimpleNamespace(**{k: getattr(zlib, k) for k in dir(zlib) if not k.startswith("__")})
    shim.crc32 = crc32
    stream_zip.zlib = shim  # type: ignore[attr-defined]
    try:
        yield
    finally:
        stream_zip.zlib = original  # type: ignore[attr-defined]


class CurlSink:
    """One HTTP response written by hand to a curl on loopback, discarding to /dev/null."""

    def __init__(self, length: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        port = self.listener.getsockname()[1]
        self.curl = subprocess.Popen(["curl", "-s", "-o", os.devnull, "-w", "%{size_download}",
                                      f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, text=True)
        self.sock, _ = self.listener.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += self.sock.recv(65536)
        self.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\n"
                          b"Content-Length: %d\r\nConnection: close\r\n\r\n" % length)
        self.length = length

    def finish(self) -> int:
        self.sock.close()
        self.listener.close()
        out, _ = self.curl.communicate()
        if int(out) != self.length:
            raise RuntimeError(f"curl received {out} of {self.length} bytes")
        return self.length


def to_curl(length: int, write: Callable[[socket.socket], None], timeout: float | None = None) -> int:
    sink = CurlSink(length)
    if timeout is not None:
        sink.sock.settimeout(timeout)
    write(sink.sock)
    return sink.finish()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.5)
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="256 MiB job, 1 repeat")
    parser.add_argument("--logs-dir", type=Path, help="an existing LOGS_DIR with job_large")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_gib, args.repeat = 0.25, 1

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still remove the files
    tmp = Path(tempfile.mkdtemp(prefix="flask-artifacts-profile-"))
    try:
        logs = args.logs_dir
        if logs is None:
            logs = tmp / "jobs"
            logs.mkdir()
            print(f"writing a {args.size_gib:.2f} GiB job under {tmp} ...", flush=True)
            bench.make_large_job(logs, int(args.size_gib * GiB))
        plain = tmp / "plain.bin"
        bench.write_plain(bench.model_plan(logs, "large", tmp / "plan-cache"), plain)
        os.sync()
        run(args, logs, plain, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def run(args: argparse.Namespace, logs: Path, plain: Path, tmp: Path) -> None:
    repeat = args.repeat
    warm_cache_dir = tmp / "warm-cache"
    rows: dict[str, dict[int, float]] = {}
    notes: dict[str, str] = {}
    archive_size = 0

    for chunk in CHUNKS:
        app = create_app({"ARTIFACTS_LOGS_DIR": str(logs), "ARTIFACTS_CACHE_DIR": str(warm_cache_dir),
                          "ARTIFACTS_CHUNK_SIZE": chunk})
        with app.app_context():
            store = get_store()
            job = store.job("large")

            def plan_with(cache: ChecksumCache):  # type: ignore[no-untyped-def]
                return archives.plan_download(store, cache, job, "model")

            warm_cache = ChecksumCache(str(warm_cache_dir))
            cold_plan = plan_with(ChecksumCache(None))
            archive_size = cold_plan.size
            members = [m for m in cold_plan.members if not m.entry.is_dir]
            member_bytes = sum(m.entry.size for m in members)
            tasks: list[tuple[str, Callable[[], int], str]] = []

            def task(label: str, note: str = "") -> Callable[[Callable[[], int]], Callable[[], int]]:
                def add(fn: Callable[[], int]) -> Callable[[], int]:
                    tasks.append((label, fn, note))
                    return fn
                return add

            # 1. Reads: what LocalStore.read costs (a new bytes object per chunk).
            def reads(crc: Callable[..., int] | None = None) -> int:
                total = 0
                for m in members:
                    value = 0
                    for piece in store.read(m.entry, chunk_size=chunk):
                        total += len(piece)
                        if crc is not None:
                            value = crc(piece, value)
                return total

            task("file reads (LocalStore.read)")(reads)
            task("file reads + zlib.crc32")(lambda: reads(zlib.crc32))
            task(f"file reads + fast.crc32 ({fast.BACKEND})")(lambda: reads(fast.crc32))

            # 2. CRC alone, on one hot chunk, as many times as the job has bytes.
            hot = os.urandom(chunk)
            count = max(member_bytes // chunk, 1)

            def crc_only(fn: Callable[..., int]) -> int:
                value = 0
                for _ in range(count):
                    value = fn(hot, value)
                return count * chunk

            task("zlib.crc32, hot chunk")(lambda: crc_only(zlib.crc32))
            task(f"fast.crc32 ({fast.BACKEND}), hot chunk")(lambda: crc_only(fast.crc32))

            # 3. stream-zip alone, on the job's bytes held in memory.
            held: list[tuple[Any, list[bytes], int]] = []
            for m in cold_plan.members:
                pieces = [] if m.entry.is_dir else list(store.read(m.entry, chunk_size=chunk))
                crc = 0
                for piece in pieces:
                    crc = zlib.crc32(piece, crc)
                held.append((m, pieces, crc))

            def zip_held(stub_crc: bool = False) -> int:
                files = []
                for m, pieces, crc in held:
                    kind = NO_COMPRESSION_64 if m.zip64 else NO_COMPRESSION_32
                    files.append((m.name, m.modified, m.mode, kind(m.entry.size, 0 if stub_crc else crc),
                                  iter(pieces)))
                return drain(stream_zip.stream_zip(files, chunk_size=chunk, extended_timestamps=True))

            @task("stream-zip on memory, check with zlib.crc32", "as shipped")
            def _zip_shipped() -> int:
                return zip_held()

            @task(f"stream-zip on memory, check with {fast.BACKEND}", "diagnostic patch")
            def _zip_fast() -> int:
                with stream_zip_crc(fast.crc32):
                    return zip_held()

            @task("stream-zip on memory, check stubbed out", "re-chunking copies + generators only")
            def _zip_stub() -> int:
                with stream_zip_crc(lambda data, value=0: 0):
                    return zip_held(stub_crc=True)

            task("plain iteration over the same chunks")(lambda: sum(drain(p) for _, p, _ in held))

            # 4. The whole body, warm (CRCs cached) and cold (fresh cache each run).
            drain(ArchiveBody(plan_with(warm_cache), store, warm_cache, chunk_size=chunk))  # fill

            def body(cold: bool) -> int:
                cache = ChecksumCache(tempfile.mkdtemp(dir=tmp)) if cold else warm_cache
                b = ArchiveBody(plan_with(cache), store, cache, chunk_size=chunk)
                try:
                    n = drain(b)
                finally:
                    b.close()
                assert b.completed and n == archive_size
                return n

            task("ArchiveBody, warm CRC cache")(lambda: body(False))
            task("ArchiveBody, cold CRC cache")(lambda: body(True))

            @task(f"ArchiveBody warm, stream-zip check with {fast.BACKEND}", "diagnostic patch")
            def _body_fast() -> int:
                with stream_zip_crc(fast.crc32):
                    return body(False)

            # 5. Socket writes to curl on loopback (2 cores: writer and curl).
            hot_count = archive_size // chunk
            tail = archive_size - hot_count * chunk

            def send_hot(sock: socket.socket) -> None:
                for _ in range(hot_count):
                    sock.sendall(hot)
                sock.sendall(hot[:tail])

            def send_body(sock: socket.socket) -> None:
                b = ArchiveBody(plan_with(warm_cache), store, warm_cache, chunk_size=chunk)
                try:
                    for piece in b:
                        sock.sendall(piece)
                finally:
                    b.close()

            def send_plain(sock: socket.socket) -> None:
                with open(plain, "rb") as f:
                    sock.sendfile(f)

            task("socket: sendall of a hot chunk")(lambda: to_curl(archive_size, send_hot))
            task("socket: same, socket timeout set (view's stall guard)")(
                lambda: to_curl(archive_size, send_hot, timeout=300))
            task("socket: ArchiveBody warm -> sendall")(lambda: to_curl(archive_size, send_body))
            task("socket: ArchiveBody warm -> sendall, timeout set")(
                lambda: to_curl(archive_size, send_body, timeout=300))
            task("socket: sendfile of the plain file (send_file)", "chunk size unused")(
                lambda: to_curl(archive_size, send_plain))

            # Each round runs every task once, so slow spells of a shared machine
            # hit all of them alike; the figure is the median over rounds.
            times: dict[str, list[float]] = {label: [] for label, _, _ in tasks}
            sizes: dict[str, int] = {}
            for _ in range(repeat):
                for label, fn, _ in tasks:
                    t0 = time.perf_counter()
                    sizes[label] = fn()
                    times[label].append(time.perf_counter() - t0)
            held.clear()  # free the job's bytes before the next chunk size
            for label, _, note in tasks:
                rate = sizes[label] / statistics.median(times[label]) / 1e9
                rows.setdefault(label, {})[chunk] = rate
                if note:
                    notes[label] = note
                print(f"  {chunk // KiB:>5} KiB  {label:<56} {rate:6.2f} GB/s", flush=True)

    load = os.getloadavg()
    print()
    print(f"profile of ArchiveBody: archive {archive_size / GiB:.2f} GiB ({archive_size:,} bytes),"
          f" median of {repeat} interleaved rounds, GB/s (10^9 bytes/s) of the bytes handled;"
          f" fast backend: {fast.BACKEND}; page-cache reads; one thread; load average at the end"
          f" {load[0]:.2f} on {os.cpu_count()} CPUs")
    head = f"{'step':<56}" + "".join(f"{c // KiB:>9} KiB" for c in CHUNKS) + "  note"
    print(head)
    print("-" * len(head))
    for label, by_chunk in rows.items():
        cells = "".join(f"{by_chunk.get(c, float('nan')):>13.2f}" for c in CHUNKS)
        print(f"{label:<56}{cells}  {notes.get(label, '')}")
    print()
    print("Time per GB (ms) at 1 MiB chunks, from the rows above:")
    one = {label: 1000 / v[MiB] for label, v in rows.items() if MiB in v}

    def show(label: str, value: float) -> None:
        print(f"  {label:<64} {value:7.0f} ms")

    show("file reads", one["file reads (LocalStore.read)"])
    show("stream-zip's CRC check as shipped (zlib.crc32, hot chunk)", one["zlib.crc32, hot chunk"])
    show(f"the same check with {fast.BACKEND}", one[f"fast.crc32 ({fast.BACKEND}), hot chunk"])
    show("stream-zip without its CRC check (re-chunking copies, generators)",
         one["stream-zip on memory, check stubbed out"] - one["plain iteration over the same chunks"])
    show("ArchiveBody warm, total", one["ArchiveBody, warm CRC cache"])
    show("ArchiveBody cold, total", one["ArchiveBody, cold CRC cache"])
    show("socket sendall of hot chunks (no other work)", one["socket: sendall of a hot chunk"])
    show("ArchiveBody warm -> socket, total", one["socket: ArchiveBody warm -> sendall"])
    show("sendfile -> socket, total", one["socket: sendfile of the plain file (send_file)"])


if __name__ == "__main__":
    sys.exit(main())
