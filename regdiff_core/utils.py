"""Small shared helpers: device choice, seeding, folders (Google Drive on Colab), mixed precision, and
the metrics files.

Every chapter writes its key numbers with :func:`write_metrics` to ``_build/metrics/<notebook>.json``;
the book's prose quotes those files, never numbers typed by hand.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

#: The repository root (where ``_config.yml`` lives) when running from a checkout.
REPO_ROOT = Path(__file__).resolve().parent.parent


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, else Apple MPS, else CPU. Anything else is passed to torch.

    On Colab, ``"auto"`` without a GPU prints :data:`NO_GPU_ON_COLAB` (how to pick a GPU runtime) before
    falling back to the CPU.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        if on_colab():
            # a Colab user who forgot the GPU runtime would otherwise wait days for an hour's chapter
            print(NO_GPU_ON_COLAB, flush=True)
        return torch.device("cpu")
    try:
        out = torch.device(device)
    except RuntimeError as err:
        raise DeviceError(f"device {device!r} is not a torch device (try 'auto', 'cpu' or 'cuda')") from err
    if out.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {device}: this machine has no usable CUDA GPU (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or --device auto"
            )
        if out.index is not None and out.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) exist (cuda:0 …)"
            )
    if out.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"--device {device}: Apple MPS is not available here; use --device cpu or auto")
    return out


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same way.

    On CPU, runs are bit-for-bit repeatable given the seed. On CUDA some kernels are not
    deterministic; we do not force ``torch.use_deterministic_algorithms`` there (it slows training
    and errors on several 3D ops), so GPU runs agree only statistically.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def default_data_dir() -> Path:
    """``$REGDIFF_DATA_DIR`` or ``./data``: where downloads land (one sub-folder per dataset)."""
    return Path(os.environ.get("REGDIFF_DATA_DIR", "data")).expanduser()


def default_work_dir() -> Path:
    """``$REGDIFF_WORK_DIR`` or ``./work``: prepared tensors, checkpoints, tokens, synthetic pairs."""
    return Path(os.environ.get("REGDIFF_WORK_DIR", "work")).expanduser()


#: The message :func:`resolve_device` prints on a Colab runtime without a GPU.
NO_GPU_ON_COLAB = """
================================================================================================
  NO GPU: this Colab runtime has only a CPU, so this chapter runs on the CPU.
  With profile "colab" a chapter takes about an hour on a GPU and many hours (days) on a CPU.

  To use a GPU: Runtime → Change runtime type → Hardware accelerator: GPU (e.g. T4) → Save,
  then run the notebook again from the top. With work_dir = "drive" nothing done so far is lost.
  (Profile "ci" is small enough for a CPU runtime: minutes per chapter.)
================================================================================================
"""

#: Where Colab mounts Google Drive, and the folder in it that ``"drive"`` folders use.
DRIVE_MOUNT = Path("/content/drive")
DRIVE_FOLDER = Path("MyDrive") / "regdiff"


def on_colab() -> bool:
    """True inside a Google Colab runtime (where the ``google.colab`` module exists)."""
    try:
        import google.colab  # noqa: F401
    except ImportError:
        return False
    return True


class RunFolders(NamedTuple):
    """A notebook's folders: ``data`` (downloads) and ``work`` (everything the chapters write)."""

    data: Path
    work: Path


