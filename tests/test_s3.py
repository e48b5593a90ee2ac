"""Jobs on object storage: a real S3 API server (moto's server mode) on loopback.

The same Trainer job is served from local disk and from ``s3://`` (uploaded
with and without stored CRC-32 checksums); every route must answer the same,
and every archive member must hold the same bytes (times come from the
storage). Requests the S3 server received are counted from its log, to show
that HEAD and Range read no member bodies when checksums are stored, and
that a range reads only the objects and spans it covers. Faults run through
a real gunicorn: an object deleted mid-download, the endpoint killed
mid-stream, throttled (503 SlowDown) and slow responses.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import os
import socket
import sys
import time
import typing as t
import urllib.parse
import urllib.request
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

try:
    from tests.helpers import make_app, wait_for
    from tests.jobtree import make_job
    from tests.motoserver import AWS_ENV, FaultProxy, MotoServer, need_s3, s3_client, upload_tree
    from tests.server import GunicornServer, free_port
except ImportError:  # tests/ itself on sys.path
    from helpers import make_app, wait_for  # type: ignore[no-redef]
    from jobtree import make_job  # type: ignore[no-redef]
    from motoserver import (AWS_ENV, FaultProxy, MotoServer, need_s3,  # type: ignore[no-redef]
                            s3_client, upload_tree)
    from server import GunicornServer, free_port  # type: ignore[no-redef]

from flask_artifacts.errors import StreamError

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the servers are run and watched as on Linux")

MiB = 1 << 20
BUCKET = "artifacts"
JOB = "abc123"
MODEL = f"/api/training/{JOB}/download/model"


class Bucket(t.NamedTuple):
    name: str
    moto: MotoServer


def noise(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[MotoServer]:
    """One moto server for the module; the in-process apps find it through AWS_* variables."""
    need_s3()
    with MotoServer(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        saved = {k: os.environ.get(k) for k in (*AWS_ENV, "AWS_ENDPOINT_URL")}
        os.environ.update(server.env())
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The jobs on local disk: the reference every S3 answer is compared with."""
    root = tmp_path_factory.mktemp("s3-jobs") / "logs"
    make_job(root, JOB, best_checkpoint=20, extra_files={"weights/big.bin": noise(1, 3 * MiB)})
    make_job(root, "running1", status="running", checkpoints=(10,))
    return root


@pytest.fixture(scope="module")
def bucket(moto: MotoServer, logs: Path) -> Bucket:
    """The same jobs under ``crc/`` (CRC-32 stored with each object) and ``plain/`` (none)."""
    upload_tree(moto.endpoint, BUCKET, "crc", logs, checksums=True)
    upload_tree(moto.endpoint, BUCKET, "plain", logs, checksums=False)
    return Bucket(BUCKET, moto)


def s3_app(prefix: str, cache_dir: Path, **config: t.Any) -> t.Any:
    options = {"skip_instance_cache": True, **config.pop("ARTIFACTS_STORAGE_OPTIONS", {})}
    return make_app(f"s3://{BUCKET}/{prefix}", cache_dir, ARTIFACTS_SETTLE_SECONDS=0,
                    ARTIFACTS_STORAGE_OPTIONS=options, **config)


def local_app(logs: Path, cache_dir: Path, **config: t.Any) -> t.Any:
    return make_app(logs, cache_dir, ARTIFACTS_SETTLE_SECONDS=0, **config)


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        return {info.filename: archive.read(info) for info in archive.infolist()}


