"""Serve a local folder over HTTP on 127.0.0.1, so the real download code can be pointed at a mirror.

pooch downloads over HTTP(S) only (it cannot read ``file://`` URLs), so tests and CI serve the read-only
data mirror through Python's own :class:`http.server.ThreadingHTTPServer` on a free local port.

Two ways to use it::

    with serve("../shared/data/unleashing-registration") as url:
        fetch("unleashing-registration", "data", base_url=url)

    # serve DIR, run CMD with REGDIFF_DATA_URL=<url>, stop the server, exit with CMD's exit code
    python -m data_download.mirror DIR -- CMD ARGS...
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _QuietHandler(SimpleHTTPRequestHandler):
    """A static-file handler that does not log every request to stderr."""

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@contextlib.contextmanager
def serve(directory: str | Path, handler: type[SimpleHTTPRequestHandler] = _QuietHandler) -> Iterator[str]:
    """Serve ``directory`` on ``http://127.0.0.1:<free port>`` in a background thread; yield that base URL.

    The URL has no trailing slash: ``f"{url}/dilated_vessels_10/case_032_1.nii.gz"`` is a file.
    The server stops when the ``with`` block ends.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"mirror folder {directory} does not exist")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def main(argv: list[str] | None = None) -> int:
    """``python -m data_download.mirror DIR -- CMD ARGS...``; returns CMD's exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv or argv.index("--") != 1 or len(argv) < 3:
        print("usage: python -m data_download.mirror DIR -- CMD [ARGS...]", file=sys.stderr)
        return 2
    directory, command = argv[0], argv[2:]
    try:
        with serve(directory) as url:
            print(f"serving {directory} at {url}", file=sys.stderr)
            return subprocess.call(command, env={**os.environ, "REGDIFF_DATA_URL": url})
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