def run_folders(
    data_dir: str | Path | None = None, work_dir: str | Path | None = None, mount_point: Path = DRIVE_MOUNT
) -> RunFolders:
    """The folders of a notebook's ``data_dir`` and ``work_dir`` parameters.

    ``None`` → :func:`default_data_dir` / :func:`default_work_dir`; a path → that path; ``"drive"`` (on
    Colab only) → mount Google Drive at ``mount_point`` and use ``MyDrive/regdiff/data`` or ``…/work``
    there. ``work_dir="drive"`` with ``data_dir=None`` keeps the downloads on Drive too. A Colab runtime
    forgets its own disk when it is reset; Drive keeps the checkpoints, so running the notebook again
    resumes training from the last one (see ``book/running.md``). Prints no path: the book shows this
    cell's output.
    """
    drive_work = str(work_dir) == "drive"
    drive_data = str(data_dir) == "drive" or (drive_work and data_dir is None)
    if drive_work or drive_data:
        if not on_colab():
            raise ValueError(
                '"drive" keeps data_dir / work_dir on Google Drive and works only on Colab; elsewhere give '
                "a folder, or None for $REGDIFF_DATA_DIR / $REGDIFF_WORK_DIR (default ./data, ./work)"
            )
        from google.colab import drive

        drive.mount(str(mount_point))
        root = Path(mount_point) / DRIVE_FOLDER
        kept = " and ".join(n for n, on in (("downloads", drive_data), ("work", drive_work)) if on)
        print(
            f"Google Drive mounted: {kept} kept in My Drive/{DRIVE_FOLDER.name}/. After a runtime reset, run "
            "the notebook again from the top: training resumes from its last checkpoint there."
        )
    else:
        root = None
    data = root / "data" if drive_data else Path(data_dir).expanduser() if data_dir else default_data_dir()
    work = root / "work" if drive_work else Path(work_dir).expanduser() if work_dir else default_work_dir()
    return RunFolders(data=data, work=work)


def metrics_dir() -> Path:
    """``$REGDIFF_METRICS_DIR``, else ``<repo>/_build/metrics`` in a checkout, else ``./_build/metrics``."""
    env = os.environ.get("REGDIFF_METRICS_DIR")
    if env:
        return Path(env).expanduser()
    # in a checkout, next to the book; installed elsewhere (Colab), under the current folder
    root = REPO_ROOT if (REPO_ROOT / "_config.yml").exists() else Path.cwd()
    return root / "_build" / "metrics"


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_metrics(notebook: str, metrics: dict[str, Any], directory: Path | None = None) -> Path:
    """Write ``metrics`` to ``<metrics_dir>/<notebook>.json`` atomically and return the path.

    ``notebook`` is the notebook's stem, e.g. ``"01_data_preparation"``. Tensors and NumPy values
    are converted; non-finite floats become ``null`` (JSON has no NaN).
    """
    directory = Path(directory) if directory is not None else metrics_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{notebook}.json"
    return atomic_write_text(path, json.dumps(jsonable(metrics), indent=2, sort_keys=True) + "\n")


def read_metrics(notebook: str, directory: Path | None = None) -> dict[str, Any]:
    directory = Path(directory) if directory is not None else metrics_dir()
    path = directory / f"{notebook}.json"
    if not path.exists():
        raise FileNotFoundError(f"no metrics for {notebook!r} at {path}: run that chapter first")
    return json.loads(path.read_text())


def autocast(device: torch.device, enabled: bool = True, dtype: torch.dtype = torch.float16):
    """Mixed precision on CUDA only; a no-op context everywhere else (CPU runs stay fp32 and exact)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


@contextlib.contextmanager
def timer() -> Iterator[dict[str, float]]:
    """``with timer() as t: ...`` then ``t["seconds"]`` holds the wall time of the block."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but belongs to someone else (or cannot tell): keep
        return True
    return True


def remove_orphans(path: Path) -> list[Path]:
    """Remove ``.{path.name}.tmp-<pid>`` files (and folders) next to ``path`` whose process is gone.

    :func:`atomic_torch_save` writes there; a process killed mid-write (SIGKILL, power loss) leaves
    its temporary file behind, and the next writer of the same file removes it. Returns what was removed.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters ``*?[`` escaped."""
    import glob

    return glob.escape(name)