def without_times(value: t.Any) -> t.Any:
    """JSON with the fields that come from the storage's clock (and so the ETag) left out."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in ("modified", "etag")}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def job_files(logs: Path, job_id: str = JOB) -> list[str]:
    base = logs / f"job_{job_id}"
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())


# -- every route, the same answer --------------------------------------------------

ROUTES = [
    MODEL,
    f"{MODEL}?checkpoint=checkpoint-10",
    f"{MODEL}?checkpoint=latest",
    f"{MODEL}?checkpoint=best",
    f"{MODEL}?preset=weights",
    f"{MODEL}?checkpoint=best&preset=weights",
    f"{MODEL}?include=**/*.json&exclude=checkpoint-*/**",
    f"{MODEL}?sha256sums=1",
    f"{MODEL}?compression=deflate",
    f"{MODEL}?checkpoint=checkpoint-99",
    f"{MODEL}?preset=bogus",
    f"{MODEL}?include=nothing-matches",
    f"/api/training/{JOB}/download/logs",
    "/api/training/running1/download/model",
    "/api/training/running1/download/model?checkpoint=checkpoint-10",
    "/api/training/running1/download/logs",
    "/api/training/nope/download/model",
    f"/api/training/checkpoints/{JOB}",
    "/api/training/checkpoints/running1",
    f"/api/training/{JOB}/manifest",
    f"/api/training/{JOB}/manifest?checkpoint=best&sha256=1",
    f"/api/training/{JOB}/logs/training.log",
    f"/api/training/{JOB}/files/nope.bin",
    f"/api/training/{JOB}/files/checkpoint-10//config.json",
    f"/api/training/{JOB}/files/..%2Fjob_running1.log",
    "/api/training/jobs",
    "/jobs",
    f"/jobs/{JOB}",
    "/healthz",
]


@pytest.mark.parametrize("prefix", ["crc", "plain"])
def test_every_route_answers_as_from_local_disk(bucket, logs, prefix, tmp_path):
    local = local_app(logs, tmp_path / "local-cache").test_client()
    remote = s3_app(prefix, tmp_path / "s3-cache").test_client()
    files = [f"/api/training/{JOB}/files/{rel}" for rel in job_files(logs)]
    for url in ROUTES + files:
        want, got = local.get(url), remote.get(url)
        assert (got.status_code, got.mimetype) == (want.status_code, want.mimetype), (url, got.data[:300])
        if want.mimetype == "application/zip":
            assert got.headers.get("Content-Length") == want.headers.get("Content-Length"), url
            assert members(got.data) == members(want.data), url
        elif want.mimetype == "application/json":
            a, b = without_times(want.get_json()), without_times(got.get_json())
            if url == "/api/training/jobs":
                a["jobs"].sort(key=lambda j: j["job_id"])
                b["jobs"].sort(key=lambda j: j["job_id"])
            assert b == a, url
        elif want.mimetype == "text/html":
            assert JOB in got.get_data(as_text=True), url
        else:
            assert got.data == want.data, url
    # Ranges of single files come from the object too.
    for url in files[:3] + [f"/api/training/{JOB}/logs/training.log"]:
        want = local.get(url, headers={"Range": "bytes=-100"})
        got = remote.get(url, headers={"Range": "bytes=-100"})
        assert (got.status_code, got.data) == (want.status_code, want.data)


def test_stored_checksums_are_the_member_crcs(bucket, logs, tmp_path):
    from flask_artifacts.extension import get_store

    for prefix, stored in (("crc", True), ("plain", False)):
        app = s3_app(prefix, tmp_path / prefix)
        with app.test_request_context():
            store = get_store()
            entries = store.scan(store.job(JOB), check_readable=True)
        assert [e.path for e in entries] == job_files(logs)
        for entry in entries:
            expected = zlib.crc32((logs / f"job_{JOB}" / entry.path).read_bytes())
            assert entry.crc32 == (expected if stored else None), entry.path


# -- requests the storage received -----------------------------------------------------


def member_gets(moto: MotoServer, since: int, prefix: str, job_id: str = JOB) -> list[t.Any]:
    """GETs of the job's objects since ``since``, except progress.json (the job's status)."""
    return [r for r in moto.object_gets(since, BUCKET, f"{prefix}/job_{job_id}/")
            if not r.path.endswith("/progress.json")]


def layout(data: bytes) -> dict[str, tuple[int, int]]:
    """Each member's (data offset, size) in a stored archive."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28],
                                                 "little"), \
                int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
            out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def test_head_and_ranges_read_no_member_bodies_when_checksums_are_stored(bucket, logs, tmp_path):
    moto = bucket.moto
    full = local_app(logs, tmp_path / "local").test_client().get(MODEL)
    expected = s3_app("crc", tmp_path / "first").test_client().get(MODEL).data
    assert members(expected) == members(full.data)

    # A new host: nothing cached, not even in memory.
    client = s3_app("crc", tmp_path / "second").test_client()
    mark = moto.mark()
    head = client.head(MODEL)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(expected)
    assert head.headers["Accept-Ranges"] == "bytes"
    heads = [r.path for r in moto.requests(mark) if r.method == "HEAD"
             and r.path.startswith(f"/{BUCKET}/crc/job_{JOB}/")]
    assert heads and len(heads) == len(set(heads)), heads  # each object once, at most

    with zipfile.ZipFile(io.BytesIO(expected)) as archive:
        directory = archive.start_dir
    tail = client.get(MODEL, headers={"Range": f"bytes={directory}-"})  # the central directory
    assert tail.status_code == 206 and tail.data == expected[directory:]
    spans = layout(expected)
    big_offset, big_size = spans[f"job_{JOB}/weights/big.bin"]
    start = big_offset + MiB + 7
    middle = client.get(MODEL, headers={"Range": f"bytes={start}-{start + 99_999}",
                                        "If-Range": head.headers["ETag"]})
    assert middle.status_code == 206 and middle.data == expected[start:start + 100_000]
    gets = member_gets(moto, mark, "crc")
    # Only the object the middle range lies in, and only its span (one ranged GET).
    assert [(r.path, r.status) for r in gets] == [(f"/{BUCKET}/crc/job_{JOB}/weights/big.bin", 206)]
    # The plan is in memory now: a second HEAD asks the storage for no checksum again.
    mark = moto.mark()
    assert client.head(MODEL).headers["ETag"] == head.headers["ETag"]
    assert [r for r in moto.requests(mark) if r.method == "HEAD"
            and r.path.startswith(f"/{BUCKET}/crc/job_{JOB}/")] == []


