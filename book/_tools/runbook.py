"""Execute the chapter notebooks with papermill, in pipeline order, into the book's source folder.

``python book/_tools/runbook.py --profile ci --out book/chapters`` runs ``notebooks/0N_*.ipynb`` one
after another with the same ``data_dir``/``work_dir`` (later chapters read what earlier ones wrote)
and writes the executed copies to ``--out``. Jupyter Book then builds the pages from those copies
without executing anything, so the published book shows the outputs of exactly this run. papermill
stores the ipywidgets state in each executed notebook, so the widgets render on the page.

The notebook sources are never rewritten: the profile and folders travel as papermill parameters.
The folders are passed *relative to the notebooks' folder* (the kernel's working directory), so no
absolute path of the build machine is printed on a page; and the cell papermill injects with them is
tagged ``remove-cell`` in the executed copy, so the book does not show it (the values are on the
profiles page).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from regdiff_core.utils import metrics_dir

#: The checkout this script belongs to (it lives in ``book/_tools/``).
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Tag papermill gives the cell it injects; myst-nb leaves cells tagged ``remove-cell`` off the page.
INJECTED_TAG = "injected-parameters"
HIDE_TAG = "remove-cell"


def relative_to(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` (``../data``), or absolute where no relative path exists (another drive)."""
    try:
        return os.path.relpath(Path(path).resolve(), Path(start).resolve())
    except ValueError:
        return str(Path(path).resolve())


def hide_injected_parameters(notebook: Path) -> int:
    """Tag papermill's injected-parameters cell(s) of ``notebook`` with ``remove-cell``; return how many.

    Rewrites the file atomically (temporary file + rename).
    """
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    count = 0
    for cell in nb.cells:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if INJECTED_TAG in tags:
            count += 1
            if HIDE_TAG not in tags:
                tags.append(HIDE_TAG)
    tmp = notebook.with_name(f".{notebook.name}.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, notebook)
    return count


def notebook_paths(folder: Path) -> list[Path]:
    paths = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no chapter notebooks (NN_*.ipynb) in {folder}")
    return paths


def run_notebooks(
    *,
    profile: str,
    data_dir: Path,
    work_dir: Path,
    out_dir: Path,
    device: str = "auto",
    seed: int = 0,
    only: Sequence[str] = (),
    notebooks_dir: Path = REPO_ROOT / "notebooks",
) -> dict[str, float]:
    """Execute the notebooks; return seconds per notebook. Raises on the first failing notebook."""
    import papermill as pm  # imported here: only the book build needs it

    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("REGDIFF_METRICS_DIR", str(metrics_dir().resolve()))
    params = {
        "profile": profile,
        # relative to the kernel's working directory (the notebooks' folder): nothing machine-specific
        "data_dir": relative_to(data_dir, notebooks_dir),
        "work_dir": relative_to(work_dir, notebooks_dir),
        "device": device,
        "seed": seed,
    }
    seconds: dict[str, float] = {}
    for src in notebook_paths(notebooks_dir):
        if only and not any(src.stem.startswith(o) for o in only):
            continue
        dst = out_dir / src.name
        print(f"[runbook] {src.name}: profile={profile} → {dst}", flush=True)
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(
                str(src), str(dst), parameters=params, cwd=str(src.parent), kernel_name="python3",
                progress_bar=False, log_output=False,
            )  # fmt: skip
        except pm.PapermillExecutionError as err:
            raise SystemExit(
                f"[runbook] {src.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                f"          the executed copy with the traceback is {dst}"
            ) from None
        seconds[src.stem] = round(time.perf_counter() - t0, 1)
        hide_injected_parameters(dst)
        print(f"[runbook] {src.name}: {seconds[src.stem]:.1f} s", flush=True)
    summary = Path(os.environ["REGDIFF_METRICS_DIR"]) / "runbook.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps({"profile": profile, "seconds": seconds}, indent=2) + "\n")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="book/_tools/runbook.py", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="ci")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--work-dir", type=Path, default=Path("_build/work"))
    parser.add_argument("--out", type=Path, default=Path("book/chapters"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=(), help="notebook prefixes to run, e.g. 01 02")
    args = parser.parse_args(argv)
    seconds = run_notebooks(
        profile=args.profile, data_dir=args.data_dir, work_dir=args.work_dir, out_dir=args.out,
        device=args.device, seed=args.seed, only=args.only,
    )  # fmt: skip
    print(f"[runbook] done: {sum(seconds.values()):.0f} s in {len(seconds)} notebooks", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
