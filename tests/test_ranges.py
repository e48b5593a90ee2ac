"""Known size and resume: HEAD, validators, conditional requests, Range and the CRC cache."""

from __future__ import annotations

import os
import re
import shutil
import time
import typing as t
import zlib
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.http import http_date, parse_date

try:
    from tests.helpers import (
        LOGS_URL, MODEL_URL, assert_json_error, local_header, make_app, open_zip, zip_files)
    from tests.jobtree import files_under
    from tests.jobtree import make_job as write_job
except ImportError:  # tests/ itself on sys.path
    from helpers import (  # type: ignore[no-redef]
        LOGS_URL, MODEL_URL, assert_json_error, local_header, make_app, open_zip, zip_files)
    from jobtree import files_under  # type: ignore[no-redef]
    from jobtree import make_job as write_job  # type: ignore[no-redef]

URL = MODEL_URL.format("abc123")
CHECKPOINT_URL = URL + "?checkpoint=checkpoint-10"


def write_served_job(logs_dir: Path) -> Path:
    job = write_job(logs_dir, "abc123", checkpoints=(10, 20),
                    extra_files={"empty.txt": b"", "ünï/çødé.txt": "unicode\n"})
    (job / "emptydir").mkdir()
    return job


def layout(body: bytes) -> list[tuple[str, int, int, int]]:
    """``(name, header offset, data offset, data end)`` of each member, in order."""
    out = []
    for info in open_zip(body).infolist():
        data = local_header(body, info.header_offset)["data_offset"]
        out.append((info.filename, info.header_offset, data, data + info.compress_size))
    return out


def central_offset(body: bytes) -> int:
    return int.from_bytes(body[-6:-2], "little")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, t.Any]:
    """One job and one app for the whole module, with its full archive."""
    root = tmp_path_factory.mktemp("ranges")
    job = write_served_job(root / "logs")
    client = make_app(root / "logs", root / "cache").test_client()
    full = client.get(URL)
    assert full.status_code == 200
    return {"client": client, "job": job, "full": full, "body": full.data,
            "size": len(full.data), "root": root}


def get_range(client, value: str, url: str = URL, **headers: str):
    return client.get(url, headers={"Range": value, **headers})


def headers_of(response) -> list[tuple[str, str]]:
    return sorted(response.headers.items())


# -- HEAD ------------------------------------------------------------------------------


HEAD_CASES = {
    "model": (URL, {}),
    "checkpoint": (CHECKPOINT_URL, {}),
    "model-deflate": (URL + "?compression=deflate", {}),
    "checkpoint-deflate": (CHECKPOINT_URL + "&compression=deflate", {}),
    "logs": (LOGS_URL.format("abc123"), {}),
    "model-range": (URL, {"Range": "bytes=100-199"}),
    "checkpoint-suffix-range": (CHECKPOINT_URL, {"Range": "bytes=-1000"}),
    "unsatisfiable": (URL, {"Range": "bytes=999999999-"}),
    "not-completed": (MODEL_URL.format("busy"), {}),
    "unknown": (MODEL_URL.format("nope"), {}),
}


def test_head_answers_like_get_and_reads_nothing(client, logs_dir, make_job, reads):
    write_served_job(logs_dir)
    make_job("busy", status="running")
    heads = {}
    for name, (url, headers) in HEAD_CASES.items():
        heads[name] = client.head(url, headers=headers)
        assert heads[name].data == b"", name
    assert reads == []  # cold cache, and still no member was read

    for name, (url, headers) in HEAD_CASES.items():
        got = client.get(url, headers=headers)
        assert heads[name].status_code == got.status_code, name
        assert headers_of(heads[name]) == headers_of(got), name
        if "Content-Length" in got.headers and got.status_code != 304:
            assert int(got.headers["Content-Length"]) == len(got.data), name


def test_stored_archive_validators(served):
    headers = served["full"].headers
    assert re.fullmatch(r'"[^"\s]+"', headers["ETag"])
    assert headers["Accept-Ranges"] == "bytes"
    assert "private" in headers["Cache-Control"]
    assert int(headers["Content-Length"]) == served["size"]
    modified = parse_date(headers["Last-Modified"])
    top = served["job"].parent
    newest = max((top / name).stat().st_mtime_ns for name in open_zip(served["body"]).namelist())
    newest //= 10**9
    assert modified is not None and int(modified.timestamp()) == newest


