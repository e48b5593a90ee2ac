"""Real archive readers open the model archives the real server streams.

Each fixture is one job tree that has broken some streaming-ZIP writer or
reader: non-ASCII names, empty files and folders, a member past 4 GiB with
offsets past 4 GiB, more than 65,535 members, times outside what ZIP fields
hold, deep nesting. Each is downloaded once through gunicorn (started with the
shipped ``gunicorn.conf.py``) and then checked by every reader: Info-ZIP
``unzip``, 7-Zip, libarchive's ``bsdtar``, Python's ``zipfile``, and two
streaming readers that never see the central directory, so they prove the
local headers right: Java's ``ZipInputStream`` (``tests/ZipCheck.java``) and
the ``stream-unzip`` package.

A reader that is not installed skips with the reason; with ``CI`` set in the
environment it fails instead (``.ci/run`` installs them all). The terminal
summary ends with a table of the readers that passed per fixture.
"""

from __future__ import annotations

import dataclasses
import http.client
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import typing as t
import zipfile
import zlib
from datetime import datetime, timezone
from pathlib import Path

import pytest

try:
    from tests.helpers import extra_ids
    from tests.jobtree import make_job, sparse_file
    from tests.server import GunicornServer, gunicorn_server_factory
except ImportError:  # tests/ itself on sys.path (pytest's rootdir-less import)
    from helpers import extra_ids  # type: ignore[no-redef]
    from jobtree import make_job, sparse_file  # type: ignore[no-redef]
    from server import GunicornServer, gunicorn_server_factory  # type: ignore[no-redef]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the gunicorn fixture reads /proc (Linux)")

MiB = 1 << 20
GiB = 1 << 30

ZIP_CHECK = Path(__file__).resolve().parent / "ZipCheck.java"

#: Members of the ``many`` fixture: past the 65,535 a ZIP32 directory can count.
MANY_FILES = 65_600
#: The ``large`` fixture's big member: past 4 GiB, and not a multiple of any chunk size.
LARGE_SIZE = int(4.3 * GiB)
#: How long one reader may take on one archive before it counts as hung.
READER_TIMEOUT = 600

#: What every reader subprocess runs with: UTF-8 names print and compare as UTF-8.
READER_ENV = {**os.environ, "LC_ALL": "C.UTF-8"}


# -- the job trees ----------------------------------------------------------------


def _utime(path: Path, when: datetime) -> None:
    ns = int(when.timestamp()) * 1_000_000_000
    os.utime(path, ns=(ns, ns))


def build_unicode(logs: Path) -> str:
    """Non-ASCII names in several scripts, combining marks, spaces and quotes."""
    make_job(logs, "unicode", extra_files={
        "модель/веса.bin": bytes(range(256)) * 8,
        "日本語.txt": "日本語のテキスト\n",
        "emoji-😀.json": '{"emoji": "😀"}\n',
        # NFD: 'e' + COMBINING ACUTE ACCENT, kept as the bytes on disk.
        "cafe\u0301 decomposed.txt": "décomposé\n",
        "Z\u0351\u0324a\u0310lgo\u0303.txt": "combining marks stacked\n",
        "שלום/עולם.txt": "right to left\n",
        "family 👩\u200d👩\u200d👧 zwj.txt": "zero-width joiner\n",
        "a name with spaces, 'single' and \"double\" quotes.txt": "quotes\n",
    })
    return "unicode"


def build_empty(logs: Path) -> str:
    """Empty files and empty folders, one of them nested."""
    job = make_job(logs, "empty", checkpoints=(10,), extra_files={
        "empty.txt": b"",
        "checkpoint-10/empty.bin": b"",
        "outer/not-empty.txt": "one file next to an empty folder\n",
    })
    (job / "empty-folder").mkdir()
    (job / "outer" / "inner-empty").mkdir()
    (job / "nested" / "empty" / "deeper" / "deepest").mkdir(parents=True)
    return "empty"


def build_large(logs: Path) -> str:
    """A sparse member past 4 GiB, then a small one whose offset is past 4 GiB."""
    job = make_job(logs, "large", checkpoints=(), tokenizer=False, extra_files={
        "zz-after-the-big-one.txt": "the offset of this member is past 4 GiB\n",
    })
    # Sorts first, so the plan has to bring a small member in front of it.
    sparse_file(job / "big" / "weights-4.3GiB.bin", LARGE_SIZE)
    return "large"


