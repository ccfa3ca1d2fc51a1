"""Real servers on loopback for the sharing tests: an S3 API (moto's server mode) and an HTTP server
that honours Range requests (sharded Zarr reads byte ranges of shard objects)."""

from __future__ import annotations

import http.server
import io
import os
import re
import sys
import threading
from contextlib import contextmanager
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "loopback_site"))
import loopback  # noqa: E402

LOOPBACK_SITE = str(Path(__file__).parent / "loopback_site")


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment that points boto/s3fs at the loopback S3 server with dummy credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def guarded_env() -> dict[str, str]:
    """Environment for subprocesses: the loopback guard is loaded first (sitecustomize)."""
    paths = [LOOPBACK_SITE, os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


@contextmanager
def moto_s3():
    """A moto S3 server on 127.0.0.1, a free port; yields its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    import urllib.request

    # moto keeps its buckets in-process, across servers: each server starts from none (moto's reset API)
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"))
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextmanager
def s3_in_environment(bucket: str):
    """The loopback S3 server with its endpoint and dummy credentials in os.environ (restored after),
    the loopback guard on, and `bucket` made; yields {"fs": an s3fs filesystem, "env": the variables
    a `pipeline` subprocess needs, the guard included}."""
    loopback.install()
    saved = dict(os.environ)
    try:
        with moto_s3() as endpoint:
            env = s3_env(endpoint)
            os.environ.update(env)
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir(bucket)
            yield {"fs": fs, "env": {**env, **guarded_env()}}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        loopback.uninstall()


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with `Range: bytes=a-b` answered by 206 Partial Content; counts what it served."""

    ranges_served = 0

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        spec = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if spec is None or os.path.isdir(path) or not os.path.isfile(path):
            return super().send_head()
        data = Path(path).read_bytes()
        size = len(data)
        a, b = spec.groups()
        start, stop = (size - int(b), size) if a == "" else (int(a), min(int(b) + 1, size) if b else size)
        if start >= size or start < 0:
            self.send_error(416)
            return None
        type(self).ranges_served += 1
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        return io.BytesIO(data[start:stop])


@contextmanager
def range_http(directory: Path):
    """Serve `directory` over HTTP on 127.0.0.1, a free port; yields (base URL, handler class)."""
    handler = type("Handler", (RangeHandler,), {"ranges_served": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


__all__ = ["loopback", "moto_s3", "range_http", "s3_env", "s3_in_environment", "guarded_env", "LOOPBACK_SITE"]
