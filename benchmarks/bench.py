"""Download benchmark: flask-artifacts under gunicorn against the limit of the stack.

::

    python benchmarks/bench.py [--size-gib 1.5] [--runs 3] [--quick] [--keep]

Generates a Trainer job of real (non-sparse) bytes in a temporary folder,
starts gunicorn with the shipped ``gunicorn.conf.py`` serving
``benchmarks/app.py`` (flask-artifacts plus comparison routes), downloads
every variant with curl to /dev/null and prints a table with medians,
ratios measured in this same run, and the targets of issue 3.

Files are written once and left in the page cache, so every figure is a
page-cache read, not a disk read. See ``benchmarks/README.rst``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.jobtree writes the Trainer layout

from flask_artifacts import archives, create_app  # noqa: E402
from flask_artifacts.extension import get_cache, get_store  # noqa: E402
from tests.jobtree import make_job  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MB = 1_000_000
BLOCK = 16 * MiB
CHECKPOINT = "checkpoint-1000"

# -- the job ------------------------------------------------------------------


def _fp16_exponents() -> np.ndarray:
    """fp16 exponent fields distributed as those of N(0, 0.02) weights, 32 buckets."""
    from statistics import NormalDist

    dist = NormalDist(0, 0.02)
    fields = []
    for k in range(32):
        magnitude = dist.inv_cdf(0.5 + (k + 0.5) / 64)  # quantile of |x|
        fields.append(min(max(math.floor(math.log2(magnitude)) + 15, 1), 30))
    return np.array(fields, dtype=np.uint16) << 10


_EXPONENTS = _fp16_exponents()


def fp16_like(rng: np.random.Generator, nbytes: int) -> bytes:
    """Bytes that look like fp16 weights: random sign and mantissa, realistic exponents.

    Deflate shrinks them about as much as real fp16 weights (about 0.92),
    at about a twentieth of the cost of drawing normal samples.
    """
    raw = np.frombuffer(rng.bytes(nbytes), dtype=np.uint16)
    return ((raw & np.uint16(0x83FF)) | _EXPONENTS[(raw >> 10) & 31]).tobytes()


def _write_blocks(path: Path, size: int, make: Callable[[int], bytes], prefix: bytes = b"") -> None:
    with open(path, "wb") as f:
        f.write(prefix)
        left = size - len(prefix)
        while left > 0:
            block = make(min(BLOCK, left))
            f.write(block)
            left -= len(block)


def write_safetensors(path: Path, size: int, rng: np.random.Generator, tensor: str) -> None:
    """A valid safetensors file of about ``size`` bytes holding one fp16 tensor."""
    count = max(size // 2 - 64, 1)
    header = json.dumps({"__metadata__": {"format": "pt"},
                         tensor: {"dtype": "F16", "shape": [count], "data_offsets": [0, 2 * count]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    prefix = struct.pack("<Q", len(header)) + header
    _write_blocks(path, len(prefix) + 2 * count, lambda n: fp16_like(rng, n), prefix)


def write_noise(path: Path, size: int, rng: np.random.Generator) -> None:
    """Random bytes, as ``torch.save`` output looks to an archiver."""
    _write_blocks(path, size, rng.bytes)


def make_large_job(logs: Path, total: int, seed: int = 0) -> Path:
    """``job_large``: final model in 3 shards, one checkpoint; ``total`` bytes of weights."""
    rng = np.random.default_rng(seed)
    job = make_job(logs, "large", checkpoints=(1000,), shape=(32, 16))
    (job / "model.safetensors").unlink()
    shards = 3
    shard = int(total * 0.60) // shards
    weight_map = {}
    for i in range(1, shards + 1):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        tensor = f"model.layers.{i - 1}.weight"
        write_safetensors(job / name, shard, rng, tensor)
        weight_map[tensor] = name
    index = {"metadata": {"total_size": shards * shard}, "weight_map": weight_map}
    (job / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    ckpt = job / CHECKPOINT
    write_safetensors(ckpt / "model.safetensors", int(total * 0.25), rng, "model.weight")
    write_noise(ckpt / "optimizer.pt", int(total * 0.15), rng)
    return job


def make_small_job(logs: Path) -> Path:
    """``job_small``: a few MiB, real safetensors, for time to first byte."""
    return make_job(logs, "small", checkpoints=(10,), shape=(256, 256))


def make_deflate_job(logs: Path, size: int, seed: int = 1) -> Path:
    """``job_deflate``: one fp16-like weight file of ``size`` bytes, for the deflate rows."""
    job = make_job(logs, "deflate", checkpoints=(), shape=(32, 16))
    write_safetensors(job / "model.safetensors", size, np.random.default_rng(seed), "model.weight")
    return job


def model_plan(logs: Path, job_id: str, cache_dir: Path):  # type: ignore[no-untyped-def]
    """The model archive's plan, as the server will make it (sizes need no CRCs)."""
    app = create_app({"ARTIFACTS_LOGS_DIR": str(logs), "ARTIFACTS_CACHE_DIR": str(cache_dir)})
    with app.app_context():
        store = get_store()
        return archives.plan_download(store, get_cache(), store.job(job_id), "model")


