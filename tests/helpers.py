"""Plain helpers for the test-client tests: reading archives and watching folders."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import stat
import struct
import time
import typing as t
import zipfile
from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient

from flask_artifacts import create_app

LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
ZIP64_EXTRA_ID = 0x0001
MODEL_URL = "/api/training/{}/download/model"
LOGS_URL = "/api/training/{}/download/logs"
LIST_URL = "/api/training/checkpoints/{}"


class BufferedClient(FlaskClient):
    """A test client that reads each body whole unless told ``buffered=False``.

    Reading the body runs the response's ``close()``, which frees the
    download slot and every file the stream opened.
    """

    def open(self, *args: t.Any, buffered: bool = True, **kwargs: t.Any) -> t.Any:
        return super().open(*args, buffered=buffered, **kwargs)


def make_app(logs_dir: Path | str, cache_dir: Path | str, **config: t.Any) -> Flask:
    app = create_app({"TESTING": True, "ARTIFACTS_LOGS_DIR": str(logs_dir),
                      "ARTIFACTS_CACHE_DIR": str(cache_dir), **config})
    app.test_client_class = BufferedClient
    return app


def snapshot_tree(root: str | os.PathLike[str]) -> list[tuple[str, str, int, int, str]]:
    """``(relpath, kind, size, mtime_ns, sha256 or link target)`` of everything under ``root``.

    Nothing is followed or opened but regular files, so FIFOs and symlinks
    to ``/etc`` are recorded without being read.
    """
    base = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = os.lstat(path)
            rel = path.relative_to(base).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out.append((rel, "link", st.st_size, st.st_mtime_ns, os.readlink(path)))
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
                out.append((rel, "file", st.st_size, st.st_mtime_ns, digest.hexdigest()))
            elif stat.S_ISDIR(st.st_mode):
                out.append((rel, "dir", 0, st.st_mtime_ns, ""))
            else:
                out.append((rel, "other", st.st_size, st.st_mtime_ns, oct(st.st_mode)))
    return sorted(out)


def open_zip(data: bytes) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(data))


def zip_files(zf: zipfile.ZipFile, prefix: str = "") -> dict[str, bytes]:
    """Every file member (no folders) by its name with ``prefix`` removed."""
    out = {}
    for info in zf.infolist():
        if info.is_dir():
            continue
        assert info.filename.startswith(prefix), info.filename
        out[info.filename[len(prefix):]] = zf.read(info)
    return out


def extra_ids(extra: bytes) -> list[int]:
    """The header ids of a ZIP extra field, in order."""
    ids, pos = [], 0
    while pos + 4 <= len(extra):
        header_id, length = struct.unpack_from("<HH", extra, pos)
        ids.append(header_id)
        pos += 4 + length
    assert pos == len(extra), "extra field ends mid-record"
    return ids


def local_header(data: bytes, offset: int = 0) -> dict[str, t.Any]:
    """The local file header at ``offset``: version, flags, method, sizes, name, extra ids."""
    (sig, version, flags, method, _time, _date, crc, csize, usize, name_len,
     extra_len) = LOCAL_HEADER.unpack_from(data, offset)
    assert sig == b"PK\x03\x04", f"no local header at {offset}"
    start = offset + LOCAL_HEADER.size
    name = data[start:start + name_len].decode("utf-8")
    extra = data[start + name_len:start + name_len + extra_len]
    return {"version": version, "flags": flags, "method": method, "crc": crc,
            "compressed_size": csize, "size": usize, "name": name,
            "extra_ids": extra_ids(extra), "data_offset": start + name_len + extra_len}


class SparseWriter:
    """Write a streamed body to a file, seeking over all-zero chunks.

    A multi-GiB archive of sparse members then takes only the disk space of
    its headers and small files, and ``zipfile`` can still open it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "wb")
        self.size = 0
        self._zeros: dict[int, bytes] = {}

    def write(self, chunk: bytes) -> None:
        zeros = self._zeros.get(len(chunk))
        if zeros is None:
            zeros = self._zeros[len(chunk)] = bytes(len(chunk))
        if chunk == zeros:
            self.f.seek(len(chunk), os.SEEK_CUR)
        else:
            self.f.write(chunk)
        self.size += len(chunk)

    def close(self) -> None:
        self.f.truncate(self.size)
        self.f.close()


def stream_body(response: t.Any, sink: t.Callable[[bytes], None] | None = None) -> int:
    """Read an unbuffered test-client response chunk by chunk; return its length."""
    total = 0
    try:
        for chunk in response.response:
            total += len(chunk)
            if sink is not None:
                sink(chunk)
    finally:
        response.close()
    return total


@contextlib.contextmanager
def time_limit(seconds: int) -> t.Iterator[None]:
    """Fail instead of hanging (a FIFO opened for reading blocks forever)."""

    def expired(signum: int, frame: t.Any) -> None:
        raise TimeoutError(f"gave up after {seconds} s: something blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_json_error(response: t.Any, status: int, code: str) -> dict[str, t.Any]:
    """The response is a JSON error with this status and code, and no archive bytes."""
    assert response.status_code == status, (response.status_code, response.data[:300])
    assert response.mimetype == "application/json", response.headers
    assert b"PK\x03\x04" not in response.data
    assert b"PK\x05\x06" not in response.data
    body = response.get_json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    return body


def wait_for(condition: t.Callable[[], bool], timeout: float = 5.0, step: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def open_files_under(pid: int, directory: str | os.PathLike[str]) -> list[str]:
    """What process ``pid`` holds open at or below ``directory`` (from /proc)."""
    root = os.path.realpath(directory)
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target == root or target.startswith(root + os.sep):
                found.append(target)
    return found
