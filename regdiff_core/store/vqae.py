"""Chapter 2's files: the VQ-AE's model file, the token files (ours and the paper's), and the entry points
that read their inputs from disk, call :mod:`regdiff_core.vqae` and write what it computed.

Under ``work_dir`` (a stage folder per run, ``vqae`` for the model later chapters load):

- ``vqae/checkpoint.pt`` — the resumable training checkpoint of :func:`~regdiff_core.training.train_loop`
  (set aside when the pairs or settings change), and ``vqae/history.csv``, one row per step;
- ``vqae/model.pt`` — :func:`save_vqae`: the one model-file layout of :func:`regdiff_core.training.save_model`,
  ``{"weights": {"model": state_dict}, "config": asdict(VQAEConfig)}``; :func:`load_vqae` builds the
  network from that config, so a model file loads with its own architecture;
- ``vqae/model_step<k>.pt`` — the same layout, the run after ``k`` steps (:func:`snapshot_path`, chapter 2's
  comparison); ``vqae_ablation/`` — that comparison's second run;
- ``tokens.pt`` — :func:`save_tokens`: ``{"tokens": (N, h, w, d) long, "cases": [...], "grid": (h, w, d),
  "codebook_size": K}``, the training pairs' token grids, read by :func:`load_tokens`.

Under ``data_dir``: ``unleashing-registration/`` + :data:`PAPER_TOKENS_FILE`, the paper's own token grids
(:func:`load_paper_tokens`).

Entry points: :func:`train` (prepared pairs → :func:`~regdiff_core.vqae.train_vqae` → ``model.pt``),
:func:`encode_pairs` (pairs and model → ``tokens.pt``), :func:`compare_restarts` (chapter 2's experiment
over two runs' files).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch

from regdiff_core.config import Profile, VQAEConfig
from regdiff_core.training import CheckpointError, load_model, load_weights, read_checkpoint, save_model
from regdiff_core.vqae import (
    PairedVQAE,
    Tokens,
    VQAETrainResult,
    build_vqae,
    encode_volumes,
    reconstruct,
    token_stats,
    train_vqae,
)

# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


def model_path(work_dir: str | Path) -> Path:
    return Path(work_dir) / "vqae" / "model.pt"


def tokens_path(work_dir: str | Path) -> Path:
    return Path(work_dir) / "tokens.pt"


def snapshot_path(out_dir: str | Path, step: int) -> Path:
    """Where :func:`~regdiff_core.vqae.train_vqae` (``snapshot_at=step``) keeps the model after ``step`` steps."""
    return Path(out_dir) / f"model_step{step}.pt"


# --------------------------------------------------------------------------------------------------
# The model file
# --------------------------------------------------------------------------------------------------


def save_vqae(model: PairedVQAE, path: str | Path) -> Path:
    """Write the weights and the config they were built with (:func:`~regdiff_core.training.save_model`:
    ``{"weights": {"model": …}, "config": …}``)."""
    return save_model(path, {"model": model.state_dict()}, dataclasses.asdict(model.cfg))


def load_vqae(
    profile: Profile, work_dir: str | Path, device: torch.device | str = "cpu", path: str | Path | None = None
) -> PairedVQAE:
    """The trained VQ-AE from ``work_dir/vqae/model.pt`` (or ``path``) on ``device``, in eval mode.

    The network is built from the config stored in the file (:func:`save_vqae`), so a model file loads with
    its own architecture; ``profile`` names the command that trains it again in messages.
    """
    path = model_path(work_dir) if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no trained VQ-AE at {path}: run chapter 2 (notebooks/02_vqae.ipynb) or "
            f"`python -m regdiff_core train-vqae --profile {profile.name}` first"
        )
    retrain = f"Move it away and rerun `python -m regdiff_core train-vqae --profile {profile.name}`."
    saved = load_model(path, "VQ-AE model", retrain)
    try:
        model = build_vqae(VQAEConfig(**saved["config"]))
        weights = saved["weights"]["model"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a VQ-AE model of this project ({type(err).__name__}: {err}). {retrain}"
        ) from err
    load_weights(model, weights, name=str(path))
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# Token files
# --------------------------------------------------------------------------------------------------


def save_tokens(tokens: Tokens, work_dir: str | Path) -> Path:
    """Write ``work_dir/tokens.pt`` (a dict with the fields of :class:`Tokens`) atomically."""
    from regdiff_core.utils import atomic_torch_save

    return atomic_torch_save(
        {
            "tokens": tokens.tokens.long().cpu(),
            "cases": list(tokens.cases),
            "grid": tuple(tokens.grid),
            "codebook_size": int(tokens.codebook_size),
        },
        tokens_path(work_dir),
    )


def load_tokens(work_dir: str | Path) -> Tokens:
    """The token grids saved by chapter 2 (``work_dir/tokens.pt``)."""
    path = tokens_path(work_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"no tokens at {path}: run chapter 2 (notebooks/02_vqae.ipynb) or "
            "`python -m regdiff_core encode --profile <profile>` first"
        )
    d = read_checkpoint(path, "token file")
    try:
        return Tokens(d["tokens"].long(), list(d["cases"]), tuple(d["grid"]), int(d["codebook_size"]))
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{path} is not a token file of this project ({type(err).__name__}: {err}); rerun "
            "`python -m regdiff_core encode --profile <profile>` to write it again"
        ) from err


# --------------------------------------------------------------------------------------------------
# The paper's own tokens
# --------------------------------------------------------------------------------------------------


#: In the paper's release (``data_dir/unleashing-registration/``): despite the name, not a model but a list
#: of 97 int16 tensors of 3328 codes, the paper's VQ-AE token grids of the 97 Lung250M-4B training pairs
#: as its ``infer_vqae.py`` saves them (flattened in C order). The VQ-AE itself is not released.
PAPER_TOKENS_FILE = "lung250_3d_vqae_model_dilated.pth"
PAPER_TOKEN_GRID = (16, 13, 16)
PAPER_CODEBOOK_SIZE = 1024


def paper_tokens_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / "unleashing-registration" / PAPER_TOKENS_FILE


def load_paper_tokens(data_dir: str | Path) -> Tokens:
    """The paper's 97 token grids as :class:`Tokens` (``(97, 16, 13, 16)`` long, codebook 1024).

    ``cases`` are ``"paper_00"`` … ``"paper_96"``, the order in the file: the release does not say
    which Lung250M-4B case each grid is. Raises ``FileNotFoundError`` (with the command that downloads
    it) or ``ValueError`` naming the file when it does not hold such grids.
    """
    path = paper_tokens_path(data_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the paper's token grids are missing; run chapter 1 or "
            f"`python -m data_download unleashing-registration --dest {path.parent} --cases 002`"
        )
    stored = torch.load(path, map_location="cpu", weights_only=True)
    n = math.prod(PAPER_TOKEN_GRID)
    if not isinstance(stored, list | tuple) or not stored:
        raise ValueError(f"{path}: expected a list of token tensors, got {type(stored).__name__}")
    bad = [
        i
        for i, t in enumerate(stored)
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.numel() != n
    ]
    if bad:
        raise ValueError(f"{path}: entries {bad[:5]} are not integer tensors of {n} codes")
    tokens = torch.stack([t.long().reshape(PAPER_TOKEN_GRID) for t in stored])
    if int(tokens.min()) < 0 or int(tokens.max()) >= PAPER_CODEBOOK_SIZE:
        raise ValueError(
            f"{path}: codes {int(tokens.min())}…{int(tokens.max())} outside [0, {PAPER_CODEBOOK_SIZE})"
        )
    cases = [f"paper_{i:02d}" for i in range(len(tokens))]
    return Tokens(tokens, cases, PAPER_TOKEN_GRID, PAPER_CODEBOOK_SIZE)


# --------------------------------------------------------------------------------------------------
# Entry points: inputs from disk, chapter 2's computation, results to disk
# --------------------------------------------------------------------------------------------------


def train(
    profile: Profile,
    work_dir: str | Path,
    device: torch.device | str = "auto",
    seed: int = 0,
    *,
    dead_code_restart: bool | None = None,
    iterations: int | None = None,
    stop_after: int | None = None,
    snapshot_at: int | None = None,
    run_name: str = "vqae",
    progress: bool = True,
) -> VQAETrainResult:
    """Train the profile's VQ-AE on chapter 1's training pairs; write ``work_dir/<run_name>/model.pt``.

    ``run_name="vqae"`` is the model later chapters load; other names keep side runs (the notebook's
    comparison with/without dead-code restarts) apart. ``dead_code_restart`` / ``iterations``
    override the profile for this run; ``stop_after`` and ``snapshot_at`` as in
    :func:`~regdiff_core.vqae.train_vqae`.
    Resumes from ``work_dir/<run_name>/checkpoint.pt`` if present.
    """
    from regdiff_core.store.data import load_pairs
    from regdiff_core.utils import resolve_device, seed_everything

    device = resolve_device(device)
    cfg = profile.vqae
    if dead_code_restart is not None:
        cfg = dataclasses.replace(cfg, dead_code_restart=dead_code_restart)
    if iterations is not None:
        cfg = dataclasses.replace(cfg, iterations=iterations)
    pairs = load_pairs(profile, work_dir, "train")
    volumes = pairs.volumes(dtype=torch.uint8)
    seed_everything(seed)
    model = build_vqae(cfg)
    out_dir = Path(work_dir) / run_name
    result = train_vqae(
        model, volumes, cfg, device, out_dir=out_dir, stop_after=stop_after, snapshot_at=snapshot_at,
        progress=progress,
    )  # fmt: skip
    save_vqae(result.model, out_dir / "model.pt")
    return result


def encode_pairs(
    profile: Profile,
    work_dir: str | Path,
    device: torch.device | str = "auto",
    split: str = "train",
    model: PairedVQAE | None = None,
    batch_size: int | None = None,
) -> Tokens:
    """Encode every pair of ``split`` with the trained VQ-AE and save ``work_dir/tokens.pt``.

    ``batch_size``: volumes per encoder call (default ``profile.vqae.encode_batch``).
    """
    from regdiff_core.store.data import load_pairs
    from regdiff_core.utils import resolve_device

    device = resolve_device(device)
    model = model if model is not None else load_vqae(profile, work_dir, device)
    pairs = load_pairs(profile, work_dir, split)
    batch_size = profile.vqae.encode_batch if batch_size is None else int(batch_size)
    tokens = encode_volumes(model, pairs.volumes(dtype=torch.uint8), device, batch_size, amp=profile.vqae.amp)
    result = Tokens(tokens, list(pairs.cases), tuple(tokens.shape[1:]), model.codebook_size)
    save_tokens(result, work_dir)
    return result


class RestartComparison(NamedTuple):
    """What :func:`~regdiff_core.store.vqae.compare_restarts` returns: the second run (``ablation``), one
    table row per model compared, the ``step`` they are compared at, and each run's history keyed by
    "restarts on?"."""

    ablation: VQAETrainResult
    rows: list[dict[str, Any]]
    step: int
    histories: dict[bool, list[dict[str, float]]]


def compare_restarts(
    profile: Profile,
    work_dir: str | Path,
    device: torch.device,
    seed: int,
    result: VQAETrainResult,
    x_test: torch.Tensor,
) -> RestartComparison:
    """Chapter 2's dead-code-restart experiment: train a second VQ-AE with ``dead_code_restart`` the other
    way round for ``vqae.ablation_iterations`` steps (all of them if 0; run ``vqae_ablation``), and score
    both runs at that step — the first from its snapshot (``snapshot_at`` in :func:`train`), or its end —
    and the first run at its end, on ``x_test``: codes used and perplexity in the last logging window,
    codes in the test tokens and test Dice. ``result``: the first run, :func:`train`'s result."""
    other = not profile.vqae.dead_code_restart
    k = profile.vqae.ablation_iterations or profile.vqae.iterations
    ablation = train(
        profile, work_dir, device, seed, dead_code_restart=other, stop_after=k, run_name="vqae_ablation"
    )
    # the first run's model after k steps (saved by snapshot_at), or its end if k is all of it
    first_at_k = result.model
    if k < len(result.history):
        first_at_k = load_vqae(profile, work_dir, device, path=snapshot_path(Path(work_dir) / "vqae", k))
    # (restarts on?, model, its training history): both runs at step k, then the first run at its end
    compared = [(other, ablation.model, ablation.history), (not other, first_at_k, result.history[:k])]
    if k < len(result.history):
        compared.append((not other, result.model, result.history))
    rows = []
    for restart, model, history in compared:
        logged = [h for h in history if "perplexity" in h]
        rec_k = reconstruct(model, x_test, device, amp=profile.vqae.amp)
        rows.append(
            {
                "dead-code restarts": "on" if restart else "off",
                "steps": len(history),
                "codes used (last window)": int(logged[-1]["codebook_used"]),
                "perplexity (last window)": logged[-1]["perplexity"],
                "codes in test tokens": token_stats(rec_k.tokens, profile.vqae.codebook_size).used,
                "test Dice": float(rec_k.dice.mean()),
            }
        )
    return RestartComparison(ablation, rows, k, {other: ablation.history, not other: result.history})
