"""A wheelhouse for a GPU node without internet: every wheel regdiff needs beyond PyTorch, in one folder.

On a machine with internet (any OS: the wheels are chosen for the node's Python and platform)::

    python -m data_download.wheelhouse _build/wheelhouse --python-version 3.11 --platform manylinux_2_28_x86_64
    python -m data_download.wheelhouse _build/wheelhouse-lean --lean      # without numpy, scipy, matplotlib, pillow

Then, on the node, next to a Python that already has its own PyTorch (``make install-offline``)::

    pip install --no-index --find-links <wheelhouse> -r <wheelhouse>/requirements.txt -e .

What goes in: the project's dependencies (``pyproject.toml``), the packages that run the notebooks
(papermill, ipykernel, nbformat: ``make gpu-book``/``gpu-check`` need no Jupyter Book), the build
backend for ``pip install -e .`` (setuptools), and everything they need, resolved by pip for the node
(``pip install --dry-run --report``) and downloaded with ``pip download --no-deps``. What stays out:
PyTorch and what only it brings (``torch``, ``triton``, ``nvidia-*``; the node's own build is kept, and
with it its CUDA) and, with ``--lean``, what a PyTorch GPU image already carries (:data:`LEAN_SKIP`).
``requirements.txt`` names the packages without pins, so a package the node already has (its NumPy,
built with its PyTorch) is kept rather than replaced.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

#: PyTorch (the node's own build stays, and with it its CUDA); what only it needs stays out with it.
TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "triton")
#: What a PyTorch GPU image (NGC's, or pytorch/pytorch with the scientific stack) already carries: left
#: out of the lean wheelhouse, with what only they need (matplotlib's fonttools, kiwisolver, …).
LEAN_SKIP = ("numpy", "scipy", "matplotlib", "pillow")
#: From the ``book`` extra, what executing the notebooks needs (Jupyter Book builds pages: not on the node).
NOTEBOOK_PACKAGES = ("papermill", "ipykernel", "nbformat")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def node_requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """The requirement strings a node needs: the dependencies but torch, the notebook runners, setuptools."""
    meta = tomllib.loads(pyproject.read_text())
    deps = list(meta["project"]["dependencies"])
    book = meta["project"]["optional-dependencies"]["book"]
    deps += [r for r in book if _norm(re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0]) in NOTEBOOK_PACKAGES]
    deps += list(meta["build-system"]["requires"])
    return [r for r in deps if _norm(re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0]) not in TORCH_FAMILY]


#: the legacy names of three manylinux versions (PEP 600)
_LEGACY = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


def expand_platforms(platforms: Sequence[str]) -> list[str]:
    """Each ``manylinux_2_X_<arch>`` with every older glibc it runs (down to 2.5, legacy names too): pip
    matches ``--platform`` tags exactly, and a wheel built for an older glibc runs on a newer one."""
    out: list[str] = []
    for p in platforms:
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", p)
        if not m:
            out.append(p)
            continue
        glibc, arch = int(m.group(1)), m.group(2)
        for minor in range(glibc, 4, -1):
            out.append(f"manylinux_2_{minor}_{arch}")
            if minor in _LEGACY:
                out.append(f"{_LEGACY[minor]}_{arch}")
    return list(dict.fromkeys(out))


def _target(python_version: str | None, platforms: Sequence[str]) -> list[str]:
    args = ["--only-binary=:all:"]
    if python_version:
        args += ["--python-version", python_version]
    for p in expand_platforms(platforms):
        args += ["--platform", p]
    return args


def resolve(
    requirements: Sequence[str], python_version: str | None, platforms: Sequence[str], leave_out: set[str]
) -> list[tuple[str, str]]:
    """``[(name, version)]`` of the packages the node needs for ``requirements``, without ``leave_out``
    (normalised names) and without what only those bring.

    pip resolves for the node (``pip install --dry-run --report``: torch's metadata comes from the index,
    its wheel is not downloaded); then the packages are walked from ``requirements`` along their
    dependencies, never entering a left-out package — so torch's own dependencies (sympy, networkx, …)
    stay out, while a package that something else needs too stays in.
    """
    from packaging.markers import default_environment

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--report", str(report), "--target", str(Path(tmp) / "target"), *_target(python_version, platforms),
            *requirements,
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
        data = json.loads(report.read_text())
    env = default_environment()
    if python_version:
        env.update(python_version=python_version, python_full_version=f"{python_version}.0")
    return walk({i["metadata"]["name"]: i["metadata"] for i in data["install"]}, requirements, leave_out, env)


def walk(
    found: dict[str, dict],
    requirements: Sequence[str],
    leave_out: set[str],
    env: dict[str, str] | None = None,
) -> list[tuple[str, str]]:
    """The packages reached from ``requirements`` through ``found`` (name → metadata with ``version`` and
    ``requires_dist``, as in pip's report) without entering ``leave_out``; markers evaluated in ``env``."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = dict(env or default_environment())
    found = {_norm(name): {**meta, "name": name} for name, meta in found.items()}
    keep: dict[str, str] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        if name in leave_out or name not in found or name in keep:
            continue
        keep[name] = found[name]["version"]
        for text in found[name].get("requires_dist") or []:
            dep = Requirement(text)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in extras):
                todo.append(dep)
    return sorted((found[n]["name"], v) for n, v in keep.items())


def build(
    out: Path,
    *,
    python_version: str | None = None,
    platforms: Sequence[str] = (),
    lean: bool = False,
) -> dict:
    """Download the node's wheels into ``out`` and write ``out/requirements.txt``; return a summary."""
    out.mkdir(parents=True, exist_ok=True)
    requirements = node_requirements()
    skip = set(LEAN_SKIP) if lean else set()
    packages = resolve(requirements, python_version, platforms, leave_out={*TORCH_FAMILY, *skip})
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(out),
        *_target(python_version, platforms), *(f"{n}=={v}" for n, v in packages),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    kept = [r for r in requirements if _norm(re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0]) not in skip]
    (out / "requirements.txt").write_text(
        "# regdiff on a node without internet: pip install --no-index --find-links . -r requirements.txt -e <repo>\n"
        + "".join(f"{r}\n" for r in kept)
    )
    wheels = sorted(out.glob("*.whl"))
    summary = {
        "python_version": python_version or f"{sys.version_info.major}.{sys.version_info.minor}",
        "platforms": list(platforms) or ["this machine's"],
        "lean": lean,
        "left_out": ["torch and what only it needs"] + sorted(skip),
        "wheels": len(wheels),
        "megabytes": round(sum(w.stat().st_size for w in wheels) / 1e6, 1),
    }
    (out / "wheelhouse.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_download.wheelhouse", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out", type=Path, help="the wheelhouse folder")
    parser.add_argument(
        "--python-version", default=None, help="the node's Python, e.g. 3.11 (default: this one)"
    )
    parser.add_argument(
        "--platform", action="append", default=[],
        help="the node's platform tag, e.g. manylinux_2_28_x86_64 (repeatable; default: this machine's)",
    )  # fmt: skip
    parser.add_argument("--lean", action="store_true", help=f"leave out {', '.join(LEAN_SKIP)}")
    args = parser.parse_args(argv)
    summary = build(args.out, python_version=args.python_version, platforms=args.platform, lean=args.lean)
    print(
        f"wheelhouse {args.out}: {summary['wheels']} wheels, {summary['megabytes']} MB for Python "
        f"{summary['python_version']} ({', '.join(summary['platforms'])}); left out: {', '.join(summary['left_out'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
