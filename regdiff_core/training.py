"""The one training loop every chapter uses: progress bar, history, atomic checkpoints, resume, NaN guard.

A chapter supplies a ``step_fn(step) -> {"loss": ..., ...}`` that does one optimization step (forward,
backward, optimizer and scheduler updates) and a ``state`` dict of everything with a ``state_dict()``
(networks, optimizers, schedulers, gradient scalers, EMA copies). :func:`train_loop` does the rest:

- calls ``step_fn`` for steps ``1 … n_steps`` and keeps every step's numbers in ``history``, read from
  the device only when it logs or checkpoints (every ``log_every`` steps), so the GPU is never made to
  wait in between;
- stops with :class:`NonFiniteLossError` naming the step when the loss is NaN or infinite (noticed at
  the next logging step; nothing after the last finite checkpoint is saved);
- every ``ckpt_every`` steps (and at the end) writes ``state``, the history and all random-number
  generator states to ``ckpt_path`` atomically (temporary file + rename, so a kill mid-write leaves the
  previous checkpoint intact) — but only when every number in it is finite (weights, optimizer moments,
  learning rates): otherwise it stops with :class:`NonFiniteStateError` and keeps the last good one;
- when ``ckpt_path`` already exists, resumes after its step. Because the RNG states travel with the
  checkpoint, a resumed CPU run continues exactly as the uninterrupted one would have. A learning rate
  changed since the checkpoint is applied (and said so); other changed ``settings`` are listed.
- a checkpoint that cannot be read or does not fit raises :class:`CheckpointError` naming the file.
- a checkpoint of other training inputs or settings (its :func:`fingerprint` differs) is set aside as
  ``checkpoint.stale-<fingerprint>.pt`` and the run starts afresh: the one stale-state rule.
- a stage's trained model (``model.pt``) has one layout, ``{"weights": {name: state_dict}, "config": {…},
  **extra}``: :func:`save_model` writes it, :func:`load_model` reads it (or names the file that is not it).
- under ``torchrun`` (:mod:`regdiff_core.distributed`): the logged numbers are averaged over the ranks,
  rank 0 alone writes the checkpoint and the history, the checkpoint keeps every rank's RNG state
  (``rng_ranks``) and a resume gives each rank its own back.

Every trained stage keeps ``<stage folder>/checkpoint.pt`` in one format: ``{"step", "state": {"model"
(or "model_step1", "model_step2"), "optimizer" (or one per step), "scheduler", "scaler", "ema" where the
stage has them}, "rng", "history", "settings" (the stage's config), "fingerprint"}`` — tensors, numbers,
strings, lists and dicts only, read with ``torch.load(..., weights_only=True)`` (:func:`read_checkpoint`).

Written by hand rather than with a trainer framework (Lightning, MONAI's ignite engines) so that the
reader sees the whole loop in one screen, and because those add a dependency the book otherwise lacks.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import pickle
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from regdiff_core import distributed
from regdiff_core.utils import atomic_torch_save, remove_orphans

#: Every trained stage keeps its resumable state in ``<stage folder>/checkpoint.pt`` (and its weights in
#: ``model.pt``, its numbers in ``history.csv``).
CHECKPOINT_FILE = "checkpoint.pt"

#: Settings that say how long a run goes or how it is logged and adapted, not what its state means: a
#: checkpoint written with other values still resumes (a changed ``lr`` is applied; see :func:`train_loop`).
#: Every other setting, and the training inputs, make up the checkpoint's :func:`fingerprint`.
RESUMABLE_SETTINGS = frozenset({
    "iterations", "ckpt_every", "log_every", "lr", "amp", "encode_batch", "ablation_iterations",
    "ablation_ema", "ablation_variants", "side_iterations", "regimes", "seeds", "seed_regimes",
})  # fmt: skip


def fingerprint(inputs: Any, settings: Mapping[str, Any] | None = None) -> str:
    """The one stale-state rule of the three trained stages: sha256 of what a checkpoint's state depends
    on — its training inputs (a tensor's bytes, or the JSON of, e.g., case names) and its settings other
    than :data:`RESUMABLE_SETTINGS`. :func:`train_loop` keeps it in the checkpoint and, when it differs,
    moves the old checkpoint aside and starts afresh instead of resuming a state of other data."""
    digest = hashlib.sha256()
    if torch.is_tensor(inputs):
        digest.update(inputs.detach().cpu().contiguous().numpy().tobytes())
    else:
        digest.update(json.dumps(inputs, sort_keys=True, default=str).encode())
    kept = {k: v for k, v in (settings or {}).items() if k not in RESUMABLE_SETTINGS}
    digest.update(json.dumps(kept, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _set_aside_if_stale(ckpt_path: Path, expected: str, desc: str) -> None:
    """Rename a checkpoint of other inputs or settings to ``checkpoint.stale-<its fingerprint>.pt``
    (nothing is deleted), so that the run starts afresh."""
    again = f"Move it away (or delete it) to train {desc} from scratch."
    saved = read_checkpoint(ckpt_path, f"{desc} checkpoint", again)
    if not isinstance(saved, Mapping) or any(k not in saved for k in _CKPT_KEYS):
        return  # not a checkpoint at all: resuming it names the file (a clear error, nothing moved)
    found = saved.get("fingerprint")
    if found == expected:
        return
    aside = ckpt_path.with_name(f"{ckpt_path.stem}.stale-{(found or 'unknown')[:12]}{ckpt_path.suffix}")
    ckpt_path.replace(aside)
    print(
        f"[{desc}] {ckpt_path} was trained on other inputs or settings: kept as {aside.name}, starting afresh"
    )


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step, the value and what to do."""


class NonFiniteStateError(NonFiniteLossError):
    """The state about to be checkpointed holds NaN or infinite numbers; it was not saved."""


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint or model file that cannot be read or does not fit; the message names it and says what
    to do. Nothing is deleted: the file stays where it is. (A ``ValueError`` too, which the loaders
    raised before this class existed.)"""


def read_checkpoint(path: str | Path, what: str = "checkpoint", advice: str | None = None) -> Any:
    """``torch.load(path)`` on the CPU, with a :class:`CheckpointError` naming the file (and ending in
    ``advice``) when it is truncated or not a torch file; ``FileNotFoundError`` when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        # weights_only: tensors, numbers, strings, lists and dicts only; a pickle that would call anything
        # else (os.system, a class of its own) is refused before it runs
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to read {what} {path}: it holds Python objects other than tensors, numbers, strings, "
            f"lists and dicts ({_first_line(err)}), which loading would run as code. A file this project "
            f"writes never does; do not load it from an untrusted source. "
            f"{advice or 'Move it away (or delete it) and run the stage that writes it again.'}"
        ) from None
    except Exception as err:  # truncated zip, a text file ...
        raise CheckpointError(
            f"cannot read {what} {path} ({type(err).__name__}: {_first_line(err)}): the file is damaged or "
            f"not a torch file. {advice or 'Move it away (or delete it) and run the stage that writes it again.'}"
        ) from err


