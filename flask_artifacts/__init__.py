"""Stream a training job's model, checkpoints and logs as ZIP downloads from Flask."""

from __future__ import annotations

from .app import create_app
from .extension import Artifacts
from .signals import download_finished, download_started

__all__ = ["Artifacts", "create_app", "download_finished", "download_started"]
__version__ = "0.1.0.dev0"
