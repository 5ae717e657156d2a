"""The one training loop every chapter uses: progress bar, history, atomic checkpoints, resume, NaN guard.

A chapter supplies a ``step_fn(step) -> {"loss": ..., ...}`` that does one optimisation step (forward,
backward, optimiser and scheduler updates) and a ``state`` dict of everything with a ``state_dict()``
(networks, optimisers, schedulers, gradient scalers, EMA copies). :func:`train_loop` does the rest:

- calls ``step_fn`` for steps ``1 … n_steps`` and keeps every step's numbers in ``history``;
- stops with :class:`NonFiniteLossError` naming the step when the loss is NaN or infinite;
- every ``ckpt_every`` steps (and at the end) writes ``state``, the history and all random-number
  generator states to ``ckpt_path`` atomically (temporary file + rename, so a kill mid-write leaves the
  previous checkpoint intact);
- when ``ckpt_path`` already exists, resumes after its step. Because the RNG states travel with the
  checkpoint, a resumed CPU run continues exactly as the uninterrupted one would have.

Written by hand rather than with a trainer framework (Lightning, MONAI's ignite engines) so that the
reader sees the whole loop in one screen, and because those add a dependency the book otherwise lacks.
"""

from __future__ import annotations

import csv
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from regdiff_core.utils import atomic_torch_save


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the value."""


@dataclass
class TrainResult:
    """``history``: one dict per step (``step`` plus what ``step_fn`` returned); ``seconds``: this call only."""

    history: list[dict[str, float]]
    steps: int
    resumed_from: int | None
    seconds: float
    checkpoint: Path | None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Strip the prefixes ``torch.compile`` (``_orig_mod.``) and DataParallel (``module.``) add to keys."""
    out = {}
    for key, value in state_dict.items():
        # in any order and any depth: DataParallel of a compiled module gives "module._orig_mod."
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        out[key.replace("._orig_mod.", ".")] = value
    return out


def load_weights(
    module: torch.nn.Module, source: str | Path | Mapping[str, Any], key: str | None = None
) -> None:
    """Load weights into ``module`` from a path or a state dict, tolerant of how they were saved.

    Accepts a bare state dict, a :func:`train_loop` checkpoint (``{"state": {key: ...}}``), keys
    prefixed by ``torch.compile`` or DataParallel, and fp16 or bf16 tensors (cast to the module's dtype).
    """
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        source = torch.load(path, map_location="cpu", weights_only=False)
    sd: Any = source
    if isinstance(sd, Mapping) and "state" in sd and isinstance(sd["state"], Mapping):
        if key is None:
            # module state dicts hold only tensors (optimiser/scheduler/scaler states hold numbers too)
            candidates = [
                k
                for k, v in sd["state"].items()
                if isinstance(v, Mapping) and v and all(torch.is_tensor(t) for t in v.values())
            ]
            if len(candidates) != 1:
                raise KeyError(f"checkpoint holds several state dicts {sorted(sd['state'])}: pass key=")
            key = candidates[0]
        sd = sd["state"][key]
    sd = clean_state_dict(sd)
    own = module.state_dict()
    sd = {
        k: (v.to(own[k].dtype) if k in own and torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in sd.items()
    }
    module.load_state_dict(sd)


def _write_history_csv(history: list[dict[str, float]], path: Path) -> None:
    if not history:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in history for k in row))
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


def train_loop(
    step_fn: Callable[[int], Mapping[str, float | torch.Tensor]],
    state: Mapping[str, Any],
    n_steps: int,
    *,
    ckpt_path: str | Path | None = None,
    ckpt_every: int = 100,
    log_every: int = 10,
    history_csv: str | Path | None = None,
    desc: str = "train",
    progress: bool = True,
) -> TrainResult:
    """Run ``step_fn`` for steps ``1 … n_steps``, resuming from ``ckpt_path`` if it exists.

    ``step_fn(step)`` performs one optimisation step and returns floats (or 0-d tensors), at least
    ``"loss"``. ``state`` maps names to objects with ``state_dict()`` / ``load_state_dict()``.
    """
    if n_steps < 0:
        raise ValueError(f"{desc}: n_steps must be >= 0, got {n_steps}")
    ckpt_path = Path(ckpt_path) if ckpt_path is not None else None
    history: list[dict[str, float]] = []
    start = 0
    resumed_from = None
    if ckpt_path is not None and ckpt_path.exists():
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as err:  # a truncated or foreign file: say which one
            raise RuntimeError(f"{desc}: cannot read checkpoint {ckpt_path}: {err}") from err
        saved = ckpt.get("state", {})
        # a GradScaler's state may be absent or empty (written by a CPU run, or with amp off): a CPU
        # checkpoint resumed on CUDA then starts from the initial scale instead of failing
        missing = {n for n in set(state) - set(saved) if not isinstance(state[n], torch.amp.GradScaler)}
        if missing:
            raise KeyError(f"{desc}: checkpoint {ckpt_path} lacks {sorted(missing)}")
        for name, obj in state.items():
            if isinstance(obj, torch.amp.GradScaler) and not saved.get(name):
                continue
            obj.load_state_dict(saved[name])
        _set_rng_state(ckpt["rng"])
        history = list(ckpt["history"])
        start = resumed_from = int(ckpt["step"])

    def save(step: int) -> None:
        if ckpt_path is None:
            return
        payload = {
            "step": step,
            "state": {name: obj.state_dict() for name, obj in state.items()},
            "rng": _rng_state(),
            "history": history,
        }
        atomic_torch_save(payload, ckpt_path)

    t0 = time.perf_counter()
    bar = tqdm(total=n_steps, initial=min(start, n_steps), desc=desc, disable=not progress, mininterval=1.0)
    try:
        for step in range(start + 1, n_steps + 1):
            out = step_fn(step)
            row = {
                "step": step,
                **{k: float(v.detach() if torch.is_tensor(v) else v) for k, v in out.items()},
            }
            if "loss" not in row:
                raise KeyError(f"{desc}: step_fn must return a 'loss' (got {sorted(out)})")
            if not math.isfinite(row["loss"]):
                raise NonFiniteLossError(
                    f"{desc}: loss is {row['loss']} at step {step}; the last finite checkpoint is "
                    f"{ckpt_path if ckpt_path and ckpt_path.exists() else 'not saved'}. Lower the learning "
                    "rate or check the inputs for NaN."
                )
            history.append(row)
            bar.update(1)
            if step % log_every == 0 or step == n_steps:
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "step"})
                if history_csv is not None:
                    _write_history_csv(history, Path(history_csv))
            if step % ckpt_every == 0 or step == n_steps:
                save(step)
    finally:
        bar.close()
    if history_csv is not None:
        _write_history_csv(history, Path(history_csv))
    return TrainResult(
        history=history,
        steps=max(start, n_steps),
        resumed_from=resumed_from,
        seconds=time.perf_counter() - t0,
        checkpoint=ckpt_path,
    )
