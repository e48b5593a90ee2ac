# gunicorn settings for flask-artifacts. Start with: gunicorn -c gunicorn.conf.py
# Each value can be overridden from the environment, as the tests do.
import os

wsgi_app = "wsgi:app"

# Server socket
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")

# Worker processes. gthread, not sync: the sync worker stops telling the
# arbiter it is alive while it streams, so 'timeout' would kill any download
# longer than it. Each thread serves one download at a time.
worker_class = "gthread"
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))

# Keep two threads of each worker free of downloads, so listings, manifests
# and pages still answer while every download slot is streaming; downloads
# beyond the cap are answered 429 with Retry-After.
os.environ.setdefault("FLASK_ARTIFACTS_MAX_DOWNLOADS", str(max(1, threads - 2)))
graceful_timeout = 30
# gunicorn 25.1+ opens a control socket at one per-user path, so a second
# instance (another job folder, a test) would remove the first one's.
control_socket_disable = True
keepalive = 5

# Logging. The access log shows the path without its query string (%(U)s,
# not %(r)s), so signed links' signatures never reach a log file.
accesslog = "-"
access_log_format = '%(h)s - %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(D)sus "%(a)s"'
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