def save_model(
    path: str | Path, weights: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any], **extra: Any
) -> Path:
    """The one model-file layout of the trained stages: ``{"weights": {name: state_dict, …}, "config": {…},
    **extra}``, written atomically (:func:`regdiff_core.utils.atomic_torch_save`); ``config`` is what the
    network is built from again (:func:`load_model`), ``extra`` any further numbers (a grid, the steps)."""
    payload = {"weights": dict(weights), "config": dict(config), **extra}
    return atomic_torch_save(payload, Path(path))


def load_model(path: str | Path, what: str, advice: str) -> dict[str, Any]:
    """A file written by :func:`save_model`, read safely (:func:`read_checkpoint`, ``weights_only``).

    ``what`` names the kind of file in messages, ``advice`` says what to do. Raises
    :class:`CheckpointError` naming the file when it is not of that layout (a dict with ``"weights"``, a
    dict of state dicts, and ``"config"``, a dict); ``FileNotFoundError`` when it is missing."""
    return model_layout(read_checkpoint(path, what, advice), path, what, advice)


def model_layout(saved: Any, path: str | Path, what: str, advice: str) -> dict[str, Any]:
    """``saved`` (what ``path`` holds) as :func:`save_model`'s layout, or :class:`CheckpointError` naming
    ``path`` (for loaders that read a file that may hold another format too, e.g. released networks)."""
    weights = saved.get("weights") if isinstance(saved, Mapping) else None
    if (
        not isinstance(weights, Mapping)
        or not all(isinstance(w, Mapping) for w in weights.values())
        or not isinstance(saved.get("config"), Mapping)
    ):
        found = sorted(map(str, saved)) if isinstance(saved, Mapping) else type(saved).__name__
        raise CheckpointError(
            f"{path} is not a {what} file of this project (expected a dict with 'weights', a dict of state "
            f"dicts, and 'config'; found {found}). {advice}"
        )
    return dict(saved)


