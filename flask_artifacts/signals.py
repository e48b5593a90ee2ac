"""Signals sent around every download, for audit records.

Both are sent with the app as sender and keyword arguments ``job_id``,
``kind`` ("model", "checkpoint" or "logs"), ``checkpoint`` (its name or
None) and ``remote_addr``; ``download_finished`` adds ``bytes_sent`` and
``completed`` (False when the transfer was cut off or failed)::

    from flask_artifacts import download_finished

    @download_finished.connect_via(app)
    def record(sender, job_id, kind, bytes_sent, completed, **extra):
        ...
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

download_started = _signals.signal("artifacts-download-started")
download_finished = _signals.signal("artifacts-download-finished")
