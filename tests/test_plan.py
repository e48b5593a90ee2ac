"""Archive layout and size: the plan against stream-zip's real output, through HTTP.

Every archive here is built by the download route from files on disk, and
checked with :mod:`zipfile` and by parsing its headers.
"""

from __future__ import annotations

import os
import struct
import typing as t
import zipfile
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from werkzeug.http import parse_date

try:
    from tests.helpers import (
        MODEL_URL, SparseWriter, ZIP64_EXTRA_ID, extra_ids, local_header, make_app, open_zip,
        stream_body, zip_files)
    from tests.jobtree import sparse_file
    from tests.jobtree import make_job as write_job
except ImportError:  # tests/ itself on sys.path
    from helpers import (  # type: ignore[no-redef]
        MODEL_URL, SparseWriter, ZIP64_EXTRA_ID, extra_ids, local_header, make_app, open_zip,
        stream_body, zip_files)
    from jobtree import sparse_file  # type: ignore[no-redef]
    from jobtree import make_job as write_job  # type: ignore[no-redef]

GiB = 1 << 30
BIG = 4 * GiB + GiB // 2
ZIP32_MEMBER = 18 + 76    # per member, besides twice its name and its size (FACTS.md)
ZIP64_MEMBER = 18 + 124
END32, END64 = 22, 22 + 76


def bare_job(logs_dir: Path, job_id: str, files: t.Mapping[str, bytes | str]) -> Path:
    """A completed job holding only ``files`` (and its progress.json, never archived)."""
    return write_job(logs_dir, job_id, checkpoints=(), final_model=False, tokenizer=False,
                     log=None, extra_files=files)