def _first_line(err: BaseException) -> str:
    """The gist of an error in one line: its first line, and the next one when the first only introduces
    it (``Error(s) in loading state_dict for X:`` → the first size mismatch), at most 300 characters."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return repr(err)
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass
class TrainResult:
    """``history``: one dict per step (``step`` plus what ``step_fn`` returned); ``seconds``: this call only."""

    history: list[dict[str, float]]
    steps: int
    resumed_from: int | None
    seconds: float
    checkpoint: Path | None


def _rng_state() -> dict[str, Any]:
    """The RNG states as tensors, numbers and strings, so that a checkpoint loads with
    ``weights_only=True`` (NumPy's key array would need NumPy's unpickler)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
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
    module: torch.nn.Module,
    source: str | Path | Mapping[str, Any],
    key: str | None = None,
    *,
    name: str | None = None,
) -> None:
    """Load weights into ``module`` from a path or a state dict, tolerant of how they were saved.

    Accepts a bare state dict, a :func:`train_loop` checkpoint (``{"state": {key: ...}}``), keys
    prefixed by ``torch.compile`` or DataParallel, and fp16 or bf16 tensors (cast to the module's dtype).
    ``name`` names a state dict given directly (its file) in error messages; a path names itself.
    Weights that do not fit ``module`` raise :class:`CheckpointError` naming the source.
    """
    if isinstance(source, str | Path):
        name = str(source)
        source = read_checkpoint(source)
    name = name if name is not None else "the given state dict"
    sd: Any = source
    if isinstance(sd, Mapping) and "state" in sd and isinstance(sd["state"], Mapping):
        if key is None:
            # module state dicts hold only tensors (optimizer/scheduler/scaler states hold numbers too)
            candidates = [
                k
                for k, v in sd["state"].items()
                if isinstance(v, Mapping) and v and all(torch.is_tensor(t) for t in v.values())
            ]
            if len(candidates) != 1:
                raise KeyError(f"{name} holds several state dicts {sorted(sd['state'])}: pass key=")
            key = candidates[0]
        if key not in sd["state"]:
            raise CheckpointError(f"{name} has no entry {key!r} (it holds {sorted(sd['state'])})")
        sd = sd["state"][key]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{name} holds a {type(sd).__name__}, not a state dict of weights")
    sd = clean_state_dict(sd)
    own = module.state_dict()
    sd = {
        k: (v.to(own[k].dtype) if k in own and torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in sd.items()
    }
    try:
        module.load_state_dict(sd)
    except RuntimeError as err:  # missing/unexpected keys, size mismatch: another architecture
        raise CheckpointError(
            f"{name} does not fit this {type(module).__name__}: {_first_line(err)} … It was written with "
            "other settings or another architecture; use the settings it was trained with, or train again."
        ) from err


def _write_history_csv(history: list[dict[str, float]], path: Path) -> None:
    if not history or not distributed.is_main():  # every rank holds the same (averaged) history
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in history for k in row))
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