@pytest.mark.parametrize("url", [URL + "?compression=deflate", CHECKPOINT_URL + "&compression=deflate",
                                 LOGS_URL.format("abc123")])
def test_deflated_archives_have_weak_etag_and_no_ranges(served, url):
    response = served["client"].get(url)
    assert response.status_code == 200
    assert response.headers["ETag"].startswith('W/"')
    assert response.headers["Accept-Ranges"] == "none"
    assert "Content-Length" not in response.headers
    assert open_zip(response.data).testzip() is None
    parse_date(response.headers["Last-Modified"])


def test_etag_does_not_depend_on_the_cache_or_the_host(served, tmp_path):
    client, etag = served["client"], served["full"].headers["ETag"]
    assert client.head(URL).headers["ETag"] == etag  # the cache is warm now

    # Another host over shared storage: same paths, sizes and times, other inodes.
    copy = tmp_path / "logs"
    shutil.copytree(served["root"] / "logs", copy, symlinks=True, copy_function=shutil.copy2)
    other = make_app(copy, tmp_path / "cache").test_client()
    response = other.get(URL)
    assert response.headers["ETag"] == etag
    assert response.headers["Last-Modified"] == served["full"].headers["Last-Modified"]
    assert response.data == served["body"]


# -- conditional requests -----------------------------------------------------------------


@pytest.mark.parametrize("url", [URL, CHECKPOINT_URL])
def test_if_none_match_answers_304(served, url):
    client = served["client"]
    etag = client.head(url).headers["ETag"]
    for value in (etag, f'"other", {etag}', "*", "W/" + etag):
        response = client.get(url, headers={"If-None-Match": value})
        assert response.status_code == 304, value
        assert response.data == b""
        assert response.headers["ETag"] == etag
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200


def test_if_modified_since_answers_304(served):
    client, modified = served["client"], parse_date(served["full"].headers["Last-Modified"])
    for when in (modified, modified + timedelta(days=1)):
        response = client.get(URL, headers={"If-Modified-Since": http_date(when)})
        assert response.status_code == 304
        assert response.data == b""
    earlier = http_date(modified - timedelta(seconds=1))
    response = client.get(URL, headers={"If-Modified-Since": earlier})
    assert response.status_code == 200 and response.data == served["body"]


# -- Range ----------------------------------------------------------------------------


def expected_span(value: str, size: int) -> tuple[int, int]:
    first, last = value.split("=", 1)[1].split("-")
    if not first:
        return max(size - int(last), 0), size
    return int(first), min(int(last) + 1, size) if last else size


@pytest.mark.parametrize("value", ["bytes=0-99", "bytes=100-", "bytes=-500", "bytes=7-7",
                                   "bytes=0-", "bytes=-1", "bytes=1000-99999999",
                                   "bytes=0-0"])
def test_single_range_is_206_with_the_slice_of_a_full_get(served, value):
    size, body = served["size"], served["body"]
    start, stop = expected_span(value, size)
    response = get_range(served["client"], value)
    assert response.status_code == 206
    assert response.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{size}"
    assert int(response.headers["Content-Length"]) == stop - start == len(response.data)
    assert response.data == body[start:stop]
    assert response.headers["ETag"] == served["full"].headers["ETag"]


@st.composite
def ranges(draw: st.DrawFn, size: int) -> tuple[str, int, int]:
    kind = draw(st.sampled_from(["closed", "open", "suffix"]))
    if kind == "suffix":
        n = draw(st.integers(1, size))
        return f"bytes=-{n}", max(size - n, 0), size
    start = draw(st.integers(0, size - 1))
    if kind == "open":
        return f"bytes={start}-", start, size
    last = draw(st.integers(start, size + 100))
    return f"bytes={start}-{last}", start, min(last + 1, size)


def test_random_ranges_equal_the_slice_of_a_full_get(served):
    size, body, client = served["size"], served["body"], served["client"]

    @settings(max_examples=200, deadline=None, database=None)
    @given(ranges(size))
    def check(case: tuple[str, int, int]) -> None:
        value, start, stop = case
        response = get_range(client, value)
        assert response.status_code == 206
        assert response.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{size}"
        assert response.data == body[start:stop]

    check()


