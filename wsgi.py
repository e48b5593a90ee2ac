"""The WSGI entry point: ``gunicorn -c gunicorn.conf.py`` serves ``LOGS_DIR``."""

from flask_artifacts import create_app

app = create_app()
