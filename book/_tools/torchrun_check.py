"""``make torchrun-check``: one training stage under ``torchrun`` on this machine, killed and resumed.

On a prepared work folder (``prepare`` has run; for ``train-registration`` nothing else is needed):

1. the stage on 1 process (no ``torchrun``) and on N ``torchrun`` processes, each in a copy of the work
   folder, timed;
2. the N-process run again in a third copy, killed (SIGKILL to torchrun and its workers) once its first
   checkpoint is written, then started again: it resumes;
3. the resumed model is compared with the uninterrupted N-process one, weight by weight, and the
   histories line by line.

Writes ``<out>/torchrun_check.json``. On CPUs the ranks use ``gloo``; on 2 cores a speed-up is not to be
expected (the point is that the run is correct), on a GPU node the ranks use ``nccl``, one GPU each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

#: stage → (its CLI arguments, the checkpoint and the model it writes under the work folder)
STAGES = {
    "train-registration": (
        ["--regime", "real_all"],
        "registration/real_all/checkpoint.pt",
        "registration/real_all/model.pt",
    ),
    "train-vqae": ([], "vqae/checkpoint.pt", "vqae/model.pt"),
    "train-diffusion": (["--no-progress"], "diffusion/checkpoint.pt", "diffusion/model.pt"),
}


def _command(stage: str, work: Path, nproc: int, extra: Sequence[str]) -> list[str]:
    args = [stage, "--profile", "ci", "--work-dir", str(work), *STAGES[stage][0], *extra]
    if nproc == 1:
        return [sys.executable, "-m", "regdiff_core", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "-m",
        "regdiff_core",
        *args,
    ]


def _copy_work(src: Path, dst: Path) -> Path:
    """A fresh work folder holding ``src``'s prepared pairs, tokens and VQ-AE model (what the stages read)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    shutil.copytree(src / "prepared", dst / "prepared")
    for name in ("tokens.pt", "vqae/model.pt", "diffusion/model.pt"):
        if (src / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
    return dst


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    with log.open("w") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True, env=env)
    return time.perf_counter() - t0


def _run_and_kill(cmd: list[str], log: Path, ckpt: Path, after: float) -> int:
    """Start ``cmd`` in its own process group; SIGKILL the group ``after`` s past its first checkpoint."""
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        while not ckpt.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd} ended ({proc.returncode}) before writing {ckpt}; see {log}")
            time.sleep(0.2)
        time.sleep(after)
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every worker: a node that went away
        proc.wait()
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"])


def _weights(path: Path) -> list[torch.Tensor]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if "step1" in payload["weights"]:  # registration: both steps' networks
        return [t for step in ("step1", "step2") for t in payload["weights"][step].values()]
    return list(payload["weights"]["model"].values())  # training.save_model's layout


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="book/_tools/torchrun_check.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--work-dir", type=Path, required=True, help="a prepared ci work folder (read only)")
    parser.add_argument("--out", type=Path, default=Path("_build/torchrun-check"))
    parser.add_argument("--stage", choices=sorted(STAGES), default="train-registration")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--kill-after", type=float, default=2.0, help="seconds after the first checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.FIELD=VALUE")
    args = parser.parse_args(argv)
    extra = [x for o in args.overrides for x in ("--set", o)]
    _, ckpt_rel, model_rel = STAGES[args.stage]
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    # torchrun gives each rank one thread (OMP_NUM_THREADS=1) unless told otherwise; the one process is
    # timed both with its default threads and with one thread, as each rank has
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = (("1-rank", 1, None), ("1-rank-1-thread", 1, one_thread), (f"{args.nproc}-rank", args.nproc, None))
    for name, nproc, env in runs:
        work = _copy_work(args.work_dir, args.out / name)
        seconds[name] = round(
            _run(_command(args.stage, work, nproc, extra), args.out / f"{name}.log", env), 1
        )
        print(f"[torchrun-check] {args.stage}, {name}: {seconds[name]} s", flush=True)
    killed = _copy_work(args.work_dir, args.out / "killed")
    cmd = _command(args.stage, killed, args.nproc, extra)
    step = _run_and_kill(cmd, args.out / "killed.log", killed / ckpt_rel, args.kill_after)
    print(f"[torchrun-check] killed; the checkpoint holds step {step}; starting again", flush=True)
    _run(cmd, args.out / "resumed.log")
    full = args.out / f"{args.nproc}-rank"
    same = all(
        torch.equal(a, b)
        for a, b in zip(_weights(full / model_rel), _weights(killed / model_rel), strict=True)
    )
    history = Path(model_rel).parent / "history.csv"
    same_history = (full / history).read_text() == (killed / history).read_text()
    result = {
        "stage": args.stage,
        "nproc": args.nproc,
        "overrides": args.overrides,
        "seconds": seconds,
        "killed_at_checkpoint_step": step,
        "resumed_model_equals_uninterrupted": same,
        "resumed_history_equals_uninterrupted": same_history,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    (args.out / "torchrun_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if same and same_history else 1


if __name__ == "__main__":
    sys.exit(main())