def test_resume_at_any_cut_point_gives_the_full_archive(served):
    body, size, client = served["body"], served["size"], served["client"]
    cuts = {1, 2, 29, 30, 31, central_offset(body) - 1, central_offset(body),
            central_offset(body) + 1, size - 22, size - 1}
    for _, header, data, end in layout(body):
        cuts |= {header - 1, header, header + 1, data - 1, data, data + 1, end - 1, end}
    cuts |= set(range(0, size, size // 37))
    for cut in sorted(c for c in cuts if 0 < c < size):
        rest = get_range(client, f"bytes={cut}-")
        assert rest.status_code == 206, cut
        assert body[:cut] + rest.data == body, cut


def test_if_range_with_the_current_validators_gives_206(served):
    client, headers = served["client"], served["full"].headers
    for validator in (headers["ETag"], headers["Last-Modified"]):
        response = get_range(client, "bytes=10-19", **{"If-Range": validator})
        assert response.status_code == 206, validator
        assert response.data == served["body"][10:20]


@pytest.mark.parametrize("validator", ['"0123456789abcdef0123456789abcdef"', "stale-date", "weak"])
def test_if_range_with_a_stale_validator_gives_the_whole_archive(served, validator):
    headers = served["full"].headers
    if validator == "stale-date":
        validator = http_date(parse_date(headers["Last-Modified"]) - timedelta(days=1))
    elif validator == "weak":
        validator = "W/" + headers["ETag"]  # If-Range needs a strong validator
    response = get_range(served["client"], "bytes=10-19", **{"If-Range": validator})
    assert response.status_code == 200
    assert "Content-Range" not in response.headers
    assert response.data == served["body"]


def test_several_ranges_are_answered_with_the_whole_archive(served):
    response = get_range(served["client"], "bytes=0-9,20-29,-5")
    assert response.status_code == 200
    assert response.data == served["body"]


@pytest.mark.parametrize("offset", [0, 1, 1000])
def test_unsatisfiable_range_is_416_with_the_size(served, offset):
    size = served["size"]
    response = get_range(served["client"], f"bytes={size + offset}-{size + offset + 10}")
    assert_json_error(response, 416, "range_not_satisfiable")
    assert response.headers["Content-Range"] == f"bytes */{size}"


@pytest.mark.parametrize("extra", [1, 1000, 99_999_999])
def test_suffix_longer_than_the_archive_gives_all_of_it(served, extra):
    # RFC 9110 14.1.3: a representation shorter than the suffix-length is sent whole.
    size = served["size"]
    response = get_range(served["client"], f"bytes=-{size + extra}")
    assert response.status_code == 206
    assert response.headers["Content-Range"] == f"bytes 0-{size - 1}/{size}"
    assert response.data == served["body"]


@pytest.mark.parametrize("value", ["bytes=abc", "bytes=9-3", "bytes=-0x10"])
def test_malformed_range_is_ignored(served, value):
    response = get_range(served["client"], value)
    assert response.status_code == 200
    assert response.data == served["body"]


@pytest.mark.parametrize("value", ["items=0-5", "lines=-3"])
def test_range_in_an_unknown_unit_is_ignored(served, value):
    # RFC 9110 14.2: a Range with a unit the server does not support is ignored.
    response = get_range(served["client"], value)
    assert response.status_code == 200
    assert response.data == served["body"]


@pytest.mark.parametrize("url", [URL + "?compression=deflate", LOGS_URL.format("abc123")])
def test_range_on_a_deflated_archive_is_ignored(served, url):
    response = get_range(served["client"], "bytes=10-19", url=url)
    assert response.status_code == 200
    assert "Content-Range" not in response.headers
    assert open_zip(response.data).testzip() is None


# -- what a range reads -------------------------------------------------------------


def test_range_reads_only_the_members_it_covers(client, runner, logs_dir, reads):
    write_served_job(logs_dir)
    result = runner.invoke(args=["artifacts", "index", "abc123"])
    assert result.exit_code == 0, result.output
    body = client.get(URL).data
    members = layout(body)
    reads.clear()

    assert client.head(URL).status_code == 200
    assert reads == []

    name, header, data, end = members[-1]
    rel = name.split("/", 1)[1]
    response = get_range(client, f"bytes={data + 3}-{end - 2}")
    assert response.data == body[data + 3:end - 1]
    assert [path for path, _, _ in reads] == [rel]
    assert reads[0][1] == 3  # read from inside the file, not from its start

    reads.clear()
    assert get_range(client, f"bytes={header}-").data == body[header:]
    assert [path for path, _, _ in reads] == [rel]

    reads.clear()
    assert get_range(client, f"bytes={central_offset(body)}-").data == body[central_offset(body):]
    assert reads == []


def test_cold_cache_range_is_correct(served, tmp_path):
    body = served["body"]
    cold = make_app(served["root"] / "logs", tmp_path / "cold-cache").test_client()
    members = layout(body)
    middle = members[len(members) // 2]
    for start, stop in ((middle[2] + 5, middle[3]), (central_offset(body) + 3, len(body)),
                        (middle[1], members[-1][2] + 1), (0, 1)):
        response = get_range(cold, f"bytes={start}-{stop - 1}")
        assert response.status_code == 206
        assert response.data == body[start:stop], (start, stop)


def test_one_full_download_warms_the_cache_for_ranges(client, logs_dir, reads):
    job = write_served_job(logs_dir)
    body = client.get(URL).data  # cold
    files = [p for p in files_under(job) if p != "progress.json"]
    assert {p for p, _, _ in reads} == set(files)
    name, header, data, end = layout(body)[-1]

    reads.clear()
    assert get_range(client, f"bytes={data}-{end - 1}").data == body[data:end]
    assert [p for p, _, _ in reads] == [name.split("/", 1)[1]]
    reads.clear()
    assert get_range(client, "bytes=-10").data == body[-10:]
    assert reads == []


def test_cold_cache_tail_range_computes_the_checksums_it_needs(client, logs_dir, reads):
    job = write_served_job(logs_dir)
    tail = get_range(client, "bytes=-10")
    assert tail.status_code == 206
    files = [p for p in files_under(job) if p != "progress.json"]
    assert set(files) <= {p for p, _, _ in reads}  # every CRC is in the central directory
    body = client.get(URL).data
    assert tail.data == body[-10:]


# -- the CRC cache -------------------------------------------------------------------


def rewrite_in_place(path: Path) -> bytes:
    """Change every byte of ``path``, keep its size and put its mtime back."""
    st_before = path.stat()
    new = bytes(b ^ 0x5A for b in path.read_bytes())
    with open(path, "r+b") as f:
        f.write(new)
    os.utime(path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    st_after = path.stat()
    assert (st_after.st_size, st_after.st_mtime_ns) == (st_before.st_size, st_before.st_mtime_ns)
    return new


def test_file_rewritten_in_place_is_never_served_with_a_stale_crc(client, logs_dir):
    job = write_served_job(logs_dir)
    target = job / "checkpoint-10" / "optimizer.pt"
    old_body = client.get(URL).data  # fills the cache
    old_crc = open_zip(old_body).getinfo("job_abc123/checkpoint-10/optimizer.pt").CRC
    time.sleep(0.05)  # ctime has clock-tick granularity; make the rewrite a later tick
    new = rewrite_in_place(target)
    assert zlib.crc32(new) != old_crc

    # A fresh download carries the new bytes with their own CRC.
    response = client.get(URL)
    zf = open_zip(response.data)
    assert zf.testzip() is None
    info = zf.getinfo("job_abc123/checkpoint-10/optimizer.pt")
    assert zf.read(info) == new
    assert info.CRC == zlib.crc32(new)
    assert int(response.headers["Content-Length"]) == len(response.data)

    # So do ranges: the central directory, and the member's own header.
    body = response.data
    tail = get_range(client, f"bytes={central_offset(body)}-")
    assert tail.data == body[central_offset(body):]
    header = info.header_offset
    part = get_range(client, f"bytes={header}-{header + 99}")
    assert local_header(part.data, 0)["crc"] == zlib.crc32(new)

    checkpoint = open_zip(client.get(CHECKPOINT_URL).data)
    assert checkpoint.testzip() is None
    assert checkpoint.read("checkpoint-10/optimizer.pt") == new


def test_cache_dir_that_cannot_be_made_still_downloads(logs_dir, tmp_path, caplog):
    job = write_served_job(logs_dir)
    blocker = tmp_path / "file"
    blocker.write_text("a regular file where a folder would go")
    client = make_app(logs_dir, blocker / "cache").test_client()
    with caplog.at_level("WARNING", logger="flask_artifacts"):
        response = client.get(URL)
        body = response.data
        assert int(response.headers["Content-Length"]) == len(body)
        assert zip_files(open_zip(body), "job_abc123/")["checkpoint-10/optimizer.pt"] == (
            job / "checkpoint-10" / "optimizer.pt").read_bytes()
        for value, start, stop in (("bytes=-100", len(body) - 100, len(body)),
                                   ("bytes=5000-9000", 5000, 9001)):
            assert get_range(client, value).data == body[start:stop]
    assert blocker.is_file()
    assert any("cache" in r.getMessage().lower() for r in caplog.records
               if r.levelname == "WARNING")


def test_cli_index_fills_the_cache(client, runner, logs_dir, reads):
    job = write_served_job(logs_dir)
    files = [p for p in files_under(job) if p != "progress.json"]

    first = runner.invoke(args=["artifacts", "index", "abc123"])
    assert first.exit_code == 0, first.output
    counts = Counter(p for p, _, _ in reads)
    assert set(files) <= set(counts)
    assert set(counts.values()) == {1}  # each file read once

    reads.clear()
    second = runner.invoke(args=["artifacts", "index", "abc123"])
    assert second.exit_code == 0, second.output
    assert reads == []
    assert re.search(r"\b0 (read|checksums computed)\b", second.output), second.output

    # A download now streams each file once, with no CRC pass before it.
    body = client.get(URL).data
    assert sorted(p for p, _, _ in reads) == sorted(files)
    assert open_zip(body).testzip() is None


def test_cli_index_of_an_unknown_job_fails(runner, logs_dir):
    result = runner.invoke(args=["artifacts", "index", "nope"])
    assert result.exit_code != 0
    assert "nope" in result.output


# -- a cold download streams in segments before large members ---------------------


def test_cold_download_sends_bytes_before_a_large_members_read_pass(
        logs_dir, cache_dir, make_job, reads):
    """The first bytes go out before the CRC pass of a large uncached member.

    With a cold cache, a member of at least ``SEGMENT_BEFORE`` bytes needs a
    read pass before its header; the stream ends a stream-zip segment before
    it, so the small members ahead of it reach the client first. The bytes
    are the same as those of a warm download, which is one stream-zip run.
    """
    from flask_artifacts.streaming import SEGMENT_BEFORE

    job = make_job("seg", checkpoints=(10,))
    big = job / "pytorch_model.bin"
    size = 18 << 20
    assert size >= SEGMENT_BEFORE
    with open(big, "wb") as f:  # real bytes, large enough to start a segment
        block = os.urandom(1 << 20)
        for _ in range(size // len(block)):
            f.write(block)
    app = make_app(logs_dir, cache_dir)  # 1 MiB chunks: more than all that precedes it
    client = app.test_client()

    cold = client.get("/api/training/seg/download/model", buffered=False)
    first = next(iter(cold.response))
    assert first.startswith(b"PK\x03\x04")
    assert "pytorch_model.bin" not in {path for path, _, _ in reads}
    cold_body = first + b"".join(cold.response)
    cold.close()
    assert "pytorch_model.bin" in {path for path, _, _ in reads}
    assert len(cold_body) == int(cold.headers["Content-Length"])

    reads.clear()
    warm = client.get("/api/training/seg/download/model")
    assert [path for path, _, _ in reads].count("pytorch_model.bin") == 1  # no CRC pass
    assert warm.data == cold_body
    archive = open_zip(cold_body)
    assert archive.testzip() is None
    assert archive.read("job_seg/pytorch_model.bin") == big.read_bytes()


# -- If-Match and If-Unmodified-Since --------------------------------------------------


@pytest.mark.parametrize("url", [URL, LOGS_URL.format("abc123"), "/api/training/abc123/files/config.json"])
def test_failed_preconditions_answer_412(logs_dir, cache_dir, url):
    write_served_job(logs_dir)
    client = make_app(logs_dir, cache_dir).test_client()
    etag = client.head(url).headers["ETag"]
    assert client.get(url, headers={"If-Match": '"not-this-one"'}).status_code == 412
    assert client.get(url, headers={
        "If-Unmodified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"}).status_code == 412
    assert client.get(url, headers={"If-Match": "*"}).status_code == 200
    # If-Match compares strongly: only a strong ETag can match itself.
    assert client.get(url, headers={"If-Match": etag}).status_code == (
        412 if etag.startswith("W/") else 200)
    refused = client.get(url, headers={"If-Match": '"not-this-one"'})
    assert refused.json["error"] == "precondition_failed"
    assert b"PK\x03\x04" not in refused.data
