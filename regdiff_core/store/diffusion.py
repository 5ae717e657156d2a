"""Chapter 3's files: the denoiser's model file and training folders, and the entry points that read their
inputs from disk, call :mod:`regdiff_core.diffusion` and write what it computed.

Under ``work_dir``:

- ``diffusion/`` (:data:`MODEL_FILE`'s folder) — the denoiser later chapters sample from:
  ``checkpoint.pt`` (the resumable checkpoint of :func:`~regdiff_core.training.train_loop`, set aside when
  the tokens or settings change), ``history.csv`` (one row per step), ``heldout_curve.json`` (the
  held-out points of :func:`train_tracked`) and ``model.pt`` (:func:`save_denoiser`);
- ``diffusion/ablation/variant_<k>/`` — the runs of :func:`compare_variants`; :data:`PAPER_TOKENS_DIR` —
  the denoiser ``train-diffusion --tokens paper-release`` trains on the paper's own grids.

``model.pt`` has the one model-file layout of :func:`regdiff_core.training.save_model`:
``{"weights": {"model": state_dict, "ema": state_dict (when the run kept an EMA)}, "config":
asdict(DiffusionConfig), "codebook_size": K, "grid": (h, w, d), "steps": S}``; :func:`load_denoiser` builds
the network from it, so a model file loads whatever profile is active.

The training grids come from chapter 2's files (:mod:`regdiff_core.store.vqae`): ``tokens.pt`` and, when the
profile augments, the VQ-AE codes of the augmented pairs (:func:`training_tokens`); the paper's own grids from
``data_dir`` (:func:`paper_tokens`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import torch

from regdiff_core.config import DiffusionConfig, Profile
from regdiff_core.diffusion import (
    ABLATIONS,
    PAPER_HELDOUT,
    Denoiser,
    DiffusionRun,
    TokenSplit,
    TrackedRun,
    augment_pairs,
    augment_versions,
    build_denoiser,
    evaluate_loss,
    split_tokens,
    train_denoiser,
)
from regdiff_core.store.vqae import load_paper_tokens, load_tokens, load_vqae
from regdiff_core.training import (
    CHECKPOINT_FILE,
    CheckpointError,
    load_model,
    load_weights,
    read_checkpoint,
    save_model,
)
from regdiff_core.utils import atomic_write_text, seed_everything
from regdiff_core.vqae import Tokens, encode_volumes

#: Files this chapter writes under ``work_dir``.
MODEL_FILE = Path("diffusion") / "model.pt"
#: Where ``train-diffusion --tokens paper-release`` writes its denoiser (not ``diffusion/``: chapter 4
#: decodes what is there with *our* VQ-AE, which cannot read the paper's codes).
PAPER_TOKENS_DIR = Path("diffusion_paper_tokens")
HISTORY_FILE = Path("diffusion") / "history.csv"


# --------------------------------------------------------------------------------------------------
# The model file
# --------------------------------------------------------------------------------------------------


def save_denoiser(run: DiffusionRun, path: str | Path) -> Path:
    """Write ``run``'s weights (and its EMA copy's, if any), the config, codebook size and grid the
    denoiser was built with and the steps trained (:func:`~regdiff_core.training.save_model`)."""
    weights = {"model": run.denoiser.state_dict()}
    if run.ema is not None:
        weights["ema"] = run.ema.state_dict()
    denoiser = run.denoiser
    return save_model(
        path, weights, dataclasses.asdict(denoiser.cfg), codebook_size=denoiser.codebook_size,
        grid=denoiser.grid, steps=len(run.history),
    )  # fmt: skip


def load_denoiser(
    work_dir: str | Path, device: torch.device, *, ema: bool | None = None, path: str | Path | None = None
) -> Denoiser:
    """The trained denoiser from ``work_dir/diffusion/model.pt`` (or ``path``), in eval mode.

    ``ema=None`` uses the EMA weights when the run kept them; ``True`` requires them; ``False`` never.
    The architecture comes from the file, so a checkpoint loads whatever profile is active.
    """
    path = Path(path) if path is not None else Path(work_dir) / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"no denoiser at {path}: run chapter 3 (notebooks/03_absorbing_diffusion.ipynb) or "
            "`python -m regdiff_core train-diffusion --profile <P> --work-dir <W>` first"
        )
    payload = load_model(
        path, "denoiser", "Move it away and rerun chapter 3 or `python -m regdiff_core train-diffusion`."
    )
    try:
        cfg = DiffusionConfig(**payload["config"])
        denoiser = build_denoiser(cfg, payload["codebook_size"], tuple(payload["grid"]))
        weights = payload["weights"]["model"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a denoiser model.pt of this project ({type(err).__name__}: {err}); move it away "
            "and rerun `python -m regdiff_core train-diffusion`"
        ) from err
    if ema or (ema is None and "ema" in payload["weights"]):
        if "ema" not in payload["weights"]:
            raise KeyError(f"{path} holds no EMA weights (the run had DiffusionConfig.ema = None)")
        weights = payload["weights"]["ema"]
    load_weights(denoiser, weights, name=str(path))
    return denoiser.to(device).eval()


# --------------------------------------------------------------------------------------------------
# Entry points: inputs from disk, chapter 3's computation, results to disk
# --------------------------------------------------------------------------------------------------


def training_tokens(profile: Profile, work_dir: str | Path, device: torch.device, *, tokens=None, vqae=None):
    """The denoiser's training grids: chapter 2's ``tokens.pt`` (or ``tokens``) and, when the profile
    augments (``diffusion.augment_flip`` / ``augment_shift``), the VQ-AE codes of the augmented training
    pairs (:func:`~regdiff_core.diffusion.augment_pairs`) after them. Returns a :class:`~regdiff_core.vqae.Tokens`; ``cases`` name
    each grid (``"032"``, ``"032:flip"``, ``"032:shift-101"``, …).
    """
    cfg = profile.diffusion
    tokens = tokens if tokens is not None else load_tokens(work_dir)
    if not cfg.augment_flip and cfg.augment_shift == "none":
        return tokens
    from regdiff_core.store.data import load_pairs

    pairs = load_pairs(profile, work_dir, "train")
    if list(pairs.cases) != list(tokens.cases):
        raise ValueError(
            f"{work_dir}/tokens.pt holds cases {tokens.cases}, the prepared training pairs are {pairs.cases}: "
            "rerun chapter 2 (`python -m regdiff_core encode`) after chapter 1"
        )
    vqae = vqae if vqae is not None else load_vqae(profile, work_dir, device)
    volumes = augment_pairs(pairs.volumes(dtype=torch.uint8), vqae.downsampling, flip=cfg.augment_flip,
                            shift=cfg.augment_shift)[len(pairs.cases):]  # fmt: skip
    extra = encode_volumes(vqae, volumes, device, profile.vqae.encode_batch, amp=profile.vqae.amp)
    versions = augment_versions(cfg.augment_flip, cfg.augment_shift)[1:]  # the originals are tokens.pt
    names = [f"{c}:{tag}" for _, _, tag in versions for c in pairs.cases]
    return Tokens(
        torch.cat([tokens.tokens, extra]), list(tokens.cases) + names, tokens.grid, tokens.codebook_size
    )


def train(
    profile: Profile,
    work_dir: str | Path,
    device: torch.device,
    *,
    tokens=None,
    cfg: DiffusionConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> DiffusionRun:
    """Train the denoiser on the token grids of chapter 2 (:func:`training_tokens`, or ``tokens``) with
    :func:`~regdiff_core.diffusion.train_denoiser` and save it.

    ``cfg`` defaults to ``profile.diffusion``; ``out_dir`` to ``work_dir/diffusion``. Writes
    ``out_dir/model.pt`` (:func:`save_denoiser`), ``out_dir/checkpoint.pt`` (the resumable checkpoint)
    and ``out_dir/history.csv``. If a finished checkpoint is already there, nothing is retrained.
    """
    work_dir = Path(work_dir)
    cfg = cfg or profile.diffusion
    out_dir = Path(out_dir) if out_dir is not None else work_dir / MODEL_FILE.parent
    if tokens is None:
        tokens = training_tokens(profile, work_dir, device)
    run = train_denoiser(tokens, cfg, device, out_dir=out_dir, progress=progress)
    return run._replace(model_path=save_denoiser(run, out_dir / MODEL_FILE.name))


def _score(run: DiffusionRun, x_heldout: torch.Tensor, T: int, seed: int, steps: int) -> dict[str, float]:
    """One row of :func:`train_tracked`'s curve: held-out ELBO and accuracy of the raw and EMA weights."""
    row: dict[str, float] = {"steps": steps}
    for prefix, net in (("", run.denoiser), ("ema_", run.ema)):
        if net is not None:
            score = evaluate_loss(net, x_heldout, T, generator=torch.Generator().manual_seed(seed))
            row.update({f"{prefix}elbo": score["elbo"], f"{prefix}accuracy": score["accuracy"]})
    return row


