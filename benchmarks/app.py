"""The app ``bench.py`` serves: flask-artifacts plus the routes it is compared with.

``gunicorn -c gunicorn.conf.py benchmarks.app:app`` (from the repository
root) serves the usual flask-artifacts routes for ``LOGS_DIR`` and, on the
same app and worker, these comparison routes:

``/bench/ping``
    The worker's pid (so the benchmark can read its RSS from ``/proc``),
    the CRC/deflate backend it imported and its chunk size.
``/bench/sendfile/<name>``
    Flask's ``send_file`` of ``BENCH_PLAIN_DIR/<name>.bin``, a plain file
    as large as the archive: gunicorn answers it with ``sendfile(2)``, the
    practical limit of this stack.
``/bench/zipstream/<job_id>``
    zipstream-ng's sized, stored stream of the same members as the model
    archive, with ``Content-Length: len(zs)``.
``/bench/bytesio/<job_id>``
    What an early design proposed: the whole ZIP written by ``zipfile`` into
    a ``BytesIO`` (stored, to be fair), then sent in chunks.
``/bench/deflate-zlib/<job_id>``
    This project's ``?compression=deflate`` model archive, but deflated by
    the standard library's zlib whatever fast backend is installed.

Not for deployment: these routes exist to be measured.
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import Iterator

from flask import Response, abort, current_app, jsonify, send_file
from werkzeug.security import safe_join

from flask_artifacts import archives, create_app, fast
from flask_artifacts.extension import get_cache, get_store
from flask_artifacts.fast import compressobj_factory
from flask_artifacts.plan import DEFLATE
from flask_artifacts.streaming import ArchiveBody

app = create_app()


@app.get("/bench/ping")
def ping() -> Response:
    return jsonify({"pid": os.getpid(), "backend": fast.BACKEND,
                    "chunk_size": current_app.config["ARTIFACTS_CHUNK_SIZE"]})


@app.get("/bench/sendfile/<name>")
def plain_sendfile(name: str) -> Response:
    path = safe_join(os.environ["BENCH_PLAIN_DIR"], f"{name}.bin")
    if path is None or not os.path.isfile(path):
        abort(404)
    return send_file(path, mimetype="application/zip", as_attachment=True,
                     download_name=f"{name}.zip", conditional=False, etag=False)


@app.get("/bench/zipstream/<job_id>")
def zipstream_ng(job_id: str) -> Response:
    from zipstream import ZIP_STORED, ZipStream

    store = get_store()
    zs = ZipStream(sized=True, compress_type=ZIP_STORED)
    for name, entry in archives.model_items(store, store.job(job_id)):
        zs.add_path(entry.locator, name, recurse=False)
    return Response(zs, mimetype="application/zip", direct_passthrough=True,
                    headers={"Content-Length": str(len(zs))})


@app.get("/bench/bytesio/<job_id>")
def bytesio(job_id: str) -> Response:
    store = get_store()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, entry in archives.model_items(store, store.job(job_id)):
            zf.write(entry.locator, name)
    size = buf.tell()
    buf.seek(0)
    chunk_size = current_app.config["ARTIFACTS_CHUNK_SIZE"]

    def chunks() -> Iterator[bytes]:
        try:
            yield from iter(lambda: buf.read(chunk_size), b"")
        finally:
            buf.close()

    return Response(chunks(), mimetype="application/zip", direct_passthrough=True,
                    headers={"Content-Length": str(size)})


@app.get("/bench/deflate-zlib/<job_id>")
def deflate_zlib(job_id: str) -> Response:
    store, cache = get_store(), get_cache()
    plan = archives.plan_download(store, cache, store.job(job_id), "model", method=DEFLATE)
    config = current_app.config
    body = ArchiveBody(plan, store, cache, chunk_size=config["ARTIFACTS_CHUNK_SIZE"],
                       get_compressobj=compressobj_factory(config["ARTIFACTS_DEFLATE_LEVEL"],
                                                           backend="zlib"))
    return Response(body, mimetype="application/zip", direct_passthrough=True)