def write_plain(plan, path: Path) -> None:  # type: ignore[no-untyped-def]
    """One file as large as the archive: its members concatenated, then padding."""
    with open(path, "wb") as out:
        for member in plan.members:
            if not member.entry.is_dir:
                with open(member.entry.locator, "rb") as f:
                    shutil.copyfileobj(f, out, BLOCK)
        out.write(os.urandom(plan.size - out.tell()))


# -- the server ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """gunicorn with the shipped config, one worker, serving benchmarks.app:app."""

    def __init__(self, logs: Path, plain: Path, cache_dir: Path, log_path: Path,
                 threads: int = 8) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.threads = threads
        env = dict(os.environ,
                   LOGS_DIR=str(logs),
                   FLASK_ARTIFACTS_CACHE_DIR=str(cache_dir),
                   BENCH_PLAIN_DIR=str(plain),
                   GUNICORN_BIND=f"127.0.0.1:{self.port}",
                   GUNICORN_WORKERS="1",
                   GUNICORN_THREADS=str(threads))
        self.log = open(log_path, "ab")
        # The positional app overrides wsgi_app from gunicorn.conf.py.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "benchmarks.app:app"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = log_path
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited ({self.proc.returncode}); see {log_path}:\n"
                                   + log_path.read_text()[-3000:])
            try:
                info = json.loads(request("GET", self.port, "/bench/ping")[1])
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gunicorn did not answer within 60 s; see {log_path}")
                time.sleep(0.1)
        self.worker_pid = int(info["pid"])
        self.backend = str(info["backend"])
        self.chunk_size = int(info["chunk_size"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def request(method: str, port: int, path: str, timeout: float = 300) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- measuring ----------------------------------------------------------------


def vmrss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Peak VmRSS of a process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.idle = vmrss(pid)
        self.peak = self.idle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, vmrss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.peak = max(self.peak, vmrss(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.idle


CURL_FORMAT = "%{http_code} %{size_download} %{time_starttransfer} %{time_total}"


def curl_command(url: str) -> list[str]:
    return ["curl", "-s", "-o", os.devnull, "-w", CURL_FORMAT, url]


@dataclass
class Sample:
    size: int
    ttfb: float
    total: float
    rss: int
    #: CPU seconds the worker spent on this download (user + system).
    cpu: float

    @property
    def mbps(self) -> float:
        return self.size / self.total / MB


def parse_curl(out: str, url: str, expect: int | None) -> tuple[int, float, float]:
    code, size, ttfb, total = out.split()
    if code != "200":
        raise RuntimeError(f"{url} answered {code}")
    if expect is not None and int(size) != expect:
        raise RuntimeError(f"{url} sent {size} bytes, expected {expect}")
    return int(size), float(ttfb), float(total)


def download(server: Server, path: str, expect: int | None = None) -> Sample:
    url = server.base + path
    cpu = cpu_seconds(server.worker_pid)
    with RssSampler(server.worker_pid) as rss:
        done = subprocess.run(curl_command(url), capture_output=True, text=True)
    cpu = cpu_seconds(server.worker_pid) - cpu
    if done.returncode != 0:
        raise RuntimeError(f"curl {url} failed with exit code {done.returncode}")
    size, ttfb, total = parse_curl(done.stdout, url, expect)
    return Sample(size, ttfb, total, rss.growth, cpu)


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


@dataclass
class Listing:
    threads: int
    latencies: list[float] = field(default_factory=list)
    finished_under_load: int = 0
    #: Downloads that streamed, and those answered 429 (over ARTIFACTS_MAX_DOWNLOADS).
    streamed: int = 0
    refused: int = 0
    rss: int = 0
    aggregate_mbps: float = 0.0
    cpu_per_gb: float = 0.0


def listing_under_load(server: Server, job_path: str, listing_path: str, expect: int,
                       requests: int = 200, downloads: int = 8, clients: int = 2) -> Listing:
    """Listing latency while ``downloads`` curl processes ask for the large archive.

    The listing requests start once the downloads are under way and stop when
    the first download ends, so each one is timed under the full load.
    """
    result = Listing(server.threads)
    lock = threading.Lock()
    started = [0]
    cpu = cpu_seconds(server.worker_pid)
    with RssSampler(server.worker_pid) as rss:
        t0 = time.perf_counter()
        procs = [subprocess.Popen(curl_command(server.base + job_path), stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) for _ in range(downloads)]
        time.sleep(0.5)  # every download is streaming by now, or was refused at once
        streaming = [p for p in procs if p.poll() is None]

        def loaded() -> bool:
            return all(p.poll() is None for p in streaming)

        def client() -> None:
            while True:
                with lock:
                    if started[0] >= requests or not loaded():
                        return
                    started[0] += 1
                begin = time.perf_counter()
                status, _ = request("GET", server.port, listing_path)
                elapsed = time.perf_counter() - begin
                still = loaded()
                if status != 200:
                    raise RuntimeError(f"listing answered {status}")
                with lock:
                    result.latencies.append(elapsed)
                    result.finished_under_load += still

        workers = [threading.Thread(target=client) for _ in range(clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        total_bytes = 0
        for p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"a concurrent download failed (curl exit {p.returncode})")
            if out.split()[0] == "429":
                result.refused += 1
                continue
            total_bytes += parse_curl(out, job_path, expect)[0]
            result.streamed += 1
        wall = time.perf_counter() - t0
    result.rss = rss.growth
    result.aggregate_mbps = total_bytes / wall / MB
    result.cpu_per_gb = (cpu_seconds(server.worker_pid) - cpu) / (total_bytes / 1e9)
    return result


# -- the run --------------------------------------------------------------------


ROWS = {
    "cold": "stored archive, cold CRC cache",
    "warm": "stored archive, warm CRC cache",
    "sums_hashing": "+ SHA256SUMS, hashed while streaming",
    "sums_cached": "+ SHA256SUMS, hashes cached",
    "sendfile": "send_file of one plain file",
    "zipstream": "zipstream-ng sized, stored",
    "bytesio": "zipfile into BytesIO, stored",
    "deflate_fast": "deflate, {backend} (default)",
    "deflate_zlib": "deflate, zlib forced",
    "small_cold": "small job, cold CRC cache",
    "small_warm": "small job, warm CRC cache",
}


def run_rounds(args: argparse.Namespace, tmp: Path, logs: Path, plain: Path,
               sizes: dict[str, int]) -> tuple[dict[str, list[Sample]], Server | None, Path]:
    samples: dict[str, list[Sample]] = {key: [] for key in ROWS}
    model = "/api/training/{}/download/model"
    cache_dir = tmp / "cache-0"
    info = None
    for run in range(args.runs):
        # A fresh cache folder and a fresh worker per round: the cache keeps one
        # SQLite connection per thread, so deleting its folder under a live worker
        # would leave those threads reading the deleted (still warm) database.
        cache_dir = tmp / f"cache-{run}"
        server = Server(logs, plain, cache_dir, tmp / "gunicorn.log")
        info = server
        try:
            for job in ("small", "large"):  # plan once (opens the cache), reading nothing
                status, _ = request("HEAD", server.port, model.format(job))
                assert status == 200, status
            steps: list[tuple[str, str, int | None]] = [
                ("small_cold", model.format("small"), sizes["small"]),
                ("cold", model.format("large"), sizes["large"]),
                ("small_warm", model.format("small"), sizes["small"]),
                ("warm", model.format("large"), sizes["large"]),
                # SHA256SUMS adds one member: curl checks the Content-Length.
                ("sums_hashing", model.format("large") + "?sha256sums=1", None),
                ("sums_cached", model.format("large") + "?sha256sums=1", None),
                ("sendfile", "/bench/sendfile/large", sizes["large"]),
                # Its own layout, a few bytes off ours; curl checks its Content-Length.
                ("zipstream", "/bench/zipstream/large", None),
                ("deflate_fast", model.format("deflate") + "?compression=deflate", None),
                ("deflate_zlib", "/bench/deflate-zlib/deflate", None),
            ]
            if not args.skip_bytesio:
                steps.append(("bytesio", "/bench/bytesio/large", None))  # last: it may leave the heap grown
            for key, path, expect in steps:
                sample = download(server, path, expect)
                samples[key].append(sample)
                print(f"  run {run + 1}/{args.runs} {key:<13} {sample.mbps:8.0f} MB/s"
                      f"  ttfb {sample.ttfb * 1000:7.1f} ms  rss +{sample.rss / MiB:7.1f} MiB"
                      f"  cpu {sample.cpu:5.2f} s",
                      flush=True)
        finally:
            server.stop()
    return samples, info, cache_dir


def fmt_range(values: Sequence[float], unit: str = "", digits: int = 0) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}{unit}"
    return f"{med:.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(args: argparse.Namespace, samples: dict[str, list[Sample]], listings: list[Listing],
           sizes: dict[str, int], backend: str, chunk_size: int,
           load: tuple[float, float]) -> None:
    def med(key: str, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in samples[key])

    print()
    print(f"flask-artifacts download benchmark: large archive {sizes['large'] / GiB:.2f} GiB"
          f" ({sizes['large']:,} bytes), small archive {sizes['small'] / MiB:.1f} MiB,"
          f" deflate job {sizes['deflate_input'] / MiB:.0f} MiB")
    print(f"{args.runs} run(s), median (min-max); gunicorn gthread, 1 worker, 8 threads;"
          f" CRC/deflate backend: {backend}; chunk {chunk_size // KiB} KiB;"
          f" MB = 10^6 bytes")
    written = 2 * sizes["large"] + sizes["small"] + sizes["deflate_input"]
    # A rough rule: other processes share the page cache with these files.
    fits = written < 0.6 * sizes["mem_total"]
    print(f"files written once ({written / GiB:.1f} GiB: the jobs and the plain file), then read"
          + (" from the page cache" if fits else
             f", too much to be sure of the page cache ({sizes['mem_total'] / GiB:.0f} GiB of"
             " memory): reads may hit the disk"))
    print(f"load average (1 min) {load[0]:.2f} before, {load[1]:.2f} after, on {os.cpu_count()} CPUs"
          " (counting this benchmark's own processes)")
    print()
    head = (f"{'row':<40} {'MB/s':>18} {'TTFB ms':>24} {'peak RSS +MiB':>24}"
            f" {'worker CPU ms/GB':>20}")
    print(head)
    print("-" * len(head))
    for key, label in ROWS.items():
        if not samples[key]:
            continue
        label = label.format(backend=backend)
        rows = samples[key]
        handled = [s.size for s in rows]
        if key.startswith("deflate"):
            # Throughput of the job's bytes, not of the (smaller) archive.
            handled = [sizes["deflate_input"]] * len(rows)
            ratio = statistics.median(s.size for s in rows) / sizes["deflate_input"]
            label = f"{label} (out/in {ratio:.2f})"
        mbps = [n / s.total / MB for s, n in zip(rows, handled)]
        # CPU per GB means nothing for the small job: /proc counts 10 ms ticks.
        cpu = "-" if key.startswith("small") else fmt_range(
            [s.cpu * 1e12 / n for s, n in zip(rows, handled)])
        print(f"{label:<40} {fmt_range(mbps):>18} {fmt_range([s.ttfb * 1000 for s in rows], digits=1):>24}"
              f" {fmt_range([s.rss / MiB for s in rows], digits=1):>24} {cpu:>20}")
    print()
    for lst in listings:
        n = len(lst.latencies)
        ms = [x * 1000 for x in lst.latencies]
        print(f"checkpoint listing, {lst.threads} threads, {lst.streamed} downloads streaming"
              f" ({lst.refused} more answered 429): median"
              f" {statistics.median(ms):.1f} ms, p99 {percentile(ms, 99):.1f} ms,"
              f" max {max(ms):.1f} ms over {n} requests ({lst.finished_under_load} answered while"
              f" all ran); downloads {lst.aggregate_mbps:.0f} MB/s in all, worker CPU"
              f" {lst.cpu_per_gb * 1000:.0f} ms/GB; peak RSS +{lst.rss / MiB:.1f} MiB")
    print()

    def ratio(a: str, b: str) -> tuple[float, str]:
        """Throughput ratio of two rows, paired by round (same server, minutes apart)."""
        pairs = [x.mbps / y.mbps for x, y in zip(samples[a], samples[b])]
        return statistics.median(pairs), fmt_range(pairs, digits=2)

    checks: list[tuple[str, str, str, bool]] = []
    for a, b, target in (("warm", "sendfile", 0.9), ("cold", "sendfile", 0.6),
                         ("warm", "zipstream", 1.0), ("cold", "zipstream", 1.0)):
        value, shown = ratio(a, b)
        name = "send_file" if b == "sendfile" else "zipstream-ng"
        ok = value >= target if target < 1 else value > target
        checks.append((f"{a} / {name}", shown, f"{'>=' if target < 1 else '>'} {target:.2f}", ok))
    for key, label in (("small_warm", "TTFB small job, warm"), ("small_cold", "TTFB small job, cold"),
                       ("warm", "TTFB large job, warm"), ("cold", "TTFB large job, cold")):
        ttfb = med(key, "ttfb") * 1000
        checks.append((label, f"{ttfb:.1f} ms", "< 50 ms", ttfb < 50))
    for key in ("warm", "cold"):
        rss = max(s.rss for s in samples[key]) / MiB
        checks.append((f"RSS growth, {key} (max of runs)", f"{rss:.1f} MiB", "< 64 MiB (flat)", rss < 64))
    for lst in listings:
        p99 = percentile(lst.latencies, 99) * 1000
        checks.append((f"listing p99, {lst.streamed} downloads, {lst.threads} thr", f"{p99:.1f} ms",
                       "< 100 ms", p99 < 100))
        checks.append((f"RSS growth, {lst.streamed} downloads, {lst.threads} thr",
                       f"{lst.rss / MiB:.1f} MiB", "< 64 MiB (flat)", lst.rss / MiB < 64))
    fast_, zlib_ = med("deflate_fast", "total"), med("deflate_zlib", "total")
    print("ratios: median of the per-round ratios (min-max); figures: medians")
    print(f"{'ratio / figure':<34} {'measured':>18}  {'target':<16} result")
    print("-" * 78)
    for label, value, target, ok in checks:
        print(f"{label:<34} {value:>18}  {target:<16} {verdict(ok)}")
    print(f"{'deflate ' + backend + ' / zlib speed-up':<34} {zlib_ / fast_:>17.1f}x  (no target)")
    if samples["bytesio"]:
        print(f"{'BytesIO peak RSS / archive size':<34}"
              f" {med('bytesio', 'rss') / sizes['large']:>18.2f}  (for contrast)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.5,
                        help="bytes of weights in the large job (default 1.5)")
    parser.add_argument("--runs", type=int, default=3, help="downloads of each variant (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: 256 MiB job, 64 MiB deflate job, 1 run")
    parser.add_argument("--deflate-mib", type=int, default=256,
                        help="size of the deflate rows' job (default 256; zlib runs at 20-40 MB/s)")
    parser.add_argument("--requests", type=int, default=200, help="listing requests (default 200)")
    parser.add_argument("--skip-bytesio", action="store_true",
                        help="leave out the BytesIO row (it holds the whole archive in memory)")
    parser.add_argument("--chunk-size", type=int,
                        help="ARTIFACTS_CHUNK_SIZE for the server, in bytes (default: the app's, 1 MiB)")
    parser.add_argument("--keep", action="store_true", help="keep the generated jobs and print where")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_gib, args.runs, args.deflate_mib = 0.25, 1, 64
    if args.chunk_size:
        os.environ["FLASK_ARTIFACTS_CHUNK_SIZE"] = str(args.chunk_size)  # read by create_app()
    if shutil.which("curl") is None:
        parser.error("curl is required")

    # A SIGTERM must still stop gunicorn and remove the generated files
    # (a background job ignores SIGINT, so SIGTERM is how it is stopped).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="flask-artifacts-bench-"))
    logs, plain = tmp / "jobs", tmp / "plain"
    logs.mkdir()
    plain.mkdir()
    listings: list[Listing] = []
    try:
        t0 = time.perf_counter()
        print(f"writing jobs ({args.size_gib:.2f} GiB + {args.deflate_mib} MiB) and the plain file"
              f" under {tmp} ...", flush=True)
        make_large_job(logs, int(args.size_gib * GiB))
        make_small_job(logs)
        make_deflate_job(logs, args.deflate_mib * MiB)
        plan_cache = tmp / "plan-cache"
        large = model_plan(logs, "large", plan_cache)
        write_plain(large, plain / "large.bin")
        deflate_input = sum(m.entry.size for m in model_plan(logs, "deflate", plan_cache).members)
        sizes = {"large": large.size, "small": model_plan(logs, "small", plan_cache).size,
                 "deflate_input": deflate_input}
        os.sync()  # no writeback competing with the downloads
        print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)

        with open("/proc/meminfo") as f:
            meminfo = {line.split(":")[0]: int(line.split()[1]) * KiB for line in f}
        avail = meminfo["MemAvailable"]
        sizes["mem_total"] = meminfo["MemTotal"]
        if not args.skip_bytesio:
            if sizes["large"] * 3 > avail:
                print("  not enough free memory for the BytesIO row: leaving it out")
                args.skip_bytesio = True

        load_before = os.getloadavg()[0]
        samples, server, cache_dir = run_rounds(args, tmp, logs, plain, sizes)
        backend, chunk_size = server.backend, server.chunk_size  # type: ignore[union-attr]

        # Listing under load, on the warm cache of the last round. gunicorn.conf.py
        # caps downloads at threads - 2 (ARTIFACTS_MAX_DOWNLOADS): with its 8
        # threads 6 of the 8 stream and 2 are answered 429; with 10, all 8 stream.
        for threads in (8, 10):
            srv = Server(logs, plain, cache_dir, tmp / "gunicorn.log", threads=threads)
            try:
                request("GET", srv.port, "/api/training/checkpoints/large")
                lst = listing_under_load(srv, "/api/training/large/download/model",
                                         "/api/training/checkpoints/large", sizes["large"],
                                         requests=args.requests)
                listings.append(lst)
                print(f"  listing with {threads} threads: {len(lst.latencies)} requests,"
                      f" {lst.streamed} downloads streamed, {lst.refused} answered 429", flush=True)
            finally:
                srv.stop()

        load = (load_before, os.getloadavg()[0])
        report(args, samples, listings, sizes, backend, chunk_size, load)
    finally:
        if args.keep:
            print(f"\nkept: LOGS_DIR={logs}  (python benchmarks/profile_stream.py --logs-dir {logs})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
