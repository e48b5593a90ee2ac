"""An app factory that serves one job folder, for gunicorn or ``flask run``."""

from __future__ import annotations

import os
from typing import Any, Mapping

from flask import Flask

from .extension import Artifacts


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Create an app serving the jobs in ``LOGS_DIR`` (the training server's variable).

    Settings come from ``FLASK_*`` environment variables (for example
    ``FLASK_ARTIFACTS_URL_PREFIX=/artifacts``); ``test_config`` overrides them.
    """
    app = Flask("flask_artifacts", instance_relative_config=True)
    app.config.from_mapping(ARTIFACTS_LOGS_DIR=os.environ.get("LOGS_DIR"))
    if test_config is None:
        app.config.from_prefixed_env()
    else:
        app.config.from_mapping(test_config)
    Artifacts(app)
    return app
