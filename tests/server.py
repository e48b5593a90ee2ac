"""Run the shipped gunicorn configuration on a free loopback port, for tests.

:class:`GunicornServer` starts ``python -m gunicorn -c gunicorn.conf.py``
from the repository root (found relative to this file) with ``LOGS_DIR``,
the cache folder and the ``GUNICORN_*`` settings in its environment, waits
until it answers, and stops it on exit. It also reads what tests measure
about the processes from ``/proc``: worker pids, resident memory, open
descriptors and threads. Linux only.

::

    with GunicornServer(logs_dir, cache_dir, timeout=2) as server:
        urllib.request.urlopen(server.url + "/api/training/checkpoints/abc123")
        server.rss_kib(server.worker_pids()[0])
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import typing as t
import urllib.error
import urllib.request
from pathlib import Path

import pytest

__all__ = ["REPO", "GunicornServer", "free_port", "gunicorn_server_factory"]

#: The repository root: ``gunicorn.conf.py`` and ``wsgi.py`` live there.
REPO = Path(__file__).resolve().parent.parent

#: What a request that only checks the server is up asks for. Any HTTP
#: answer (a JSON 404 for this unknown job) means a worker is serving.
PROBE_PATH = "/api/training/checkpoints/__server_probe__"

# Inherited variables that would change what the server under test does.
_STRIPPED_PREFIXES = ("FLASK_", "GUNICORN_")
_STRIPPED = {"LOGS_DIR", "GUNICORN_CMD_ARGS", "WEB_CONCURRENCY"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GunicornServer:
    """gunicorn serving ``logs_dir`` with the repository's ``gunicorn.conf.py``.

    :param logs_dir: The job folder, passed as ``LOGS_DIR``.
    :param cache_dir: The checksum cache folder (``ARTIFACTS_CACHE_DIR``).
    :param timeout: ``GUNICORN_TIMEOUT``, gunicorn's worker timeout in seconds.
    :param workers: ``GUNICORN_WORKERS``.
    :param threads: ``GUNICORN_THREADS``. gunicorn turns a ``sync`` worker
        into ``gthread`` when this is above 1.
    :param extra_env: More environment variables for the server (applied last).
    :param extra_args: Command-line options after ``-c gunicorn.conf.py``;
        gunicorn lets them override the config file (``--worker-class sync``).
    :param log_file: Where gunicorn's stdout and stderr go. Defaults to
        ``gunicorn-<port>.log`` next to ``cache_dir``.
    :param start_timeout: Seconds to wait for the first answer.
    """

    def __init__(self, logs_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str], *,
                 timeout: int = 30, workers: int = 1, threads: int = 4,
                 extra_env: t.Mapping[str, str] | None = None,
                 extra_args: t.Sequence[str] = (),
                 log_file: str | os.PathLike[str] | None = None,
                 start_timeout: float = 20.0) -> None:
        self.logs_dir = Path(logs_dir)
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout
        self.workers = workers
        self.thread_count = threads
        self.extra_env = dict(extra_env or {})
        self.extra_args = list(extra_args)
        self._log_file = Path(log_file) if log_file is not None else None
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.log_path: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._known_workers: set[int] = set()

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> GunicornServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, without a trailing slash."""
        if self.port is None:
            raise RuntimeError("The server has not been started.")
        return f"http://127.0.0.1:{self.port}"

    @property
    def master_pid(self) -> int:
        if self.process is None:
            raise RuntimeError("The server has not been started.")
        return self.process.pid

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "gunicorn", "-c", str(REPO / "gunicorn.conf.py")]
        if _has_control_socket():
            # gunicorn 25.1+ opens a control socket at one fixed path per user
            # ($XDG_RUNTIME_DIR or ~/.gunicorn/gunicorn.ctl); servers started
            # side by side would take it from each other.
            args.append("--no-control-socket")
        return args + self.extra_args

    def environment(self, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(_STRIPPED_PREFIXES) and k not in _STRIPPED}
        env.update({
            "LOGS_DIR": str(self.logs_dir),
            # from_prefixed_env parses values as JSON: a JSON string is
            # taken as-is whatever the path looks like.
            "FLASK_ARTIFACTS_CACHE_DIR": json.dumps(str(self.cache_dir)),
            "GUNICORN_BIND": f"127.0.0.1:{port}",
            "GUNICORN_WORKERS": str(self.workers),
            "GUNICORN_THREADS": str(self.thread_count),
            "GUNICORN_TIMEOUT": str(self.timeout),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        if self.process is not None:
            raise RuntimeError("The server is already running.")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _attempt in range(3):  # another process may take the port first
            port = free_port()
            self.port = port
            self.log_path = self._log_file or self.cache_dir.parent / f"gunicorn-{port}.log"
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "wb") as out:
                self.process = subprocess.Popen(
                    self.command(), cwd=REPO, env=self.environment(port),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            try:
                self._wait_until_serving()
                return
            except RuntimeError as exc:
                last_error = str(exc)
                in_use = "already in use" in self.log
                self.stop()
                if not in_use:
                    break
        raise RuntimeError(last_error)

    def _wait_until_serving(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        problem = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with status {self.process.returncode} before it"
                    f" answered.\nCommand: {self.command()}\nOutput:\n{self.log}")
            try:
                status = _get_status(self.url + PROBE_PATH)
            except OSError as exc:
                problem = repr(exc)
            else:
                # Any HTTP answer (a JSON 404, or 401 behind an auth hook) is a worker serving.
                if len(self.worker_pids()) >= self.workers:
                    return
                problem = f"HTTP {status}, {len(self.worker_pids())} workers"
            time.sleep(0.05)
        raise RuntimeError(
            f"gunicorn did not answer {PROBE_PATH} within {self.start_timeout} s"
            f" ({problem}).\nCommand: {self.command()}\nOutput:\n{self.log}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL the master and its workers."""
        process = self.process
        if process is None:
            return
        self.process = None
        if process.poll() is None:
            workers = set(_children(process.pid)) | self._known_workers
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait(5)
            # A killed master can leave its workers behind; they are ours to end.
            for pid in workers:
                if _alive(pid) and _is_our_gunicorn(pid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
        self._known_workers.clear()

    # -- what tests look at -------------------------------------------------------

    @property
    def log(self) -> str:
        """Everything gunicorn (and the app) wrote to stdout and stderr so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """Pids of the master's live children (its workers), sorted."""
        if self.process is None:
            return []
        pids = sorted(_children(self.master_pid))
        self._known_workers.update(pids)
        return pids

    def worker_pid(self) -> int:
        """The one worker's pid; fails unless exactly one is running."""
        pids = self.worker_pids()
        if len(pids) != 1:
            raise AssertionError(f"expected one gunicorn worker, found {pids}")
        return pids[0]

    @staticmethod
    def rss_kib(pid: int) -> int:
        """Resident memory of ``pid`` in KiB (``VmRSS`` of /proc/<pid>/status)."""
        return _status_field(pid, "VmRSS")

    @staticmethod
    def open_fds(pid: int) -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    @staticmethod
    def threads(pid: int) -> int:
        return _status_field(pid, "Threads")


def _has_control_socket() -> bool:
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError:
        return False
    return any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS)


def _get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def _status_field(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
    raise LookupError(f"/proc/{pid}/status has no {field} (a zombie or kernel thread?)")


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc/<pid>/task/*/children or ppids."""
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    readable = False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.update(int(c) for c in f.read().split())
            readable = True
        except OSError:
            continue
    if not readable:  # kernels without CONFIG_PROC_CHILDREN
        for name in os.listdir("/proc"):
            if name.isdigit() and _parent_of(int(name)) == pid:
                found.add(int(name))
    return sorted(c for c in found if _alive(c))


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The name in parentheses may hold spaces: the fields after it are fixed.
    return int(stat.rpartition(")")[2].split()[1])


def _is_our_gunicorn(pid: int) -> bool:
    """Whether ``pid`` still runs this repository's gunicorn (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return os.fsencode(str(REPO / "gunicorn.conf.py")) in argv


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def gunicorn_server_factory(tmp_path_factory: pytest.TempPathFactory
                            ) -> t.Callable[..., contextlib.AbstractContextManager[GunicornServer]]:
    """A factory for fixtures: ``factory(logs_dir=None, **options)`` as a context manager.

    Without ``logs_dir`` a fresh one is made; the cache folder and the log
    file always are, under a new temporary folder.
    """

    @contextlib.contextmanager
    def start(logs_dir: str | os.PathLike[str] | None = None,
              **options: t.Any) -> t.Iterator[GunicornServer]:
        base = tmp_path_factory.mktemp("gunicorn")
        logs = Path(logs_dir) if logs_dir is not None else base / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        options.setdefault("log_file", base / "gunicorn.log")
        with GunicornServer(logs, base / "cache", **options) as server:
            yield server

    return start