def train_tracked(
    profile: Profile,
    work_dir: str | Path,
    device: torch.device,
    x_heldout: torch.Tensor,
    *,
    tokens=None,
    every: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> TrackedRun:
    """:func:`train`, stopped every ``every`` steps (default ``iterations // 4``) to score the
    weights on held-out grids ``x_heldout`` (B, N) with :func:`~regdiff_core.diffusion.evaluate_loss` (the same
    masks each time).

    Each stage resumes the previous one's checkpoint, and checkpoints carry the RNG state, so the run is
    the one an uninterrupted :func:`train` would make; only the held-out curve is added. The
    curve is kept in ``out_dir/heldout_curve.json`` beside the checkpoint it describes, so a rerun of a
    finished (or resumed) run shows the points scored before; a checkpoint trained afresh starts a new one.
    """
    import hashlib
    import io
    import json
    from contextlib import nullcontext, redirect_stdout

    cfg = profile.diffusion
    out_dir = Path(out_dir) if out_dir is not None else Path(work_dir) / MODEL_FILE.parent
    every = max(1, cfg.iterations // 4) if every is None else max(1, int(every))
    milestones = list(range(every, cfg.iterations, every)) + [cfg.iterations]
    # which run and which held-out grids the stored points belong to
    key = hashlib.sha256(x_heldout.cpu().numpy().tobytes() + f"{seed}".encode())
    curve_path = out_dir / "heldout_curve.json"
    stored: dict[int, dict[str, float]] = {}
    seconds, run = 0.0, None
    for k, steps in enumerate(milestones):
        # later stages resume the checkpoint this call just wrote: their "resuming …" notes say nothing new
        with redirect_stdout(io.StringIO()) if k else nullcontext():
            run = train(
                profile, work_dir, device, tokens=tokens, cfg=dataclasses.replace(cfg, iterations=steps),
                out_dir=out_dir, progress=False,
            )  # fmt: skip
        if k == 0:  # the fingerprint of the checkpoint is settled now: read the points that belong to it
            key.update(
                read_checkpoint(out_dir / CHECKPOINT_FILE, "denoiser checkpoint")["fingerprint"].encode()
            )
            if curve_path.exists():
                try:
                    saved = json.loads(curve_path.read_text())
                    if saved.get("key") == key.hexdigest():
                        stored = {int(r["steps"]): r for r in saved.get("rows", [])}
                except (ValueError, KeyError, TypeError, AttributeError):
                    stored = {}  # a damaged curve file only costs the points: they are scored again
        seconds += run.seconds
        if steps not in stored and len(run.history) == steps:
            stored[steps] = _score(run, x_heldout, cfg.T, seed, steps)
            rows = [stored[s] for s in sorted(stored)]
            atomic_write_text(curve_path, json.dumps({"key": key.hexdigest(), "rows": rows}) + "\n")
    if len(run.history) not in stored:  # resumed a longer, finished run: score its end
        stored[len(run.history)] = _score(run, x_heldout, cfg.T, seed, len(run.history))
    curve = [stored[s] for s in sorted(stored) if s <= len(run.history)]
    return TrackedRun(run._replace(seconds=seconds), curve)


def compare_variants(
    profile: Profile,
    work_dir: str | Path,
    device: torch.device,
    x_heldout: torch.Tensor,
    *,
    tokens=None,
    variants: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Train each variant of ``diffusion.ablation_variants`` (see :data:`~regdiff_core.diffusion.ABLATIONS`) for
    ``diffusion.ablation_iterations`` steps from the same seed (the global RNG is reseeded with
    ``seed``), tracking an EMA (decay ``diffusion.ablation_ema``), and score raw and EMA weights by
    :func:`~regdiff_core.diffusion.evaluate_loss` on ``x_heldout`` (B, N). One row per variant and weights; ``[]`` when
    ``ablation_iterations`` is 0. Runs are cached under ``work_dir/diffusion/ablation/variant_<k>``.
    """
    from regdiff_core.utils import seed_everything

    base = profile.diffusion
    if base.ablation_iterations <= 0:
        return []
    if variants is None:
        unknown = set(base.ablation_variants) - set(ABLATIONS)
        if unknown:
            raise ValueError(
                f"diffusion.ablation_variants: unknown {sorted(unknown)}; known {sorted(ABLATIONS)}"
            )
        variants = {name: ABLATIONS[name] for name in base.ablation_variants}
    rows = []
    for k, (name, change) in enumerate(variants.items()):
        cfg = dataclasses.replace(
            base, iterations=base.ablation_iterations, ema=base.ablation_ema, ckpt_every=base.ablation_iterations,
            **change,
        )  # fmt: skip
        seed_everything(seed)
        run = train(
            profile, work_dir, device, tokens=tokens, cfg=cfg,
            out_dir=Path(work_dir) / "diffusion" / "ablation" / f"variant_{k}", progress=False,
        )  # fmt: skip
        tail = run.history[-base.log_every :]
        for weights, net in (("raw", run.denoiser), (f"EMA {cfg.ema}", run.ema)):
            score = evaluate_loss(net, x_heldout, cfg.T, generator=torch.Generator().manual_seed(seed))
            rows.append({
                "variant": name, "weights": weights, "steps": len(run.history),
                "train loss (last steps)": sum(r["loss"] for r in tail) / max(len(tail), 1),
                "held-out loss": score["loss"], "held-out ELBO": score["elbo"],
                "held-out accuracy": score["accuracy"], "seconds": run.seconds,
            })  # fmt: skip
    return rows


def paper_tokens(data_dir: str | Path, heldout: int = PAPER_HELDOUT) -> TokenSplit:
    """The paper's own token grids (:func:`regdiff_core.store.vqae.load_paper_tokens`, from
    ``data_dir/unleashing-registration/``): the first ``97 − heldout`` for training, the last
    ``heldout`` (default 10) kept aside. ``heldout=0`` gives all 97 for training, as the paper trained.

    What they can give: the paper's diffusion model trained on its real training data, held-out bits
    per token, and sampled token grids. What they cannot: volumes — the VQ-AE that decodes them is not
    released, so no synthetic vessel pairs and no registration come from them.
    """
    return split_tokens(load_paper_tokens(data_dir), heldout)


class PaperTokenRun(NamedTuple):
    """A denoiser trained on the paper's own token grids (:func:`train_on_paper_tokens`): the ``split``
    (training / held-out grids), the ``run``, its ``steps``, and the held-out ``loss``/``elbo``/``accuracy``
    of its sampling weights (``heldout``, from :func:`~regdiff_core.diffusion.evaluate_loss`)."""

    split: TokenSplit
    run: DiffusionRun
    steps: int
    heldout: dict[str, float]


def train_on_paper_tokens(
    profile: Profile, work_dir: str | Path, data_dir: str | Path, device: torch.device, seed: int = 0
) -> PaperTokenRun:
    """Chapter 3's side run: the profile's denoiser trained for ``diffusion.side_iterations`` steps (at most
    ``iterations``) on the paper's 97 released token grids less the last :data:`~regdiff_core.diffusion.
    PAPER_HELDOUT`, in ``work_dir/diffusion/paper_tokens``, then scored on those held out (masks drawn
    from a generator seeded with ``seed``). The global RNG is seeded with ``seed`` before training."""
    split = paper_tokens(data_dir)
    cfg = profile.diffusion
    steps = min(cfg.side_iterations or cfg.iterations, cfg.iterations)
    side = dataclasses.replace(profile, diffusion=dataclasses.replace(cfg, iterations=steps))
    seed_everything(seed)
    run = train(side, work_dir, device, tokens=split.train, out_dir=Path(work_dir) / "diffusion" / "paper_tokens",
                progress=False)  # fmt: skip
    net = run.ema if run.ema is not None else run.denoiser
    x_heldout = split.heldout.tokens.reshape(len(split.heldout.tokens), -1)
    heldout = evaluate_loss(net, x_heldout, cfg.T, generator=torch.Generator().manual_seed(seed))
    return PaperTokenRun(split, run, steps, heldout)
