"""Fetch the JavaScript the built book needs, so that it works without internet.

Jupyter Book 1 pages load MathJax, RequireJS and the ipywidgets HTML manager from public CDNs. Opened
offline (or served from a machine without internet, like this project's CI), the math stays raw TeX and
the widgets stay empty. ``python -m data_download.book_assets DEST`` fetches the same files from the
npm registry — the official packages the CDNs serve them from — with ``npm pack``, checks each tarball
against the integrity hash pinned below, and unpacks the files the pages use into ``DEST``::

    DEST/mathjax/tex-mml-chtml.js (+ its fonts and extensions)   ← mathjax@3.2.2, folder es5/
    DEST/require.js                                              ← requirejs@2.3.7
    DEST/@jupyter-widgets/html-manager/dist/embed-amd.js (+ fonts) ← @jupyter-widgets/html-manager@1.0.6
    DEST/font-awesome/{css,fonts}/                                ← font-awesome@4.7.0

``_config.yml`` adds ``DEST`` (``_build/book_assets``) to the static files and points ``mathjax_path``
and ``nb_ipywidgets_js`` at these copies. The HTML manager keeps its npm path below ``_static/`` because
it finds its fonts relative to its RequireJS module name (``book/_static/widgets-offline.js`` maps that
name to ``_static/@jupyter-widgets``). Font Awesome 4 is for matplotlib's animation player, which links
it from a CDN (``book/_ext/offline_links.py`` rewrites that link). A second run finds the files and does
nothing.

Why npm and not PyPI: MathJax on PyPI comes as ``sphinx-mathjax-offline`` (0.0.2, one release in 2022,
unmaintained) or ``jupyter-server-mathjax`` (MathJax 2, which Jupyter Book 1 no longer configures);
neither RequireJS nor the widgets' HTML manager is on PyPI at all. ``npm`` is Debian's ``npm`` package.

Left out: source maps (``*.map``, 11 MB) and MathJax's other builds (``es5`` is the one the CDN default
``tex-mml-chtml.js`` lives in).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple


class Asset(NamedTuple):
    spec: str  # npm package@version
    integrity: str  # the registry's sha512, as `npm pack --json` reports it
    member: str  # folder or file inside the tarball (below `package/`)
    target: str  # where it goes below DEST


ASSETS: tuple[Asset, ...] = (
    Asset(
        "mathjax@3.2.2",
        "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
        "es5",
        "mathjax",
    ),
    Asset(
        "requirejs@2.3.7",
        "sha512-DouTG8T1WanGok6Qjg2SXuCMzszOo0eHeH9hDZ5Y4x8Je+9JB38HdTLT4/VA8OaUhBa0JPVHJ0pyBkM1z+pDsw==",
        "require.js",
        "require.js",
    ),
    Asset(
        "@jupyter-widgets/html-manager@1.0.6",
        "sha512-+Mn+Ra8wyIHrYaUpfmf9A3dsLkt/NuwzPQN8sthdxBD35VV5cOJbpmgMhNR27n/rmP3mKyEe0PWCJrtZrXTXDQ==",
        "dist",
        "@jupyter-widgets/html-manager/dist",
    ),
    Asset(
        "font-awesome@4.7.0",
        "sha512-U6kGnykA/6bFmg1M/oT9EkFeIYv7JlX3bozwQJWiiLz6L0w3F5vBVPxHlwyX/vtNq1ckcpRKOB9f2Qal/VtFpg==",
        "css",
        "font-awesome/css",
    ),
    Asset(
        "font-awesome@4.7.0",
        "sha512-U6kGnykA/6bFmg1M/oT9EkFeIYv7JlX3bozwQJWiiLz6L0w3F5vBVPxHlwyX/vtNq1ckcpRKOB9f2Qal/VtFpg==",
        "fonts",
        "font-awesome/fonts",
    ),
)

#: A file that marks a complete unpack (written last).
STAMP = ".complete"


def sri_sha512(path: Path) -> str:
    """Subresource-integrity string (``sha512-<base64>``) of a file, the form npm reports."""
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def _npm_pack(spec: str, folder: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit(
            "[book_assets] `npm` not found: install it (Debian: apt-get install -y npm) to fetch the book's "
            "MathJax and widget scripts"
        )
    done = subprocess.run(
        [npm, "pack", spec, "--pack-destination", str(folder), "--silent"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"[book_assets] `npm pack {spec}` failed:\n{done.stderr.strip()}")
    names = [line.strip() for line in done.stdout.splitlines() if line.strip().endswith(".tgz")]
    if not names or not (folder / names[-1]).is_file():
        raise SystemExit(f"[book_assets] `npm pack {spec}` wrote no tarball (stdout: {done.stdout!r})")
    return folder / names[-1]


def unpack(tarball: Path, asset: Asset, dest: Path) -> None:
    """Check ``tarball`` against ``asset.integrity`` and copy ``asset.member`` to ``dest/asset.target``."""
    actual = sri_sha512(tarball)
    if actual != asset.integrity:
        raise SystemExit(
            f"[book_assets] {asset.spec}: integrity mismatch for {tarball.name}\n"
            f"  expected {asset.integrity}\n  got      {actual}"
        )
    prefix = f"package/{asset.member}"
    target = dest / asset.target
    with tarfile.open(tarball) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.isfile()
            and (m.name == prefix or m.name.startswith(prefix + "/"))
            and not m.name.endswith(".map")
        ]
        if not members:
            raise SystemExit(f"[book_assets] {asset.spec}: {asset.member} not in {tarball.name}")
        for m in members:
            rel = Path(m.name).relative_to(prefix) if m.name != prefix else Path()
            out = target / rel if rel.parts else target
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            tmp = out.with_name(out.name + ".tmp")
            with src, open(tmp, "wb") as fh:
                shutil.copyfileobj(src, fh)
            tmp.replace(out)


def fetch_assets(dest: Path, assets: Sequence[Asset] = ASSETS) -> Path:
    """Fetch and unpack every asset into ``dest`` unless ``dest`` already holds this exact set."""
    dest = Path(dest)
    stamp = dest / STAMP
    wanted = "\n".join(f"{a.spec} {a.integrity}" for a in assets) + "\n"
    if stamp.is_file() and stamp.read_text() == wanted:
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        for asset in assets:
            print(f"[book_assets] {asset.spec} → {dest / asset.target}", flush=True)
            unpack(_npm_pack(asset.spec, Path(tmp)), asset, dest)
    stamp.write_text(wanted)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_download.book_assets", description=__doc__.splitlines()[0]
    )
    parser.add_argument("dest", type=Path, nargs="?", default=Path("_build/book_assets"))
    args = parser.parse_args(argv)
    fetch_assets(args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