def test_without_stored_checksums_the_first_range_reads_then_the_cache_answers(bucket, logs, tmp_path):
    moto = bucket.moto
    expected = s3_app("plain", tmp_path / "a").test_client().get(MODEL).data
    cache = tmp_path / "shared-cache"
    with zipfile.ZipFile(io.BytesIO(expected)) as archive:
        directory = f"bytes={archive.start_dir}-"  # the central directory only
    mark = moto.mark()
    first = s3_app("plain", cache).test_client().get(MODEL, headers={"Range": directory})
    assert first.status_code == 206 and first.data == expected[-len(first.data):]
    read = {r.path for r in member_gets(moto, mark, "plain")}
    in_archive = [rel for rel in job_files(logs) if rel != "progress.json"]
    assert read == {f"/{BUCKET}/plain/job_{JOB}/{rel}" for rel in in_archive}  # a CRC pass
    mark = moto.mark()
    again = s3_app("plain", cache).test_client().get(MODEL, headers={"Range": directory})
    assert again.data == first.data
    assert member_gets(moto, mark, "plain") == []


def test_plan_and_bytes_agree_across_hosts(bucket, tmp_path):
    """Two hosts (own caches, read-ahead 1 and 8) give the same ETag and bytes."""
    one = s3_app("crc", tmp_path / "one", ARTIFACTS_READ_AHEAD=1).test_client()
    two = s3_app("crc", tmp_path / "two", ARTIFACTS_READ_AHEAD=8,
                 ARTIFACTS_CHUNK_SIZE=64 * 1024).test_client()
    a, b = one.get(MODEL), two.get(MODEL)
    assert a.headers["ETag"] == b.headers["ETag"]
    assert a.data == b.data
    cut = len(a.data) // 2
    rest = two.get(MODEL, headers={"Range": f"bytes={cut}-", "If-Range": a.headers["ETag"]})
    assert rest.status_code == 206 and a.data[:cut] + rest.data == a.data