def _non_finite(obj: Any, where: str = "") -> str | None:
    """The first place (``"model.weight"``, ``"optimizer.state.0.exp_avg"``) holding NaN/inf, else None."""
    if torch.is_tensor(obj):
        if obj.is_floating_point() or obj.is_complex():
            return None if bool(torch.isfinite(obj).all()) else where
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else where
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _non_finite(v, f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


def _optimizers(state: Mapping[str, Any]) -> dict[str, torch.optim.Optimizer]:
    return {n: o for n, o in state.items() if isinstance(o, torch.optim.Optimizer)}


def _base_lrs(opt: torch.optim.Optimizer) -> list[float]:
    """Each group's configured learning rate (a scheduler keeps it as ``initial_lr``)."""
    return [float(g.get("initial_lr", g["lr"])) for g in opt.param_groups]


def _apply_new_lr(state: Mapping[str, Any], fresh: dict[str, list[float]]) -> list[str]:
    """After loading a checkpoint, put back the learning rates the run was configured with (``fresh``).

    Schedulers scale the configured rate (LambdaLR: lr = base · λ(t); cosine restarts with η_min = 0:
    lr = base · (1 + cos πt/T)/2), so the current rate and the schedulers' ``base_lrs`` are scaled by
    new/old. Returns one "old → new" text per changed optimizer.
    """
    changes = []
    for name, opt in _optimizers(state).items():
        old = _base_lrs(opt)
        new = fresh[name]
        if old == new:
            continue
        for i, (group, o, n) in enumerate(zip(opt.param_groups, old, new)):
            factor = n / o if o > 0 else None
            group["lr"] = group["lr"] * factor if factor is not None else n
            if "initial_lr" in group:
                group["initial_lr"] = n
            for sched in state.values():
                if isinstance(sched, torch.optim.lr_scheduler.LRScheduler) and sched.optimizer is opt:
                    sched.base_lrs[i] = n
                    if getattr(sched, "_last_lr", None) is not None:
                        sched._last_lr[i] = group["lr"]
        changes.append(f"{name} lr {', '.join(f'{o:g}' for o in old)} → {', '.join(f'{n:g}' for n in new)}")
    return changes


def _advice(desc: str, ckpt_path: Path | None, stage: str | None, lr: float | None) -> str:
    """What to do after a divergence — each alternative works as written (tests/test_failures.py)."""
    lower = (
        f"--set {stage}.lr=<a value below {lr:g}>" if stage and lr is not None else "a lower learning rate"
    )
    if ckpt_path is not None and ckpt_path.exists():
        try:
            step = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("step", "?")
        except Exception:  # the advice must not fail on the file it names
            step = "?"
        return (
            f"The last finite checkpoint {ckpt_path} (step {step}) is kept. To start afresh, delete (or move) "
            f"{ckpt_path} and rerun with {lower}. To continue from it instead, rerun with {lower} "
            "(a resumed run applies the new learning rate); that helps only if its weights are still sound. "
            "Or check the inputs for NaN."
        )
    return f"Nothing was checkpointed. Rerun with {lower}, or check the inputs for NaN."


def _current_lr(state: Mapping[str, Any]) -> float | None:
    opts = list(_optimizers(state).values())
    return float(opts[0].param_groups[0].get("initial_lr", opts[0].param_groups[0]["lr"])) if opts else None


_CKPT_KEYS = ("step", "state", "rng", "history")


def _rank_rng(ckpt: Mapping[str, Any], ckpt_path: Path, desc: str) -> Mapping[str, Any]:
    """This rank's RNG state from a checkpoint: its own from ``rng_ranks`` when the checkpoint was written
    by as many ranks; otherwise rank 0's (``rng``), followed — on several ranks — by a new stream per rank."""
    ctx = distributed.context()
    ranks = ckpt.get("rng_ranks")
    if ctx.active and ranks is not None and len(ranks) == ctx.world_size:
        return ranks[ctx.rank]
    if ctx.active:
        if ctx.is_main:
            print(
                f"[{desc}] {ckpt_path} was written by {len(ranks) if ranks else 1} process(es), this run has "
                f"{ctx.world_size}: the weights resume exactly, the random streams start anew per rank"
            )
        _set_rng_state(ckpt["rng"])
        distributed.seed_rank_stream()
        return _rng_state()
    return ckpt["rng"]


def _resume(
    ckpt_path: Path, state: Mapping[str, Any], desc: str, settings: Mapping[str, Any] | None
) -> tuple[int, list[dict[str, float]]]:
    """Load ``ckpt_path`` into ``state`` and the RNGs; return (its step, its history)."""
    again = f"move it away (or delete it) to train {desc} from scratch."
    ckpt = read_checkpoint(ckpt_path, f"{desc} checkpoint", again.capitalize())
    if not isinstance(ckpt, Mapping) or any(k not in ckpt for k in _CKPT_KEYS):
        found = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(
            f"{desc}: {ckpt_path} is not a training checkpoint (expected a dict with "
            f"{', '.join(_CKPT_KEYS)}; found {found}). {again.capitalize()}"
        )
    saved = ckpt["state"]
    # a GradScaler's state may be absent or empty (written by a CPU run, or with amp off): a CPU
    # checkpoint resumed on CUDA then starts from the initial scale instead of failing
    missing = {n for n in set(state) - set(saved) if not isinstance(state[n], torch.amp.GradScaler)}
    if missing:
        raise CheckpointError(
            f"{desc}: checkpoint {ckpt_path} lacks {sorted(missing)} (it holds {sorted(saved)}). "
            f"{again.capitalize()}"
        )
    fresh = {name: _base_lrs(opt) for name, opt in _optimizers(state).items()}
    for name, obj in state.items():
        if isinstance(obj, torch.amp.GradScaler) and not saved.get(name):
            continue
        try:
            obj.load_state_dict(saved[name])
        except Exception as err:  # size mismatch, other parameter groups, a foreign object
            raise CheckpointError(
                f"{desc}: checkpoint {ckpt_path} does not fit this run's {name!r} ({type(err).__name__}: "
                f"{_first_line(err)}): it was written with other settings or another architecture. Use "
                f"the settings it was trained with, or {again}"
            ) from err
    try:
        _set_rng_state(_rank_rng(ckpt, ckpt_path, desc))
        history = list(ckpt["history"])
        step = int(ckpt["step"])
    except Exception as err:
        raise CheckpointError(
            f"{desc}: checkpoint {ckpt_path} is damaged ({_first_line(err)}). {again.capitalize()}"
        ) from err
    changes = _apply_new_lr(state, fresh)
    old_settings = ckpt.get("settings")
    if settings is not None and isinstance(old_settings, Mapping):
        changes += [
            f"{k} {old_settings[k]!r} → {v!r}"
            for k, v in settings.items()
            if k != "lr" and k in old_settings and old_settings[k] != v
        ]
    if changes:
        print(
            f"[{desc}] resuming {ckpt_path} at step {step} with changed settings, applied from step "
            f"{step + 1}: {'; '.join(changes)}"
        )
    return step, history


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
    stage: str | None = None,
    settings: Mapping[str, Any] | None = None,
    inputs: Any = None,
) -> TrainResult:
    """Run ``step_fn`` for steps ``1 … n_steps``, resuming from ``ckpt_path`` if it exists.

    ``step_fn(step)`` performs one optimization step and returns floats (or 0-d tensors), at least
    ``"loss"``. ``state`` maps names to objects with ``state_dict()`` / ``load_state_dict()``.
    ``stage`` (e.g. ``"vqae"``) lets error messages name the ``--set stage.lr=…`` to use; ``settings``
    (the stage's config as a dict) is stored in the checkpoint, and a resume lists what changed.
    ``inputs`` (what the stage trains on): with it, the checkpoint keeps the :func:`fingerprint` of
    ``inputs`` and ``settings``, and one of other inputs or settings is set aside instead of resumed.
    """
    if n_steps < 0:
        raise ValueError(f"{desc}: n_steps must be >= 0, got {n_steps}")
    if ckpt_every < 1 or log_every < 1:
        raise ValueError(f"{desc}: ckpt_every and log_every must be >= 1, got {ckpt_every}, {log_every}")
    ckpt_path = Path(ckpt_path) if ckpt_path is not None else None
    history: list[dict[str, float]] = []
    start = 0
    resumed_from = None
    ctx = distributed.context()
    stamp = fingerprint(inputs, settings) if inputs is not None else None
    if ckpt_path is not None and ctx.is_main:
        remove_orphans(ckpt_path)  # temporary files of a run killed while it wrote a checkpoint
        if stamp is not None and ckpt_path.exists():
            _set_aside_if_stale(ckpt_path, stamp, desc)
    distributed.barrier()
    if ckpt_path is not None and ckpt_path.exists():
        start, history = _resume(ckpt_path, state, desc, settings)
        resumed_from = start
    starts = distributed.all_gather_objects(start)
    if len(set(starts)) > 1:
        raise CheckpointError(
            f"{desc}: the ranks disagree on the checkpoint {ckpt_path} (they would resume at steps {starts}): "
            "every rank must see the same work folder"
        )

    def save(step: int) -> None:
        if ckpt_path is None:
            return
        payload = {
            "step": step,
            "state": {name: obj.state_dict() for name, obj in state.items()},
            "rng": _rng_state(),
            "history": history,
        }
        if ctx.active:  # every rank's stream, so that a resume restores each rank (rank 0 writes)
            payload["rng_ranks"] = distributed.all_gather_objects(payload["rng"])
        if settings is not None:
            payload["settings"] = dict(settings)
        if stamp is not None:
            payload["fingerprint"] = stamp
        bad = _non_finite(payload["state"])
        if bad is not None:
            raise NonFiniteStateError(
                f"{desc}: after step {step} the state to be checkpointed is not finite ({bad} holds NaN or "
                f"inf); it was not saved. {_advice(desc, ckpt_path, stage, _current_lr(state))}"
            )
        atomic_torch_save(payload, ckpt_path)

    t0 = time.perf_counter()
    bar = tqdm(
        total=n_steps, initial=min(start, n_steps), desc=desc, disable=not progress or not ctx.is_main,
        mininterval=1.0,
    )  # fmt: skip
    # Rows of steps not yet logged, their tensors still on the device: reading a GPU number waits for the
    # GPU, so the loop reads them only when it logs or checkpoints (nanoGPT's habit), not every step.
    pending: list[dict[str, Any]] = []

    def flush(step: int) -> dict[str, float]:
        """The pending rows as numbers (one device sync), checked and appended to the history."""
        for row in pending:
            if "loss" not in row:
                raise KeyError(f"{desc}: step_fn must return a 'loss' (got {sorted(row)})")
            row = {k: float(v) for k, v in row.items()}
            row = distributed.mean_over_ranks(row)  # the global batch's numbers (all ranks the same)
            if not math.isfinite(row["loss"]):
                raise NonFiniteLossError(
                    f"{desc}: loss is {row['loss']} at step {int(row['step'])} (found at step {step}). "
                    f"{_advice(desc, ckpt_path, stage, _current_lr(state))}"
                )
            row["step"] = int(row["step"])
            history.append(row)
        pending.clear()
        return history[-1]

    try:
        for step in range(start + 1, n_steps + 1):
            out = step_fn(step)
            # a copy: a tensor the step returns may be a buffer that the next step overwrites
            pending.append(
                {"step": step, **{k: v.detach().clone() if torch.is_tensor(v) else v for k, v in out.items()}}
            )
            bar.update(1)
            logs, saves = step % log_every == 0 or step == n_steps, step % ckpt_every == 0 or step == n_steps
            loss = out.get("loss")
            known_bad = not torch.is_tensor(loss) and loss is not None and not math.isfinite(loss)
            if logs or saves or known_bad:  # a Python number is read for free: a NaN there stops at once
                row = flush(step)
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "step"})
                if logs and history_csv is not None:
                    _write_history_csv(history, Path(history_csv))
            if saves:
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