def noise(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def round_trip(body: bytes, expected: t.Mapping[str, bytes], prefix: str) -> zipfile.ZipFile:
    zf = open_zip(body)
    assert zf.testzip() is None
    assert zip_files(zf, prefix) == dict(expected)
    return zf


def tail_records(data: bytes) -> set[bytes]:
    """Which end records the last bytes hold: ZIP64 end, ZIP64 locator, end."""
    return {sig for sig in (b"PK\x06\x06", b"PK\x06\x07", b"PK\x05\x06") if sig in data[-200:]}


# -- (a) the stream-zip truncation regression --------------------------------------


def sweep(logs_dir: Path, cache_dir: Path, sizes: range, *, chunk_size: int,
          query: str = "") -> list[str]:
    """Download two-member archives whose first member crosses the output chunk boundary."""
    client = make_app(logs_dir, cache_dir, ARTIFACTS_CHUNK_SIZE=chunk_size).test_client()
    second = noise(1, 1000)
    problems = []
    for size in sizes:
        job_id = f"sweep{size}"
        first = noise(size, size)
        bare_job(logs_dir, job_id, {"a.bin": first, "b.bin": second})
        response = client.get(MODEL_URL.format(job_id) + query)
        body = response.data
        length = response.headers.get("Content-Length")
        try:
            if length is not None and int(length) != len(body):
                raise AssertionError(f"Content-Length {length}, body {len(body)}")
            zf = open_zip(body)
            if zf.testzip() is not None:
                raise AssertionError("testzip found a bad member")
            if zip_files(zf, f"job_{job_id}/") != {"a.bin": first, "b.bin": second}:
                raise AssertionError("contents differ")
        except (AssertionError, zipfile.BadZipFile) as exc:
            problems.append(f"{size}: {exc}")
    return problems


def test_stored_archives_across_the_64k_chunk_boundary_are_whole(logs_dir, cache_dir):
    # stream-zip 0.0.84 truncated some of these with no error (uktrade/stream-zip#189).
    assert sweep(logs_dir, cache_dir, range(65_200, 65_561, 4), chunk_size=65_536) == []


def test_deflated_archives_across_the_64k_chunk_boundary_are_whole(logs_dir, cache_dir):
    problems = sweep(logs_dir, cache_dir, range(65_200, 65_561, 4), chunk_size=65_536,
                     query="?compression=deflate")
    assert problems == []


def test_stored_archives_across_the_default_chunk_boundary_are_whole(logs_dir, cache_dir):
    mib = 1 << 20
    assert sweep(logs_dir, cache_dir, range(mib - 376, mib + 25, 8), chunk_size=mib) == []


# -- (b) Content-Length is the body's length, for many shapes ------------------------------


def shape_files(shape: str) -> dict[str, bytes]:
    if shape == "empty-files":
        return {"empty.txt": b"", "a/empty.bin": b"", "z/also-empty": b"", "one.txt": b"1"}
    if shape == "unicode-names":
        names = ["ünïcødé/çà.txt", "日本語/モデル.bin", "emoji-🤗.json", "кириллица.txt",
                 "عربي/ملف.bin", "e\u0301-combining.txt", "space name.txt", "ß-ligature-ﬁ.txt"]
        return {name: noise(i, 100 + i) for i, name in enumerate(names)}
    if shape == "hundreds-of-small-files":
        return {f"shards/part-{i:04d}.bin": noise(i, i % 97) for i in range(600)}
    if shape == "deep-nesting":
        deep = "/".join(f"level-{i:02d}" for i in range(40))
        return {f"{deep}/leaf.txt": b"deep", f"{deep[:200]}/mid.txt": b"mid", "top.txt": b"top"}
    if shape == "mixed-sizes":
        return {f"f{size}.bin": noise(size, size) for size in (0, 1, 2, 511, 4096, 65_535,
                                                                  65_536, 65_537, 1 << 20)}
    raise AssertionError(shape)


SHAPES = ["empty-files", "unicode-names", "hundreds-of-small-files", "deep-nesting",
          "mixed-sizes"]


@pytest.mark.parametrize("shape", SHAPES)
def test_content_length_is_the_body_length(client, logs_dir, shape):
    files = shape_files(shape)
    job = bare_job(logs_dir, "shape", files)
    (job / "empty-folder").mkdir()
    head = client.head(MODEL_URL.format("shape"))
    response = client.get(MODEL_URL.format("shape"))

    assert response.status_code == 200
    assert int(response.headers["Content-Length"]) == len(response.data)
    assert head.headers["Content-Length"] == response.headers["Content-Length"]
    zf = round_trip(response.data, files, "job_shape/")
    assert zf.getinfo("job_shape/empty-folder/").is_dir()


@pytest.mark.parametrize("shape", SHAPES)
def test_small_archive_size_follows_the_zip32_formula(client, logs_dir, shape):
    files = shape_files(shape)
    bare_job(logs_dir, "shape", files)
    expected = END32 + sum(ZIP32_MEMBER + 2 * len(f"job_shape/{name}".encode()) + len(data)
                           for name, data in files.items())
    assert int(client.head(MODEL_URL.format("shape")).headers["Content-Length"]) == expected


@pytest.mark.parametrize("shape", ["unicode-names", "deep-nesting"])
def test_checkpoint_archive_content_length_is_the_body_length(client, logs_dir, shape):
    files = shape_files(shape)
    write_job(logs_dir, "ck", checkpoints=(10,), log=None,
              extra_files={f"checkpoint-10/{k}": v for k, v in files.items()})
    response = client.get(MODEL_URL.format("ck") + "?checkpoint=checkpoint-10")
    assert int(response.headers["Content-Length"]) == len(response.data)
    zf = open_zip(response.data)
    assert zf.testzip() is None
    assert {k: v for k, v in zip_files(zf, "checkpoint-10/").items() if k in files} == files


# -- more than 65,535 members --------------------------------------------------------


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> tuple[t.Any, Path]:
    """65,600 tiny files: 65,535 in checkpoint-1/ and 65 more next to it."""
    root = tmp_path_factory.mktemp("many")
    logs = root / "logs"
    job = bare_job(logs, "many", {})
    for folder, count in (("checkpoint-1", 65_535), ("extra", 65)):
        (job / folder).mkdir()
        for i in range(count):
            fd = os.open(job / folder / f"{i:05d}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, f"{folder}:{i}".encode())
            os.close(fd)
    return make_app(logs, root / "cache").test_client(), job


def test_more_than_65535_members_make_a_valid_zip64_archive(many):
    client, job = many
    response = client.get(MODEL_URL.format("many"))
    body = response.data
    assert response.status_code == 200
    assert int(response.headers["Content-Length"]) == len(body)
    zf = open_zip(body)
    infos = zf.infolist()
    assert len(infos) == 65_600
    assert zf.testzip() is None
    assert zf.read("job_many/checkpoint-1/65534") == b"checkpoint-1:65534"
    assert zf.read("job_many/extra/00064") == b"extra:64"
    assert {"PK\x06\x06".encode(), b"PK\x06\x07"} <= tail_records(body)

    names = [i.filename.encode() for i in infos]
    # The first member fits ZIP32; every other one carries ZIP64 fields.
    expected = END64 + ZIP32_MEMBER + 2 * len(names[0]) + infos[0].file_size + sum(
        ZIP64_MEMBER + 2 * len(n) + i.file_size for n, i in zip(names[1:], infos[1:]))
    assert len(body) == expected
    assert ZIP64_EXTRA_ID not in local_header(body, 0)["extra_ids"]
    assert ZIP64_EXTRA_ID in local_header(body, infos[1].header_offset)["extra_ids"]

    tail = client.get(MODEL_URL.format("many"), headers={"Range": "bytes=-300000"})
    assert tail.status_code == 206
    assert tail.data == body[-300_000:]


def test_exactly_65535_members_stay_zip32(many):
    client, _ = many
    response = client.get(MODEL_URL.format("many") + "?checkpoint=checkpoint-1")
    body = response.data
    assert int(response.headers["Content-Length"]) == len(body)
    zf = open_zip(body)
    assert len(zf.infolist()) == 65_535
    assert zf.read("checkpoint-1/00000") == b"checkpoint-1:0"
    assert tail_records(body) == {b"PK\x05\x06"}
    count = struct.unpack_from("<H", body, len(body) - 22 + 10)[0]
    assert count == 65_535


# -- (c) timestamps ------------------------------------------------------------------------


def ns(year: int, *rest: int) -> int:
    return int(datetime(year, *rest, tzinfo=timezone.utc).timestamp()) * 10**9


DOS_MIN = (1980, 1, 1, 0, 0, 0)
DOS_MAX = (2038, 1, 19, 3, 14, 6)  # 2**31 - 1 seconds, to MS-DOS's two seconds
TIMES = {
    "epoch.txt": (0, DOS_MIN, 315_532_800),
    "1979.txt": (ns(1979, 12, 31, 23, 59, 59), DOS_MIN, 315_532_800),
    "1980.txt": (ns(1980, 1, 1), DOS_MIN, 315_532_800),
    "2038-last.txt": (ns(2038, 1, 19, 3, 14, 7), DOS_MAX, 2**31 - 1),
    "2038-next.txt": (ns(2038, 1, 19, 3, 14, 8), DOS_MAX, 2**31 - 1),
    "2040.txt": (ns(2040, 6, 1), DOS_MAX, 2**31 - 1),
    "2107.txt": (ns(2107, 12, 31), DOS_MAX, 2**31 - 1),
    "2110.txt": (ns(2110, 1, 1), DOS_MAX, 2**31 - 1),
}


def ut_seconds(extra: bytes) -> int:
    pos = 0
    while pos < len(extra):
        header_id, length = struct.unpack_from("<HH", extra, pos)
        if header_id == 0x5455:
            return struct.unpack_from("<l", extra, pos + 5)[0]
        pos += 4 + length
    raise AssertionError("no extended timestamp")


@pytest.mark.parametrize("route", ["model", "checkpoint", "deflate", "logs"])
def test_times_outside_zip_range_are_clamped_never_raised(client, logs_dir, route):
    job = write_job(logs_dir, "ts", checkpoints=(10,), log="inside",
                    extra_files={f"checkpoint-10/{name}": name for name in TIMES})
    (job / "checkpoint-10" / "future-folder").mkdir()
    for name, (when, _, _) in TIMES.items():
        os.utime(job / "checkpoint-10" / name, ns=(when, when))
    os.utime(job / "checkpoint-10" / "future-folder", ns=(ns(2110, 1, 1),) * 2)
    os.utime(job / "job_ts.log", ns=(0, 0))
    os.utime(job / "progress.json", ns=(ns(2110, 1, 1),) * 2)
    url = {"model": MODEL_URL.format("ts"),
           "checkpoint": MODEL_URL.format("ts") + "?checkpoint=checkpoint-10",
           "deflate": MODEL_URL.format("ts") + "?compression=deflate",
           "logs": "/api/training/ts/download/logs"}[route]

    response = client.get(url)
    assert response.status_code == 200
    if "Content-Length" in response.headers:
        assert int(response.headers["Content-Length"]) == len(response.data)
    zf = open_zip(response.data)
    assert zf.testzip() is None
    modified = parse_date(response.headers["Last-Modified"])
    assert modified is not None and modified <= datetime.now(timezone.utc)
    if route == "logs":
        dates = {i.filename: i.date_time for i in zf.infolist()}
        assert dates == {"logs/training.log": DOS_MIN, "logs/progress.json": DOS_MAX}
        return
    prefix = "checkpoint-10/" if route == "checkpoint" else "job_ts/checkpoint-10/"
    for name, (_, dos, unix) in TIMES.items():
        info = zf.getinfo(prefix + name)
        assert info.date_time == dos, name
        assert ut_seconds(info.extra) == unix, name
        assert zf.read(info) == name.encode()
    assert zf.getinfo(prefix + "future-folder/").date_time == DOS_MAX


def test_ranges_over_clamped_times_match_the_full_archive(client, logs_dir):
    job = bare_job(logs_dir, "ts", {name: name for name in TIMES})
    for name, (when, _, _) in TIMES.items():
        os.utime(job / name, ns=(when, when))
    full = client.get(MODEL_URL.format("ts")).data
    for start in range(0, len(full), 97):
        part = client.get(MODEL_URL.format("ts"), headers={"Range": f"bytes={start}-"})
        assert part.data == full[start:], start


def test_listing_times_of_old_and_future_files(client, logs_dir):
    job = write_job(logs_dir, "ts", checkpoints=(10, 20), log=None)
    for path in (job / "checkpoint-10").iterdir():
        os.utime(path, ns=(0, 0))
    for path in (job / "checkpoint-20").iterdir():
        os.utime(path, ns=(ns(2110, 1, 1),) * 2)
    listed = client.get("/api/training/checkpoints/ts").get_json()["checkpoints"]
    assert [c["modified"] for c in listed] == ["1970-01-01T00:00:00Z", "2110-01-01T00:00:00Z"]


# -- (e) ZIP32 throughout for small archives -------------------------------------------------


@pytest.mark.parametrize("query", ["", "?checkpoint=checkpoint-10"])
def test_small_archives_have_no_zip64_anywhere(client, make_job, query):
    make_job(checkpoints=(10, 20), sharded=True)
    body = client.get(MODEL_URL.format("abc123") + query).data
    zf = open_zip(body)
    for info in zf.infolist():
        header = local_header(body, info.header_offset)
        assert header["name"] == info.filename
        assert ZIP64_EXTRA_ID not in header["extra_ids"], info.filename
        assert ZIP64_EXTRA_ID not in extra_ids(info.extra), info.filename
        assert header["version"] == 20 and header["method"] == 0
        assert header["size"] == header["compressed_size"] == info.file_size
        assert not header["flags"] & 0x08  # sizes and CRC up front: no data descriptor
        assert header["crc"] == info.CRC == zlib.crc32(zf.read(info))
    assert tail_records(body) == {b"PK\x05\x06"}


# -- (b, d, e) a member past 4 GiB ------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> dict[str, t.Any]:
    """A job whose sorted-first file is a 4.5 GiB sparse file, and one full download of it.

    The body is counted as it streams and written sparsely (zero chunks are
    seeked over), so neither memory nor disk holds 4.5 GiB.
    """
    root = tmp_path_factory.mktemp("big")
    logs = root / "logs"
    job = bare_job(logs, "big", {"config.json": '{"model_type": "llama"}',
                                 "tokenizer.json": noise(7, 5000).hex(),
                                 "zz-last.bin": noise(8, 70_000)})
    sparse_file(job / "aaa-huge.bin", BIG)
    client = make_app(logs, root / "cache").test_client()
    head = client.head(MODEL_URL.format("big"))
    response = client.get(MODEL_URL.format("big"), buffered=False)
    writer = SparseWriter(root / "download.zip")
    try:
        length = stream_body(response, writer.write)
    finally:
        writer.close()
    return {"client": client, "job": job, "head": head, "response": response,
            "length": length, "path": writer.path}


def test_content_length_is_the_body_length_past_4_gib(big):
    assert big["response"].status_code == 200
    assert int(big["response"].headers["Content-Length"]) == big["length"]
    assert big["head"].headers["Content-Length"] == big["response"].headers["Content-Length"]
    assert big["length"] > BIG


def test_archive_past_4_gib_opens_and_its_small_members_round_trip(big):
    job = big["job"]
    with zipfile.ZipFile(big["path"]) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        huge = infos["job_big/aaa-huge.bin"]
        assert huge.file_size == huge.compress_size == BIG
        crc = 0
        zeros = bytes(1 << 24)
        for _ in range(BIG // len(zeros)):
            crc = zlib.crc32(zeros, crc)
        assert huge.CRC == crc
        # Opening a member checks its local header where the central directory says.
        for name in ("config.json", "tokenizer.json", "zz-last.bin"):
            assert zf.read(f"job_big/{name}") == (job / name).read_bytes()
        assert infos["job_big/zz-last.bin"].header_offset > BIG


def test_first_member_is_small_and_zip32_even_when_the_sorted_first_is_huge(big):
    response = big["client"].get(MODEL_URL.format("big"), headers={"Range": "bytes=0-99"})
    assert response.status_code == 206
    first = local_header(response.data, 0)
    assert first["name"] != "job_big/aaa-huge.bin"
    assert first["version"] == 20
    assert ZIP64_EXTRA_ID not in first["extra_ids"]
    assert first["size"] < 0xFFFFFFFF
    with zipfile.ZipFile(big["path"]) as zf:
        names = [i.filename for i in zf.infolist()]
    assert names[0] == first["name"]
    assert sorted(names)[0] == "job_big/aaa-huge.bin"


def test_archive_past_4_gib_uses_zip64(big):
    with open(big["path"], "rb") as f:
        data_at = {}
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
        for info in infos:
            f.seek(info.header_offset)
            data_at[info.filename] = local_header(f.read(30 + 1024), 0)
        f.seek(-200, os.SEEK_END)
        tail = f.read()
    huge = data_at["job_big/aaa-huge.bin"]
    assert ZIP64_EXTRA_ID in huge["extra_ids"]
    assert huge["size"] == huge["compressed_size"] == 0xFFFFFFFF
    assert huge["version"] == 45
    by_name = {i.filename: i for i in infos}
    assert ZIP64_EXTRA_ID in extra_ids(by_name["job_big/aaa-huge.bin"].extra)
    # Members whose header lies past 4 GiB need ZIP64 offsets.
    assert ZIP64_EXTRA_ID in extra_ids(by_name["job_big/zz-last.bin"].extra)
    assert {b"PK\x06\x06", b"PK\x06\x07", b"PK\x05\x06"} <= tail_records(tail)
    assert ZIP64_EXTRA_ID not in data_at[infos[0].filename]["extra_ids"]


def test_last_64_kib_of_a_huge_archive_by_range(big, reads, tmp_path):
    size = big["length"]
    response = big["client"].get(MODEL_URL.format("big"), headers={"Range": "bytes=-65536"})
    assert response.status_code == 206
    assert response.headers["Content-Range"] == f"bytes {size - 65536}-{size - 1}/{size}"
    with open(big["path"], "rb") as f:
        f.seek(size - 65536)
        assert response.data == f.read()
    # The cache is warm from the full download: only the member under the range is read.
    assert {path for path, _, _ in reads} <= {"zz-last.bin"}

    # The tail alone, placed at its offset in a sparse file, is a readable central directory.
    partial = tmp_path / "tail.zip"
    with open(partial, "wb") as f:
        f.truncate(size)
        f.seek(size - 65536)
        f.write(response.data)
    with zipfile.ZipFile(partial) as zf:
        assert {i.filename: i.file_size for i in zf.infolist()}["job_big/aaa-huge.bin"] == BIG