def test_composite_checksums_of_multipart_uploads_are_not_used(bucket, tmp_path):
    client = s3_client(bucket.moto.endpoint)
    key = "multipart/job_mp/weights.bin"
    parts, data = [], b""
    upload = client.create_multipart_upload(Bucket=BUCKET, Key=key, ChecksumAlgorithm="CRC32")
    for number in (1, 2):
        part = noise(number, 5 * MiB + number)
        data += part
        answer = client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload["UploadId"],
                                    PartNumber=number, Body=part, ChecksumAlgorithm="CRC32")
        parts.append({"ETag": answer["ETag"], "PartNumber": number,
                      "ChecksumCRC32": answer["ChecksumCRC32"]})
    client.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": parts})
    client.put_object(Bucket=BUCKET, Key="multipart/job_mp/progress.json",
                      Body=b'{"status": "completed"}', ChecksumAlgorithm="CRC32")
    head = client.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    assert head.get("ChecksumCRC32") != _b64crc(data)  # what the storage keeps is not the CRC

    response = s3_app("multipart", tmp_path / "cache").test_client().get(
        "/api/training/mp/download/model")
    assert response.status_code == 200
    assert members(response.data) == {"job_mp/weights.bin": data}


def _b64crc(data: bytes) -> str:
    import base64

    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


# -- object keys are untrusted names -----------------------------------------------


def test_unsafe_keys_are_left_out_and_never_escape_the_job(bucket, tmp_path, caplog):
    base = tmp_path / "logs"
    make_job(base, JOB, checkpoints=(10,))
    upload_tree(bucket.moto.endpoint, BUCKET, "evil", base)
    client = s3_client(bucket.moto.endpoint)
    bad = ["../escape.txt", "./dot.txt", "a//b.txt", "back\\slash.txt", "ctl\x01.txt",
           "trailing/./x.txt", "checkpoint-10/../../job_other/x.txt", "weird/"]
    for rel in bad:
        client.put_object(Bucket=BUCKET, Key=f"evil/job_{JOB}/{rel}", Body=b"bad")
    client.put_object(Bucket=BUCKET, Key=f"evil/job_{JOB}/both", Body=b"file and folder")
    client.put_object(Bucket=BUCKET, Key=f"evil/job_{JOB}/both/inner.txt", Body=b"inner")
    client.put_object(Bucket=BUCKET, Key=f"evil/job_{JOB}/empty/", Body=b"")
    client.put_object(Bucket=BUCKET, Key=f"evil/job_{JOB}x/secret.txt", Body=b"another job")

    expected = local_app(base, tmp_path / "local").test_client().get(MODEL)
    app = s3_app("evil", tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="flask_artifacts"):
        response = app.test_client().get(MODEL)
    assert response.status_code == 200
    got = members(response.data)
    want = members(expected.data)
    assert set(got) == set(want) | {f"job_{JOB}/empty/", f"job_{JOB}/both/inner.txt"}
    assert all(got[name] == want[name] for name in want)
    for name in got:
        assert ".." not in name.split("/") and "\\" not in name and "\x01" not in name
        assert "secret" not in name and "escape" not in name
    warned = caplog.text
    for rel in bad:
        assert repr(rel) in warned, rel
    assert "'both'" in warned
    client_app = app.test_client()
    for path in ("..%2Fescape.txt", "a//b.txt", "./dot.txt", "back%5Cslash.txt", "ctl%01.txt"):
        answer = client_app.get(f"/api/training/{JOB}/files/{path}")
        assert answer.status_code == 400 and answer.get_json()["error"] == "invalid_path", path
    # job_abc123x is a job of its own; nothing of it is in job_abc123's manifest.
    manifest = client_app.get(f"/api/training/{JOB}/manifest").get_json()
    assert not any("secret" in m["name"] for m in manifest["members"])


def test_jobs_whose_ids_share_a_prefix_stay_apart(bucket, tmp_path):
    from flask_artifacts.objectstore import FsspecStore

    client = s3_client(bucket.moto.endpoint)
    for key in ("job_1/config.json", "job_1/checkpoint-5/trainer_state.json", "job_1.log",
                "job_10/config.json", "job_10_progress.json", "job_100/x.bin", "job_logonly.log",
                "job_1x.log", "notajob.txt"):
        client.put_object(Bucket=BUCKET, Key=f"siblings/{key}", Body=key.encode())
    store = FsspecStore(f"s3://{BUCKET}/siblings", {"skip_instance_cache": True})
    assert store.job_ids() == ["1", "10", "100", "1x", "logonly"]
    one = store.job("1")
    assert one.log is not None and one.log.locator.endswith("/siblings/job_1.log")
    assert one.progress is None
    assert [e.path for e in store.scan(one)] == ["checkpoint-5/trainer_state.json", "config.json"]
    assert [c.name for c in store.checkpoints(one)] == ["checkpoint-5"]
    ten = store.job("10")
    assert ten.log is None and ten.progress is not None
    assert [e.path for e in store.scan(ten)] == ["config.json"]
    only_log = store.job("logonly")
    assert only_log.root is None and only_log.log is not None and store.scan(only_log) == []
    app = s3_app("siblings", tmp_path / "cache")
    logs = app.test_client().get("/api/training/logonly/download/logs")
    assert logs.status_code == 200 and members(logs.data) == {"logs/training.log": b"job_logonly.log"}
    assert app.test_client().get("/api/training/2/download/logs").status_code == 404