def build_many(logs: Path) -> str:
    """More members than a ZIP32 end record can count, in a few folders."""
    job = make_job(logs, "many", checkpoints=(), tokenizer=False)
    folders = 4
    for f in range(folders):
        (job / "shards" / f"part-{f}").mkdir(parents=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for i in range(MANY_FILES):
        fd = os.open(job / "shards" / f"part-{i % folders}" / f"file-{i:05d}.txt", flags, 0o644)
        try:
            os.write(fd, b"%d\n" % i)
        finally:
            os.close(fd)
    return "many"


#: Times the ZIP fields cannot hold, and what the archive must carry instead:
#: MS-DOS dates start in 1980, the extended timestamp ends in 2038.
TIMES = {
    "times/epoch-1970.txt": datetime(1970, 1, 1, tzinfo=timezone.utc),
    "times/year-2040.txt": datetime(2040, 6, 1, 12, 0, tzinfo=timezone.utc),
    "times/year-2110.txt": datetime(2110, 1, 1, tzinfo=timezone.utc),
    "times/empty-folder-1970/": datetime(1970, 1, 1, tzinfo=timezone.utc),
}
OLDEST = datetime(1980, 1, 1, tzinfo=timezone.utc)
NEWEST = datetime.fromtimestamp(2**31 - 1, tz=timezone.utc)


def build_times(logs: Path) -> str:
    """Modification times of 1970, 2040 and 2110."""
    job = make_job(logs, "times", checkpoints=(), tokenizer=False, extra_files={
        rel: f"modified {when:%Y-%m-%d}\n" for rel, when in TIMES.items() if not rel.endswith("/")
    })
    for rel, when in TIMES.items():
        if rel.endswith("/"):
            (job / rel).mkdir()
        _utime(job / rel, when)
    return "times"


def build_deep(logs: Path) -> str:
    """40 nested folders: names of a few hundred bytes."""
    levels = [f"level-{i:02d}" for i in range(40)]
    half = "/".join(levels[:20])
    full = "/".join(levels)
    job = make_job(logs, "deep", checkpoints=(), tokenizer=False, extra_files={
        f"{half}/halfway.txt": "20 folders down\n",
        f"{full}/at-the-bottom.json": '{"depth": 40}\n',
    })
    (job / full / "empty-at-the-bottom").mkdir()
    return "deep"


FIXTURES: dict[str, t.Callable[[Path], str]] = {
    "unicode": build_unicode,
    "empty": build_empty,
    "large": build_large,
    "many": build_many,
    "times": build_times,
    "deep": build_deep,
}


# -- what each archive must hold -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Expected:
    """One member as the job folder has it: a file (with its source) or an empty folder.

    Readers compare member bytes with ``source`` itself, streaming both, so
    nothing is hashed twice and the 4 GiB member is never held whole.
    """

    size: int
    crc32: int
    source: Path | None  # None for a folder

    @property
    def is_dir(self) -> bool:
        return self.source is None


def expected_members(job_dir: Path) -> dict[str, Expected]:
    """Every member the full model archive of ``job_dir`` holds, by name.

    Worked out from the folder, not from the package: each regular file under
    ``job_<id>/`` except progress.json and the job's log at the top (those
    are the logs archive), and each folder with nothing in it as ``name/``.
    """
    top = job_dir.name
    skip = {"progress.json", f"{top}.log"}
    out: dict[str, Expected] = {}
    for dirpath, dirnames, filenames in os.walk(job_dir):
        here = Path(dirpath)
        rel = here.relative_to(job_dir).as_posix()
        prefix = f"{top}/" if rel == "." else f"{top}/{rel}/"
        if not dirnames and not filenames:
            out[prefix] = Expected(0, 0, None)
        for name in filenames:
            if rel == "." and name in skip:
                continue
            crc, size = _crc32(here / name)
            out[prefix + name] = Expected(size, crc, here / name)
    return out


def _crc32(path: Path) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return crc, size


# -- downloading -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Archive:
    """One fixture's downloaded model archive and what it must hold."""

    fixture: str
    job_id: str
    path: Path
    members: dict[str, Expected]


def download(port: int, url: str, dest: Path) -> int:
    """Stream ``url`` into ``dest`` and return its length; fail unless it is whole.

    Runs of zero bytes are seeked over rather than written, so the archive of a
    sparse 4 GiB member stays sparse on disk; the file's bytes are the same.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        if response.status != 200:
            raise AssertionError(f"GET {url}: {response.status} {response.read(2000)!r}")
        assert response.getheader("Content-Type", "").startswith("application/zip"), \
            response.getheaders()
        length = int(response.getheader("Content-Length", "-1"))
        buffer = bytearray(MiB)
        view = memoryview(buffer)
        zeros = bytes(MiB)
        got = 0
        with open(dest, "wb") as f:
            while n := response.readinto(buffer):
                if n == MiB and buffer == zeros:
                    f.seek(n, os.SEEK_CUR)
                else:
                    f.write(view[:n])
                got += n
            f.truncate(got)
    finally:
        conn.close()
    assert got == length, f"GET {url}: {got} bytes of the {length} announced"
    return got


class Archives:
    """Builds a fixture's job and downloads its model archive, once, on first use."""

    def __init__(self, logs: Path, downloads: Path, server: GunicornServer) -> None:
        self.logs = logs
        self.downloads = downloads
        self.server = server
        self._done: dict[str, Archive] = {}
        self._failed: dict[str, str] = {}

    def get(self, fixture: str) -> Archive:
        if fixture in self._failed:
            pytest.fail(f"the {fixture!r} archive could not be made: {self._failed[fixture]}",
                        pytrace=False)
        if fixture not in self._done:
            try:
                self._done[fixture] = self._make(fixture)
            except Exception as exc:
                self._failed[fixture] = f"{exc!r}\ngunicorn's log ends:\n{self.server.log[-3000:]}"
                raise
        return self._done[fixture]

    def _make(self, fixture: str) -> Archive:
        job_id = FIXTURES[fixture](self.logs)
        members = expected_members(self.logs / f"job_{job_id}")
        dest = self.downloads / f"{fixture}.zip"
        assert self.server.port is not None
        download(self.server.port, f"/api/training/{job_id}/download/model", dest)
        return Archive(fixture, job_id, dest, members)


@pytest.fixture(scope="session")
def archives(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Archives]:
    base = tmp_path_factory.mktemp("readers")
    logs, downloads = base / "logs", base / "downloads"
    logs.mkdir()
    downloads.mkdir()
    start = gunicorn_server_factory(tmp_path_factory)
    try:
        with start(logs_dir=logs) as server:
            yield Archives(logs, downloads, server)
    finally:
        # A 4.3 GiB member and its archive (both mostly holes) and 65,600 small
        # files: removed now rather than left for pytest's basetemp rotation.
        shutil.rmtree(base, ignore_errors=True)


# -- the readers -----------------------------------------------------------------------------


def run(args: list[str], **kwargs: t.Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", env=READER_ENV, timeout=READER_TIMEOUT, **kwargs)


def _tail(text: str, limit: int = 3000) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return (f"{' '.join(map(str, result.args))} exited {result.returncode}\n"
            f"stdout:\n{_tail(result.stdout)}\nstderr:\n{_tail(result.stderr)}")


def read_unzip(archive: Archive) -> None:
    result = run(["unzip", "-t", "-qq", str(archive.path)])
    assert result.returncode == 0, explain(result)


def read_7z(archive: Archive) -> None:
    result = run(["7z", "t", str(archive.path)])
    assert result.returncode == 0, explain(result)
    assert "Everything is Ok" in result.stdout, explain(result)


def read_bsdtar(archive: Archive) -> None:
    listing = run(["bsdtar", "-tvf", str(archive.path)])
    assert listing.returncode == 0, explain(listing)
    lines = listing.stdout.splitlines()
    assert len(lines) == len(archive.members), (
        f"bsdtar listed {len(lines)} entries, the archive has {len(archive.members)}")
    # Every member's bytes, CRC-checked, to nowhere: -O writes them to stdout.
    extract = subprocess.run(["bsdtar", "-xOf", str(archive.path)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=READER_ENV, timeout=READER_TIMEOUT)
    assert extract.returncode == 0, (
        f"bsdtar -xOf exited {extract.returncode}:"
        f" {_tail(extract.stderr.decode(errors='replace'))}")


def read_zipfile(archive: Archive) -> None:
    with zipfile.ZipFile(archive.path) as zf:
        bad = zf.testzip()
        assert bad is None, f"testzip: {bad} does not match its CRC-32"
        names = zf.namelist()
        assert len(names) == len(set(names)), "duplicate member names"
        assert sorted(names) == sorted(archive.members)
        for info in zf.infolist():
            want = archive.members[info.filename]
            assert info.is_dir() == want.is_dir, info
            assert info.file_size == want.size, info
            if want.source is not None:
                with zf.open(info) as member:
                    _assert_same_bytes(iter(lambda: member.read(4 * MiB), b""), want.source,
                                       info.filename)
        if archive.fixture == "times":
            for rel, when in TIMES.items():
                info = zf.getinfo(f"job_{archive.job_id}/{rel}")
                clamped = min(max(when, OLDEST), NEWEST)
                # MS-DOS time has two-second steps.
                dos = clamped.replace(second=clamped.second // 2 * 2)
                assert info.date_time == dos.timetuple()[:6], (rel, info.date_time)
                assert _ut_mtime(info.extra) == int(clamped.timestamp()), rel


def _assert_same_bytes(chunks: t.Iterable[bytes], source: Path, name: str) -> int:
    """Compare a member's bytes with its source file as both stream; return the length.

    In bounded chunks, so the 4 GiB member is never held whole.
    """
    offset = 0
    with open(source, "rb") as f:
        for chunk in chunks:
            if not chunk:
                continue
            if f.read(len(chunk)) != chunk:
                raise AssertionError(f"{name}: bytes differ from {source.name} within"
                                     f" [{offset}, {offset + len(chunk)})")
            offset += len(chunk)
        if f.read(1):
            raise AssertionError(f"{name}: the member ends at byte {offset}, before its source")
    return offset


def _ut_mtime(extra: bytes) -> int | None:
    """The modification time of an extended-timestamp (``UT``) extra field."""
    pos = 0
    while pos + 4 <= len(extra):
        header_id, length = struct.unpack_from("<HH", extra, pos)
        if header_id == 0x5455 and length >= 5 and extra[pos + 4] & 1:
            return int(struct.unpack_from("<i", extra, pos + 5)[0])
        pos += 4 + length
    return None


def read_java(archive: Archive) -> None:
    result = run(["java", str(ZIP_CHECK), str(archive.path)])
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    assert lines and lines[-1] == f"end\t{len(lines) - 1}", explain(result)
    seen = []
    for line in lines[:-1]:
        crc, size, name = line.split("\t", 2)
        seen.append((name, int(size), int(crc, 16)))
    want = [(name, e.size, e.crc32) for name, e in archive.members.items()]
    assert len(seen) == len(want), f"ZipInputStream read {len(seen)} entries of {len(want)}"
    assert sorted(seen) == sorted(want)


def read_stream_unzip(archive: Archive) -> None:
    from stream_unzip import stream_unzip

    def chunks() -> t.Iterator[bytes]:
        with open(archive.path, "rb") as f:
            while chunk := f.read(MiB):
                yield chunk

    seen = []
    for raw_name, _size, member_chunks in stream_unzip(chunks()):
        name = raw_name.decode("utf-8")
        want = archive.members.get(name)
        if want is None or want.source is None:
            size = sum(len(chunk) for chunk in member_chunks)
        else:
            size = _assert_same_bytes(member_chunks, want.source, name)
        seen.append((name, size))
    expected = [(name, e.size) for name, e in archive.members.items()]
    assert len(seen) == len(expected), f"stream-unzip read {len(seen)} members of {len(expected)}"
    assert sorted(seen) == sorted(expected)


def _have_java() -> str | None:
    if shutil.which("java") is None:
        return "java is not installed"
    if shutil.which("javac") is None:
        # 'java File.java' compiles in memory with the JDK's compiler module.
        return "java is installed without a JDK (javac), so it cannot run a .java file"
    return None


def _have_command(name: str) -> t.Callable[[], str | None]:
    return lambda: None if shutil.which(name) else f"{name} is not installed"


def _have_stream_unzip() -> str | None:
    if importlib.util.find_spec("stream_unzip") is None:
        return "stream-unzip is not installed (pip install -e '.[test]')"
    return None


@dataclasses.dataclass(frozen=True)
class Reader:
    check: t.Callable[[Archive], None]
    #: None when the reader can run, else why not.
    missing: t.Callable[[], str | None]


READERS: dict[str, Reader] = {
    "unzip": Reader(read_unzip, _have_command("unzip")),
    "7z": Reader(read_7z, _have_command("7z")),
    "bsdtar": Reader(read_bsdtar, _have_command("bsdtar")),
    "zipfile": Reader(read_zipfile, lambda: None),
    "java": Reader(read_java, _have_java),
    "stream-unzip": Reader(read_stream_unzip, _have_stream_unzip),
}


def require(reader: str) -> None:
    why = READERS[reader].missing()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must install every reader (.ci/run)", pytrace=False)
    pytest.skip(why)


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_reader_opens_archive(fixture: str, reader: str, archives: Archives,
                              reader_table: None) -> None:
    """The reader accepts the archive and finds every member, byte for byte where it can."""
    require(reader)
    READERS[reader].check(archives.get(fixture))


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_first_member_is_not_zip64(fixture: str, archives: Archives) -> None:
    """Safari's automatic unzip keeps only the first file when its header is ZIP64."""
    archive = archives.get(fixture)
    with open(archive.path, "rb") as f:
        head = f.read(30 + 2 * 0xFFFF)
        f.seek(-22, os.SEEK_END)
        end = f.read(22)
    (sig, version, flags, _method, _time, _date, _crc, csize, usize, name_len,
     extra_len) = struct.unpack_from("<4sHHHHHIIIHH", head)
    assert sig == b"PK\x03\x04"
    name = head[30:30 + name_len].decode("utf-8")
    extra = head[30 + name_len:30 + name_len + extra_len]
    assert version == 20, (name, version)
    assert not flags & 0x08, f"{name}: data descriptor"
    assert 0x0001 not in extra_ids(extra), f"{name}: ZIP64 extra field"
    assert 0xFFFFFFFF not in (csize, usize), name
    assert name in archive.members
    if fixture in ("large", "many"):
        # ... in an archive that is ZIP64 all the same.
        assert end[:4] == b"PK\x05\x06"
        entries, offset = struct.unpack_from("<H", end, 10)[0], struct.unpack_from("<I", end, 16)[0]
        assert (entries, offset) == (0xFFFF, 0xFFFFFFFF), "no ZIP64 end record"
        with zipfile.ZipFile(archive.path) as zf:
            infos = {info.filename: info for info in zf.infolist()}
        assert len(infos) == len(archive.members)
        top = f"job_{archive.job_id}"
        if fixture == "large":
            assert infos[f"{top}/big/weights-4.3GiB.bin"].file_size > 4 * GiB
            assert infos[f"{top}/zz-after-the-big-one.txt"].header_offset > 4 * GiB
        else:
            assert len(infos) > 0xFFFF


# -- the summary table ---------------------------------------------------------------------


class _ReaderTable:
    """A plugin that collects reader outcomes and prints them per fixture at the end."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str], str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        marker = "test_reader_opens_archive["
        if marker not in report.nodeid:
            return
        params = report.nodeid.split(marker, 1)[1].rstrip("]")
        fixture, _, reader = params.partition("-")
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[(fixture, reader)] = report.outcome

    def pytest_terminal_summary(self, terminalreporter: t.Any) -> None:
        if not self.outcomes:
            return
        mark = {"passed": "ok", "failed": "FAIL", "skipped": "skip"}
        width = max(len(r) for r in READERS) + 2
        terminalreporter.section("archive readers passed per fixture")
        terminalreporter.write_line("fixture   " + "".join(r.ljust(width) for r in READERS)
                                    + "passed")
        for fixture in FIXTURES:
            row = [self.outcomes.get((fixture, r)) for r in READERS]
            if not any(row):
                continue
            cells = "".join(mark.get(o or "", "-").ljust(width) for o in row)
            passed = sum(o == "passed" for o in row)
            terminalreporter.write_line(f"{fixture:<10}{cells}{passed}/{len(READERS)}")


@pytest.fixture(scope="session")
def reader_table(request: pytest.FixtureRequest) -> None:
    name = "flask-artifacts-reader-table"
    if not request.config.pluginmanager.has_plugin(name):
        request.config.pluginmanager.register(_ReaderTable(), name)
