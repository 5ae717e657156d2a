"""Serve a local folder over HTTP on 127.0.0.1, so the real download code can be pointed at a mirror.

pooch downloads over HTTP(S) only (it cannot read ``file://`` URLs), so tests and CI serve the read-only
data mirror through Python's own :class:`http.server.ThreadingHTTPServer` on a free local port.

Two ways to use it::

    with serve("../shared/data/unleashing-registration") as url:
        fetch("unleashing-registration", "data", base_url=url)

    # serve DIR, run CMD with REGDIFF_DATA_URL=<url>, stop the server, exit with CMD's exit code
    python -m data_download.mirror DIR -- CMD ARGS...

    # more folders, each on its own port and named by the variable its dataset reads
    python -m data_download.mirror DIR REGDIFF_LUNG250M_REPO_URL=DIR2 -- CMD ARGS...
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
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


USAGE = "usage: python -m data_download.mirror DIR [VAR=DIR ...] -- CMD [ARGS...]"


def main(argv: list[str] | None = None) -> int:
    """``python -m data_download.mirror DIR [VAR=DIR ...] -- CMD ARGS...``; returns CMD's exit code.

    The first ``DIR`` is served as ``$REGDIFF_DATA_URL``; each ``VAR=DIR`` serves another folder on its
    own port and sets the environment variable ``VAR`` (e.g. ``REGDIFF_LUNG250M_REPO_URL``) to its URL.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv or argv.index("--") < 1 or len(argv) < argv.index("--") + 2:
        print(USAGE, file=sys.stderr)
        return 2
    split = argv.index("--")
    folders, command = argv[:split], argv[split + 1 :]
    served: dict[str, str] = {"REGDIFF_DATA_URL": folders[0]}
    for item in folders[1:]:
        var, eq, directory = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var) or not directory:
            print(f"error: {item!r} is not VAR=DIR\n{USAGE}", file=sys.stderr)
            return 2
        served[var] = directory
    try:
        with contextlib.ExitStack() as stack:
            env = dict(os.environ)
            for var, directory in served.items():
                env[var] = stack.enter_context(serve(directory))
                print(f"serving {directory} at {env[var]} (${var})", file=sys.stderr)
            return subprocess.call(command, env=env)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