# -- reads --------------------------------------------------------------------------


def test_read_ahead_is_bounded_ordered_and_cancelled_on_close(bucket, logs, monkeypatch):
    from flask_artifacts import objectstore

    moto = bucket.moto
    store = objectstore.FsspecStore(f"s3://{BUCKET}/crc", {"skip_instance_cache": True}, read_ahead=3)
    entry = next(e for e in store.scan(store.job(JOB)) if e.path == "weights/big.bin")
    data = (logs / f"job_{JOB}" / "weights" / "big.bin").read_bytes()
    live: set[t.Any] = set()
    peak = [0]
    opened, closed = objectstore._Part.open, objectstore._Part.close

    async def counting_open(part: t.Any) -> t.Any:
        live.add(part)
        peak[0] = max(peak[0], len(live))
        return await opened(part)

    def counting_close(part: t.Any) -> None:
        live.discard(part)
        closed(part)

    monkeypatch.setattr(objectstore, "MAX_PART", 256 * 1024)  # many parts of a small object
    monkeypatch.setattr(objectstore._Part, "open", counting_open)
    monkeypatch.setattr(objectstore._Part, "close", counting_close)
    chunk = 64 * 1024
    key = f"/{BUCKET}/crc/job_{JOB}/weights/big.bin"

    mark = moto.mark()
    pieces = list(store.read(entry, chunk_size=chunk))
    assert b"".join(pieces) == data and {len(p) for p in pieces[:-1]} == {chunk}
    assert peak[0] == store.read_ahead  # parts ahead were open, never more
    # One chunk first, then large parts: few GETs for a large object.
    assert [r.path for r in moto.object_gets(mark, BUCKET)] == [key] * len(
        objectstore._parts(0, len(data), chunk))

    # A span reads only itself.
    mark = moto.mark()
    assert b"".join(store.read(entry, 12_345, 200_000, chunk_size=chunk)) == data[12_345:212_345]
    gets = moto.object_gets(mark, BUCKET)
    assert [(r.path, r.status) for r in gets] == [(key, 206)] * len(
        objectstore._parts(12_345, 200_000, chunk))

    # Closing mid-way closes every open part and fetches nothing more.
    mark = moto.mark()
    reader = store.read(entry, chunk_size=chunk)
    assert next(reader) == data[:chunk]
    reader.close()
    assert wait_for(lambda: not live, 5), live
    time.sleep(0.2)
    assert len(moto.object_gets(mark, BUCKET)) <= store.read_ahead


def test_replaced_or_deleted_object_ends_the_stream(bucket, tmp_path):
    moto = bucket.moto
    for change in ("replace", "shorten", "delete"):
        prefix = f"mutate-{change}"
        base = tmp_path / change
        make_job(base, JOB, checkpoints=(), extra_files={
            "weights/part-1.bin": noise(11, 2 * MiB), "weights/part-2.bin": noise(12, 2 * MiB)})
        upload_tree(moto.endpoint, BUCKET, prefix, base)
        app = s3_app(prefix, tmp_path / f"cache-{change}", ARTIFACTS_CHUNK_SIZE=64 * 1024)
        response = app.test_client().get(MODEL, buffered=False)
        length = int(response.headers["Content-Length"])
        chunks = iter(response.response)
        received = next(chunks)
        key = f"{prefix}/job_{JOB}/weights/part-2.bin"
        client = s3_client(moto.endpoint)
        if change == "delete":
            client.delete_object(Bucket=BUCKET, Key=key)
        else:
            size = 2 * MiB if change == "replace" else MiB
            client.put_object(Bucket=BUCKET, Key=key, Body=noise(99, size), ChecksumAlgorithm="CRC32")
        with pytest.raises(StreamError):
            for chunk in chunks:
                received += chunk
        response.close()
        assert len(received) < length, change
        with pytest.raises(zipfile.BadZipFile):
            zipfile.ZipFile(io.BytesIO(received))


