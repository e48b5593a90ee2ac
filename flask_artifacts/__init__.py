"""Stream a training job's model, checkpoints and logs as ZIP downloads from Flask."""

from __future__ import annotations

from .app import create_app
from .extension import Artifacts

__all__ = ["Artifacts", "create_app"]
__version__ = "0.1.0.dev0"
