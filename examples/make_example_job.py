"""Regenerate ``examples/logs/``, a small finished training job to serve.

Run from anywhere: ``python examples/make_example_job.py``. The output is
deterministic, so rerunning it leaves no diff.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.jobtree import make_job  # noqa: E402


def main() -> None:
    logs = HERE / "logs"
    shutil.rmtree(logs / "job_example", ignore_errors=True)
    (logs / "job_example.log").unlink(missing_ok=True)
    job = make_job(
        logs,
        "example",
        status="completed",
        checkpoints=(10, 20),
        log="root",
        progress="inside",
    )
    size = sum(p.stat().st_size for p in logs.rglob("*") if p.is_file())
    print(f"wrote {job.relative_to(HERE.parent)} ({size:,} bytes under logs/)")


if __name__ == "__main__":
    main()
