"""``make gpu-check``: paper-size timings of every stage, on whatever accelerator is present.

Each chapter module that has a paper-size cost defines ``gpu_benchmark(device, small=False) -> dict``;
this script calls them in pipeline order and writes one JSON file. ``--small`` runs the same code at
toy sizes, which is how ``make test`` checks on a CPU that the script itself works.

One stage failing (out of memory, say) is recorded in the JSON and does not stop the others.
The whole paper-size run is sized to finish in under 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from regdiff_core import __version__
from regdiff_core.utils import resolve_device

#: Modules with a ``gpu_benchmark`` function, in pipeline order.
BENCHMARK_MODULES = ("regdiff_core.vqae", "regdiff_core.diffusion", "regdiff_core.registration")


def run_benchmarks(
    device: torch.device, small: bool, modules: Sequence[str] = BENCHMARK_MODULES
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "regdiff_version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "small": small,
        "stages": {},
    }
    for name in modules:
        short = name.rsplit(".", 1)[-1]
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(name)
            bench = getattr(module, "gpu_benchmark", None)
            if bench is None:
                report["stages"][short] = {"skipped": f"{name} has no gpu_benchmark"}
                continue
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            result = bench(device, small=small)
            result["wall_seconds"] = round(time.perf_counter() - t0, 2)
            report["stages"][short] = result
        except Exception as err:  # record and carry on: one OOM must not hide the other stages
            report["stages"][short] = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(),
            }
        print(f"[gpu-check] {short}: {json.dumps(report['stages'][short], default=str)[:400]}", flush=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m regdiff_core.gpu_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--small", action="store_true", help="toy sizes (a CPU smoke test of this script)")
    parser.add_argument("--out", type=Path, default=Path("_build/gpu_check.json"))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu" and not args.small:
        print(
            "[gpu-check] no GPU found: paper-size timings on a CPU take hours. Use --small for a smoke test."
        )
        return 2
    report = run_benchmarks(device, small=args.small)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"[gpu-check] wrote {args.out}")
    failed = [k for k, v in report["stages"].items() if "error" in v]
    return 1 if failed else 0


def register_cli(subparsers, common) -> None:
    p = subparsers.add_parser("gpu-check", parents=[common], help="paper-size timings on the GPU")
    p.add_argument("--small", action="store_true")
    p.add_argument("--out", type=Path, default=Path("_build/gpu_check.json"))
    p.set_defaults(
        func=lambda args, profile: main(
            ["--device", args.device, "--out", str(args.out)] + (["--small"] if args.small else [])
        )
    )


if __name__ == "__main__":
    sys.exit(main())