def _not_the_writer() -> bool:
    """Under ``torchrun`` only rank 0 writes shared files: the other ranks hold the same state."""
    from regdiff_core.distributed import is_main

    return not is_main()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (no half-written file ever).

    Under ``torchrun``, ranks other than 0 write nothing and return ``path`` (see :func:`atomic_torch_save`).
    """
    path = Path(path)
    if _not_the_writer():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: a kill never leaves half a file.

    Temporary files of earlier writers of ``path`` that were killed mid-write are removed first.
    Under ``torchrun`` (:mod:`regdiff_core.distributed`) rank 0 alone writes — every rank holds the same
    weights — and the other ranks return ``path`` without writing.
    """
    path = Path(path)
    if _not_the_writer():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def markdown_table(rows: Sequence[dict[str, Any]], digits: int | None = None) -> str:
    """Rows (dicts with the keys of the first) as a Markdown table, for ``IPython.display.Markdown``.

    Floats to ``digits`` decimals (None: 4 significant digits); a 3-tuple (a shape or spacing) as
    1×2×3, a longer tuple as a list; a missing value or None as "—".
    """
    if not rows:
        return ""
    keys = list(rows[0])

    def fmt(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, tuple):
            return ("×" if len(v) == 3 else ", ").join(str(x) for x in v)
        if isinstance(v, float):
            return f"{v:.4g}" if digits is None else f"{v:.{digits}f}"
        return str(v)

    def cell(text: Any) -> str:
        # a bare | inside a header or value (|u|, |φ∘φ⁻¹ − id|) would split the cell
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(k) for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(fmt(r.get(k))) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested metrics as ``[(dotted key, leaf value)]`` in insertion order.

    Dicts nest with ``.`` (``regimes.real_all.final_loss``); a list of dicts is numbered
    (``restart_comparison[0].steps``); a list of scalars stays one value.
    """
    out: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += flatten_metrics(value, prefix=name + ".") if value else [(name, "{}")]
        elif isinstance(value, list | tuple) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out += flatten_metrics(item, prefix=f"{name}[{i}].")
        else:
            out.append((name, value))
    return out


def summary_table(metrics: dict[str, Any], collapsed: bool = True) -> str:
    """A chapter's metrics dict as a two-column Markdown table (``metric``, ``value``), for the page.

    Floats to 4 significant digits, lists of numbers as ``64 × 52 × 64`` for three and comma-separated
    otherwise, None as "—"; nested dicts flattened by :func:`flatten_metrics`. ``collapsed``: inside a
    closed MyST ``{dropdown}`` that names the row count, because a chapter writes dozens of numbers and
    the page quotes only a few of them (each chapter's "What we saw"); the reader opens it on demand.
    """

    def fmt(v: Any) -> str:
        v = jsonable(v)
        if v is None:
            return "—"
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            sep = " × " if len(v) == 3 and all(isinstance(x, int) for x in v) else ", "
            return sep.join(fmt(x) for x in v)
        return str(v).replace("\n", " ")

    rows = [{"metric": f"`{k}`", "value": fmt(v)} for k, v in flatten_metrics(metrics)]
    table = markdown_table(rows)
    if not collapsed:
        return table
    return f":::{{dropdown}} All {len(rows)} numbers of the chapter's metrics file\n{table}\n:::"


#: Where :func:`exercise_timer` records how long each exercise's solution took (one file per notebook).
EXERCISES_DIR = "exercises"


@contextlib.contextmanager
def exercise_timer(notebook: str, exercise: str, directory: Path | None = None) -> Iterator[dict[str, float]]:
    """Time an exercise's solution and add ``{exercise: seconds}`` to ``<metrics>/exercises/<notebook>.json``.

    The "For teachers" page lists these times; nothing is recorded if the block raises.
    """
    folder = (Path(directory) if directory is not None else metrics_dir()) / EXERCISES_DIR
    out: dict[str, float] = {}
    start = time.perf_counter()
    yield out
    out["seconds"] = time.perf_counter() - start
    path = folder / f"{notebook}.json"
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    recorded[exercise] = round(out["seconds"], 2)
    write_metrics(notebook, recorded, directory=folder)