# -- presigned redirects and health ----------------------------------------------------


def test_single_files_redirect_to_presigned_urls(bucket, logs, tmp_path):
    app = s3_app("crc", tmp_path / "cache", ARTIFACTS_PRESIGNED_REDIRECTS=True)
    client = app.test_client()
    url = f"/api/training/{JOB}/files/checkpoint-10/optimizer.pt"
    response = client.get(url)
    assert response.status_code == 307
    assert response.headers["Cache-Control"] == "no-store"
    location = response.headers["Location"]
    assert location.startswith(bucket.moto.endpoint + "/")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
    assert 'filename="optimizer.pt"' in query["response-content-disposition"][0]
    data = (logs / f"job_{JOB}" / "checkpoint-10" / "optimizer.pt").read_bytes()
    with urllib.request.urlopen(location, timeout=10) as answer:
        assert answer.read() == data
        # moto honours response-content-disposition from 5.2.5 on (not 5.2.1).
        disposition = answer.headers.get("Content-Disposition")
        assert disposition is None or 'filename="optimizer.pt"' in disposition
    request = urllib.request.Request(location, headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 206 and answer.read() == data[10:20]
    # Errors and authorization come first, as without redirects.
    assert client.get(f"/api/training/{JOB}/files/nope.bin").status_code == 404
    app.extensions["artifacts"].artifacts.authorize(lambda job_id, kind, checkpoint: False)
    refused = client.get(url)
    assert refused.status_code == 403 and "Location" not in refused.headers
    # A local folder has no presigned URLs: the file is sent.
    local = local_app(logs, tmp_path / "local", ARTIFACTS_PRESIGNED_REDIRECTS=True).test_client()
    sent = local.get(url)
    assert sent.status_code == 200 and sent.data == data


def test_unreachable_storage_answers_503(moto, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    options = {"endpoint_url": dead, "config_kwargs": {"retries": {"max_attempts": 1},
                                                       "connect_timeout": 1}}
    client = s3_app("crc", tmp_path / "cache", ARTIFACTS_STORAGE_OPTIONS=options).test_client()
    started = time.monotonic()
    health = client.get("/healthz")
    assert health.status_code == 503 and health.get_json() == {"status": "unavailable"}
    assert time.monotonic() - started < 10
    answer = client.get(MODEL)
    assert answer.status_code == 503 and answer.get_json()["error"] == "storage_unavailable"
    assert answer.headers["Retry-After"]
    missing = make_app(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x", tmp_path / "c2",
                       ARTIFACTS_STORAGE_OPTIONS={"skip_instance_cache": True}).test_client()
    assert missing.get("/healthz").status_code == 503


def test_generic_fsspec_filesystems_serve_the_same_archive(logs, tmp_path):
    """Not only S3: any fsspec filesystem (here the in-memory one) through the same store."""
    pytest.importorskip("fsspec")
    import fsspec

    root = f"/fa-{uuid.uuid4().hex[:8]}"
    memory = fsspec.filesystem("memory")
    for path in (logs).rglob("*"):
        if path.is_file():
            memory.pipe_file(f"{root}/{path.relative_to(logs).as_posix()}", path.read_bytes())
    try:
        want = local_app(logs, tmp_path / "local").test_client().get(MODEL)
        got = make_app(f"memory://{root}", tmp_path / "mem", ARTIFACTS_SETTLE_SECONDS=0
                       ).test_client().get(MODEL)
        assert got.status_code == 200
        assert members(got.data) == members(want.data)
    finally:
        memory.rm(root, recursive=True)


# -- faults, through a real gunicorn --------------------------------------------------------

STORAGE_OPTIONS = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"},
                                     "connect_timeout": 2, "read_timeout": 10}}


