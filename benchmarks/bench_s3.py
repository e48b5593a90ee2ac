"""Object-storage benchmark: a model archive streamed from a local S3 API server.

::

    python benchmarks/bench_s3.py [--size-mib 256] [--runs 3] [--chunk-kib 1024]

Starts moto's server mode on loopback (``.venv-moto/bin/moto_server``, or
``$MOTO_SERVER``), uploads a finished Trainer job whose model.safetensors
has ``--size-mib`` random bytes, every object with its CRC-32 stored, and
measures in this one process:

- ``read-ahead 4`` / ``read-ahead 1``: the model archive through the Flask
  app (``s3://`` job root, ``ARTIFACTS_READ_AHEAD`` 4 and 1), read to the
  end; a fresh app each run, so planning (listing, checksum HEADs) is in
  the time to first byte;
- ``s3fs sequential``: the same objects, in archive order, read with
  ``fs.open(path).read(chunk)`` (s3fs's own buffering), no archive.

Each runs against moto directly and, with ``--latency-ms``, through a
relay that delays every answer like a distant endpoint. Prints the median
of ``--runs`` runs of each, interleaved. moto copies the whole object for
every ranged GET, so there the number of GETs, not their overlap, decides;
the delayed endpoint shows what overlapping round trips buys.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests/ holds the job layout and the moto runner

from flask_artifacts import create_app  # noqa: E402
from tests.jobtree import make_job  # noqa: E402
from tests.motoserver import FaultProxy, MotoServer, upload_tree  # noqa: E402

MiB = 1 << 20
MB = 1_000_000
BUCKET = "bench"
JOB = "bench"


def app_download(endpoint: str, cache: Path, read_ahead: int, chunk: int
                 ) -> Callable[[], tuple[float, float, int, float]]:
    """Stream the model archive through a warm app.

    Returns the planning time, the time to the first byte, the bytes and the total time.

    The app (and its S3 client) is made once; before each run the worker's
    memory of stored checksums is emptied, so every run plans the job as
    a worker's first download of it does (listing, HEADs, progress.json).
    """
    app = create_app({
        "ARTIFACTS_LOGS_DIR": f"s3://{BUCKET}/jobs", "ARTIFACTS_CACHE_DIR": str(cache),
        "ARTIFACTS_READ_AHEAD": read_ahead, "ARTIFACTS_CHUNK_SIZE": chunk,
        "ARTIFACTS_STORAGE_OPTIONS": {"skip_instance_cache": True,
                                      "client_kwargs": {"endpoint_url": endpoint}},
    })
    client = app.test_client()
    assert client.head(f"/api/training/{JOB}/download/model").status_code == 200
    store = app.extensions["artifacts"].store(app)

    def run() -> tuple[float, float, int, float]:
        # A HEAD plans exactly as the GET does (listing, checksum HEADs,
        # progress.json) and reads no member: the planning time.
        store._crcs.clear()
        started = time.perf_counter()
        assert client.head(f"/api/training/{JOB}/download/model").status_code == 200
        planned = time.perf_counter() - started
        store._crcs.clear()
        started = time.perf_counter()
        response = client.get(f"/api/training/{JOB}/download/model", buffered=False)
        assert response.status_code == 200, response.data[:300]
        first, total = None, 0
        try:
            for piece in response.response:
                if first is None:
                    first = time.perf_counter() - started
                total += len(piece)
        finally:
            response.close()
        assert total == int(response.headers["Content-Length"])
        return planned, first or 0.0, total, time.perf_counter() - started

    return run


def s3fs_sequential(endpoint: str, chunk: int) -> Callable[[], tuple[float, float, int, float]]:
    """The job's model objects, in archive order, read with s3fs's own file objects."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": endpoint})
    fs.ls(BUCKET)

    def run() -> tuple[float, float, int, float]:
        started = time.perf_counter()
        paths = sorted(p for p in fs.find(f"{BUCKET}/jobs/job_{JOB}")
                       if not p.endswith("/progress.json"))
        first, total = None, 0
        for path in paths:
            with fs.open(path, "rb") as f:
                while True:
                    piece = f.read(chunk)
                    if not piece:
                        break
                    if first is None:
                        first = time.perf_counter() - started
                    total += len(piece)
        return 0.0, first or 0.0, total, time.perf_counter() - started

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="model.safetensors size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk-kib", type=int, default=1024, help="ARTIFACTS_CHUNK_SIZE")
    parser.add_argument("--latency-ms", type=int, default=20,
                        help="also run through a relay adding this much per request (0: no)")
    args = parser.parse_args()
    chunk = args.chunk_kib * 1024

    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp_name:
        tmp = Path(tmp_name)
        logs = tmp / "logs"
        weights = np.random.default_rng(0).bytes(args.size_mib * MiB)
        make_job(logs, JOB, checkpoints=(), extra_files={"model.safetensors": weights})
        del weights
        with MotoServer(tmp / "moto.log") as moto, FaultProxy(moto.port) as proxy:
            os.environ.update(moto.env())
            started = time.perf_counter()
            upload_tree(moto.endpoint, BUCKET, "jobs", logs, checksums=True)
            print(f"uploaded {args.size_mib} MiB job to moto in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
            proxy.latency = args.latency_ms / 1000
            scenarios = {"loopback": moto.endpoint}
            if args.latency_ms:
                scenarios[f"+{args.latency_ms} ms per request"] = proxy.endpoint
            samples: dict[tuple[str, str], list[tuple[float, float, float, int]]] = {}
            for scenario, endpoint in scenarios.items():
                variants = {
                    "archive, read-ahead 4": app_download(endpoint, tmp / "cache4", 4, chunk),
                    "archive, read-ahead 1": app_download(endpoint, tmp / "cache1", 1, chunk),
                    "s3fs sequential reads": s3fs_sequential(endpoint, chunk),
                }
                for round_ in range(args.runs):
                    for name, run in variants.items():
                        planned, ttfb, size, elapsed = run()
                        samples.setdefault((scenario, name), []).append(
                            (planned, ttfb, elapsed, size))
                        print(f"{scenario} run {round_ + 1} {name}: {size / elapsed / MB:.1f} MB/s,"
                              f" first byte {ttfb * 1000:.0f} ms", file=sys.stderr)

    print(f"\nModel archive from moto, {args.size_mib} MiB model.safetensors plus the job's"
          f" small files, chunk {args.chunk_kib} KiB, median of {args.runs} runs\n")
    print(f"| {'endpoint':<22} | {'variant':<22} | {'MB/s':>7} | {'plan (ms)':>12} |"
          f" {'first byte (ms)':>15} | {'vs s3fs':>7} |")
    print(f"| {'-' * 22} | {'-' * 22} | {'-' * 7}:| {'-' * 12}:| {'-' * 15}:| {'-' * 7}:|")
    for (scenario, name), runs in samples.items():
        rate = statistics.median(s[3] / s[2] for s in runs)
        base = statistics.median(s[3] / s[2] for s in samples[(scenario, "s3fs sequential reads")])
        planned = statistics.median(s[0] for s in runs)
        ttfb = statistics.median(s[1] for s in runs)
        shown = f"{planned * 1000:>12.0f}" if planned else f"{'-':>12}"
        print(f"| {scenario:<22} | {name:<22} | {rate / MB:>7.1f} | {shown} |"
              f" {ttfb * 1000:>15.0f} | {rate / base:>6.2f}x |")
    print("\nplan: a HEAD of the archive (listing, checksum HEADs, progress.json), no member read."
          "\nfirst byte: the archive's first chunk, which stream-zip sends once a whole chunk"
          "\nis assembled (the small files and the first chunk of model.safetensors); for s3fs,"
          "\nthe first chunk of the first file.")


if __name__ == "__main__":
    main()
