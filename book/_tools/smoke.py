"""``make smoke PROFILE=paper``: every CLI stage once, at the profile's full shapes, with the work cut to
the minimum — and each stage's seconds and peak memory.

The shapes are what breaks a full-scale run late (a volume that does not divide, a batch that does not
fit, a token grid the denoiser was not built for), and they are what this keeps: ``data.shape``, the
networks, the patch size, the token and registration grids. What it cuts is the *amount* of work, all
through ``--set``: one training case and one test case, 1 iteration per training stage at batch 1,
one synthetic pair with 2 sampling steps, 1 TTA iteration. Whole volumes go through the VQ-AE one at a
time (``vqae.encode_batch=1``). On a CPU the denoiser trains without dropout (:data:`CPU_ONLY`).

Each stage runs as its own ``python -m regdiff_core <stage>`` process, so the peak resident memory
(RSS) that :func:`os.wait4` reports is that stage's own; on CUDA the GPU memory is not included.
Training data: the paper's release (``data.train_dataset=unleashing-registration``, case 032), which the
data mirror holds, unless ``--profile-data`` keeps the profile's own dataset (Lung250M-4B for ``paper``
and ``colab``).

Left out on purpose: any check of quality (one iteration learns nothing); ``make notebooks`` is the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: ``--set`` overrides that cut the work and keep the shapes (every stage gets all of them).
MINIMAL_WORK: dict[str, str] = {
    "data.train_cases": "032",
    "data.test_cases": "002",
    "vqae.iterations": "1",
    "vqae.batch_size": "1",
    "vqae.encode_batch": "1",
    "vqae.ckpt_every": "1",
    "vqae.log_every": "1",
    "diffusion.iterations": "1",
    "diffusion.batch_size": "1",
    "diffusion.ckpt_every": "1",
    "diffusion.log_every": "1",
    "sampling.n_pairs": "1",
    "sampling.steps": "2",
    "sampling.batch_size": "1",
    "registration.iterations": "1",
    "registration.batch_size": "1",
    "registration.n_few": "1",
    "registration.n_synthetic": "1",
    "registration.ckpt_every": "1",
    "registration.log_every": "1",
    "evaluation.tta_iterations": "1",
}

#: Added on a CPU only. PyTorch's CPU attention has no fused kernel with dropout: with the seed's dropout
#: 0.1 it materialises every N×N attention matrix (N = 3328 tokens, 16 heads: 0.7 GB each in fp32) and
#: keeps them for the backward pass, and the paper denoiser's training step at batch 1 grew past 24 GB
#: of memory on the 24 GB build machine. On CUDA the fused kernels take dropout, and the profile's is kept.
CPU_ONLY: dict[str, str] = {"diffusion.dropout": "0"}

#: (stage, extra arguments), in pipeline order. ``synthetic_plus_few`` loads real and synthetic pairs.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prepare", ("--no-progress",)),
    ("train-vqae", ()),
    ("encode", ()),
    ("train-diffusion", ()),
    ("sample", ("--no-progress",)),
    ("train-registration", ("--regime", "synthetic_plus_few")),
    ("evaluate", ("--checkpoint", "synthetic_plus_few", "--no-progress")),
)


def run_stage(argv: Sequence[str], log_path: Path) -> dict[str, Any]:
    """Run one ``python -m regdiff_core`` command; return its exit code, wall seconds and peak RSS (GB)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "regdiff_core", *argv], stdout=log, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss: kilobytes on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return {
        "returncode": proc.returncode,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(usage.ru_maxrss * scale / 1e9, 2),
        "log": str(log_path),
    }


def smoke(
    profile: str,
    data_dir: Path,
    work_dir: Path,
    device: str = "auto",
    profile_data: bool = False,
    stages: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the stages (default all) in ``work_dir``; stop at the first failure. Returns the report."""
    work_dir.mkdir(parents=True, exist_ok=True)
    overrides = dict(MINIMAL_WORK)
    from regdiff_core.utils import resolve_device

    if resolve_device(device).type == "cpu":
        overrides.update(CPU_ONLY)
    if not profile_data:
        overrides["data.train_dataset"] = "unleashing-registration"
    common = [
        "--profile",
        profile,
        "--data-dir",
        str(data_dir),
        "--work-dir",
        str(work_dir),
        "--device",
        device,
    ]
    for key, value in overrides.items():
        common += ["--set", f"{key}={value}"]
    report: dict[str, Any] = {"profile": profile, "device": device, "overrides": overrides, "stages": {}}
    for stage, extra in STAGES:
        if stages and stage not in stages:
            continue
        result = run_stage([stage, *common, *extra], work_dir / f"smoke_{stage}.log")
        report["stages"][stage] = result
        ok = (
            "ok"
            if result["returncode"] == 0
            else f"FAILED (exit {result['returncode']}, see {result['log']})"
        )
        print(f"[smoke] {stage:>18}: {result['seconds']:8.1f} s, peak RSS {result['peak_rss_gb']:6.2f} GB  {ok}",
              flush=True)  # fmt: skip
        if result["returncode"] != 0:
            break
    report["ok"] = all(r["returncode"] == 0 for r in report["stages"].values()) and bool(report["stages"])
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (stage, seconds, peak RSS)."""
    lines = ["| stage | seconds | peak RSS (GB) |", "| --- | ---: | ---: |"]
    for stage, r in report["stages"].items():
        lines.append(f"| `{stage}` | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="book/_tools/smoke.py", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--work-dir", type=Path, default=None, help="default _build/smoke-<profile>")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile-data", action="store_true", help="train on the profile's own dataset")
    parser.add_argument("--only", nargs="*", default=(), help="stages to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="report JSON (default <work-dir>/smoke.json)")
    args = parser.parse_args(argv)
    work_dir = args.work_dir or Path("_build") / f"smoke-{args.profile}"
    report = smoke(args.profile, args.data_dir, work_dir, args.device, args.profile_data, args.only)
    out = args.out or work_dir / "smoke.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report) + f"[smoke] {'passed' if report['ok'] else 'FAILED'}; report → {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