def s3_gunicorn(tmp: Path, endpoint: str, prefix: str, **kwargs: t.Any) -> GunicornServer:
    (tmp / "unused").mkdir(parents=True, exist_ok=True)
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint, "LOGS_DIR": f"s3://{BUCKET}/{prefix}",
           "FLASK_ARTIFACTS_STORAGE_OPTIONS": json.dumps(STORAGE_OPTIONS),
           "FLASK_ARTIFACTS_SETTLE_SECONDS": "0"}
    return GunicornServer(tmp / "unused", tmp / "cache", extra_env=env,
                          log_file=tmp / "gunicorn.log", **kwargs)


def open_download(port: int, path: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A GET whose client holds a small TCP window, so the server cannot run far ahead."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", port))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.sock = sock
    conn.request("GET", path)
    response = conn.getresponse()
    assert response.status == 200, response.read()[:300]
    return conn, response


def read_all(response: http.client.HTTPResponse, limit: int = 1 << 62) -> bytes:
    parts, got = [], 0
    with contextlib.suppress(http.client.HTTPException, OSError):
        while got < limit:
            data = response.read(min(256 * 1024, limit - got))
            if not data:
                break
            parts.append(data)
            got += len(data)
    return b"".join(parts)


def get(port: int, path: str) -> tuple[int, bytes, http.client.HTTPMessage]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = read_all(response)
        return response.status, body, response.headers
    finally:
        conn.close()


def assert_valid_download(port: int, path: str, want: dict[str, bytes] | None = None) -> None:
    status, body, headers = get(port, path)
    assert status == 200, body[:300]
    assert len(body) == int(headers["Content-Length"])
    got = members(body)
    if want is not None:
        assert got == want


def big_job(base: Path, job_id: str, size: int = 16 * MiB) -> Path:
    """A finished job whose last members are a large object and a small one after it."""
    return make_job(base, job_id, checkpoints=(10,), extra_files={
        "weights/big.bin": noise(7, size), "weights/later.bin": noise(8, 100_000)})


def local_members(base: Path, job_id: str, tmp: Path) -> dict[str, bytes]:
    return members(local_app(base, tmp / f"ref-{job_id}").test_client().get(
        f"/api/training/{job_id}/download/model").data)


def test_faults_through_the_proxy_fail_visibly_and_the_worker_recovers(bucket, tmp_path):
    """Object deleted mid-download; 503 SlowDown mid-stream; slow storage."""
    moto = bucket.moto
    base = tmp_path / "logs"
    for job_id in ("keep", "gone"):
        big_job(base, job_id)
    make_job(base, "slow", checkpoints=(), extra_files={"weights/big.bin": noise(8, 2 * MiB)})
    upload_tree(moto.endpoint, BUCKET, "faults", base)
    keep = local_members(base, "keep", tmp_path)
    with FaultProxy(moto.port) as proxy, s3_gunicorn(tmp_path / "g", proxy.endpoint, "faults") as server:
        assert server.port is not None
        worker = server.worker_pids()
        assert_valid_download(server.port, "/api/training/keep/download/model", keep)

        # An object deleted while the archive streams, before its turn. (GETs
        # already answered keep streaming the listed version: S3 reads are
        # atomic per request, so what was opened is still the planned bytes.)
        conn, response = open_download(server.port, "/api/training/gone/download/model")
        length = int(response.headers["Content-Length"])
        head = read_all(response, 100_000)
        s3_client(moto.endpoint).delete_object(Bucket=BUCKET, Key="faults/job_gone/weights/later.bin")
        body = head + read_all(response)
        conn.close()
        assert len(body) < length
        with pytest.raises(zipfile.BadZipFile):
            zipfile.ZipFile(io.BytesIO(body))
        assert wait_for(lambda: "later.bin was deleted" in server.log, timeout=15, step=0.1), server.log[-3000:]

        # The endpoint starts refusing with 503 SlowDown mid-stream.
        conn, response = open_download(server.port, "/api/training/keep/download/model")
        length = int(response.headers["Content-Length"])
        head = read_all(response, 100_000)
        proxy.slowdown = True
        body = head + read_all(response)
        conn.close()
        assert len(body) < length and proxy.refused > 0
        assert wait_for(lambda: get(server.port, "/healthz")[0] == 503, timeout=15, step=0.1)
        proxy.slowdown = False
        assert wait_for(lambda: get(server.port, "/healthz")[0] == 200, timeout=15, step=0.1)
        assert_valid_download(server.port, "/api/training/keep/download/model", keep)

        # Slow but steady storage: the archive is whole, only later.
        proxy.rate = MiB  # per connection
        started = time.monotonic()
        assert_valid_download(server.port, "/api/training/slow/download/model",
                              local_members(base, "slow", tmp_path))
        assert time.monotonic() - started > 1.0
        proxy.rate = None
        assert server.worker_pids() == worker  # the same worker served everything


def test_endpoint_killed_mid_stream_fails_visibly_and_health_follows(tmp_path):
    need_s3()
    base = tmp_path / "logs"
    big_job(base, "kill")
    want = local_members(base, "kill", tmp_path)
    moto = MotoServer(tmp_path / "moto.log")
    with moto:
        upload_tree(moto.endpoint, BUCKET, "k", base)
        with s3_gunicorn(tmp_path / "g", moto.endpoint, "k") as server:
            assert server.port is not None
            worker = server.worker_pids()
            conn, response = open_download(server.port, "/api/training/kill/download/model")
            length = int(response.headers["Content-Length"])
            head = read_all(response, 100_000)
            moto.kill()
            body = head + read_all(response)
            conn.close()
            assert len(body) < length
            with pytest.raises(zipfile.BadZipFile):
                zipfile.ZipFile(io.BytesIO(body))
            assert wait_for(lambda: "stopped after" in server.log, timeout=15, step=0.1), server.log[-3000:]
            started = time.monotonic()
            assert get(server.port, "/healthz")[0] == 503
            assert time.monotonic() - started < 8
            status, answer, _ = get(server.port, "/api/training/kill/download/model")
            assert status == 503 and json.loads(answer)["error"] == "storage_unavailable"

            moto.start()  # same port, empty: the bucket is back only once re-uploaded
            assert get(server.port, "/healthz")[0] == 503
            upload_tree(moto.endpoint, BUCKET, "k", base)
            assert wait_for(lambda: get(server.port, "/healthz")[0] == 200, timeout=15, step=0.1)
            assert_valid_download(server.port, "/api/training/kill/download/model", want)
            assert server.worker_pids() == worker


def test_worker_memory_stays_bounded_while_streaming_from_s3(bucket, tmp_path):
    """A slow client of a 64 MiB object: read-ahead never piles the object up in the worker."""
    base = tmp_path / "logs"
    make_job(base, "mem", checkpoints=(), extra_files={"weights/big.bin": noise(9, 64 * MiB)})
    make_job(base, "warm", checkpoints=())
    upload_tree(bucket.moto.endpoint, BUCKET, "memory", base)
    with s3_gunicorn(tmp_path / "g", bucket.moto.endpoint, "memory") as server:
        assert server.port is not None
        assert_valid_download(server.port, "/api/training/warm/download/model")
        pid = server.worker_pids()[0]
        before = peak = server.rss_kib(pid)
        conn, response = open_download(server.port, "/api/training/mem/download/model")
        length, got = int(response.headers["Content-Length"]), 0
        while True:
            data = response.read(256 * 1024)
            if not data:
                break
            got += len(data)
            if got % (4 * MiB) < 256 * 1024:
                time.sleep(0.05)  # a slow reader: the server waits on the socket
                peak = max(peak, server.rss_kib(pid))
        conn.close()
        assert got == length
        # Single files stream through the same reads (no sendfile for objects).
        status, body, _ = get(server.port, "/api/training/mem/files/weights/big.bin")
        assert status == 200 and body == (base / "job_mem" / "weights" / "big.bin").read_bytes()
        # Four open GETs of 1 MiB chunks, plus stream-zip's chunk: far below the object.
        assert (peak - before) * 1024 < 24 * MiB, f"worker grew {(peak - before) // 1024} MiB"
