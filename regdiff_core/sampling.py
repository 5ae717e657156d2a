"""Chapter 4: sample new token grids, decode them into synthetic paired volumes, and judge them.

The pipeline: :func:`regdiff_core.diffusion.sample_tokens` draws token grids from the trained denoiser
(chapter 3); the VQ-AE decoder (chapter 2) turns each grid into two vessel-probability volumes, fixed
(inhale) and moving (exhale), at ``profile.data.shape`` (:func:`generate_pairs`). Each batch of a run
draws from its own generator (:func:`batch_seed`), so the pairs do not depend on how many processes
sample them. Writing the pairs to disk and reading them back (npz, NIfTI, the manifest) is
:mod:`regdiff_core.store.sampling`.

Statistics a reader can judge the synthetic pairs by (all on masks binarised at 0.5): vessel volume
fraction, fixed-vs-moving Dice (how much "breathing" a pair contains), the distance between token
histograms and the neighbour agreement of token grids (spatial coherence), and a memorisation check —
each synthetic pair's Dice to its nearest *training* pair, against the same number for real pairs (each
training pair to its nearest *other* training pair) and for VQ-AE reconstructions of the training pairs
(about what a copy would score). Pair Dice over all pairs is one chunked matrix product
(:func:`dice_matrix`), so it stays cheap at paper size.

Differences from the authors' code (the seed, ``infer_sampler.py``) and why: one list, on the book's
profiles page (``book/profiles.md``; ``SEED_DIFFERENCES`` in ``book/_tools/bookpages.py``).

Left out: FID-like feature distances (no pretrained 3D vessel network exists to take features from)
and registration-based checks of the synthetic deformation (chapter 5 trains on the pairs; chapter 6
measures what they are worth).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from regdiff_core.data import dice, dice_from_counts
from regdiff_core.diffusion import Denoiser, TokenSamples, sample_tokens

if TYPE_CHECKING:
    pass


# --------------------------------------------------------------------------------------------------
# Sampling and decoding
# --------------------------------------------------------------------------------------------------


class SyntheticPairs(NamedTuple):
    """``tokens``/``unmask_step`` (n, h, w, d); ``fixed``/``moving`` (n, H, W, D) float32 P(vessel);
    ``seconds_tokens``/``seconds_decode``: wall time of the two stages (s); ``network_calls``."""

    tokens: torch.Tensor
    unmask_step: torch.Tensor
    fixed: torch.Tensor
    moving: torch.Tensor
    seconds_tokens: float
    seconds_decode: float
    network_calls: int

    @property
    def seconds_per_pair(self) -> float:
        return (self.seconds_tokens + self.seconds_decode) / max(len(self.tokens), 1)


@torch.no_grad()
def decode_probabilities(
    vqae, tokens: torch.Tensor, *, batch_size: int = 2, amp: bool = True
) -> torch.Tensor:
    """Token grids (n, h, w, d) → (n, 2, H, W, D) float32 P(vessel) on the CPU, channels (fixed, moving)."""
    from regdiff_core.vqae import decode_tokens

    device = next(vqae.parameters()).device
    probs = decode_tokens(vqae, tokens, device, batch_size=batch_size, amp=amp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return probs


@torch.no_grad()
def decode_masks(
    vqae, tokens: torch.Tensor, *, threshold: float = 0.5, batch_size: int = 2, amp: bool = True
) -> torch.Tensor:
    """Token grids (n, h, w, d) → binary masks (n, 2, H, W, D) bool, ``P(vessel) > threshold``, decoded
    ``batch_size`` at a time so that only masks (1 byte per voxel), never probabilities, pile up."""
    return torch.cat(
        [
            decode_probabilities(vqae, t, batch_size=batch_size, amp=amp) > threshold
            for t in tokens.split(batch_size)
        ]
    )


def generate_pairs(
    denoiser: Denoiser,
    vqae,
    n: int,
    *,
    steps: int,
    temperature: float,
    batch_size: int,
    generator: torch.Generator | None = None,
    amp: bool = True,
    progress: bool = False,
) -> SyntheticPairs:
    """Sample ``n`` token grids and decode them, all in memory (use :func:`~regdiff_core.store.sampling.sample_to_disk` for many)."""
    samples = sample_tokens(
        denoiser, n, steps=steps, temperature=temperature, batch_size=batch_size, generator=generator,
        amp=amp, progress=progress,
    )  # fmt: skip
    t0 = time.perf_counter()
    probs = decode_probabilities(vqae, samples.tokens, batch_size=batch_size, amp=amp)
    return SyntheticPairs(
        tokens=samples.tokens, unmask_step=samples.unmask_step, fixed=probs[:, 0], moving=probs[:, 1],
        seconds_tokens=samples.seconds, seconds_decode=time.perf_counter() - t0,
        network_calls=samples.network_calls,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Export and loading
# --------------------------------------------------------------------------------------------------


def batch_seed(seed: int, k: int) -> int:
    """The seed of batch ``k`` of a sampling run with ``seed``: ``seed`` itself for the first batch, a hash
    of (``seed``, ``k``) for the others."""
    if k == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1, np.uint64)[0] % 2**63)


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def binarise_pairs(pairs, threshold: float = 0.5) -> torch.Tensor:
    """A ``PairSet`` (uint8 masks or float probabilities) → (N, 2, H, W, D) bool, ``value > threshold``."""
    return torch.stack((pairs.fixed.float() > threshold, pairs.moving.float() > threshold), dim=1)


def volume_fraction(masks: torch.Tensor) -> torch.Tensor:
    """Vessel volume fraction per pair, ``masks`` (N, 2, H, W, D) bool → (N,), mean of fixed and moving."""
    return masks.flatten(2).double().mean(-1).mean(-1)


def pair_dice(masks: torch.Tensor) -> torch.Tensor:
    """Dice between the fixed and the moving mask of each pair, (N, 2, H, W, D) bool → (N,) float64.

    Dice = 2|F ∩ M| / (|F| + |M|) (:func:`regdiff_core.data.dice`); 1 for two empty masks. Low values
    mean much motion (or noise).
    """
    return dice(masks[:, 0], masks[:, 1], dims=tuple(range(1, masks.ndim - 1)))


def dice_matrix(a: torch.Tensor, b: torch.Tensor, *, chunk: int = 1 << 20) -> torch.Tensor:
    """All-pairs Dice of binary masks: ``a`` (n, ...) and ``b`` (m, ...) bool → (n, m) float64.

    Intersections as matrix products over voxel chunks (float32 per chunk, exact below 2²⁴ voxels;
    accumulated in float64), so n·m Dice values cost one pass over the voxels.
    """
    a, b = a.flatten(1), b.flatten(1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"masks differ in size: {tuple(a.shape)} vs {tuple(b.shape)}")
    inter = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for s in range(0, a.shape[1], chunk):
        # |A ∩ B| = Σ_v a_v b_v
        inter += (a[:, s : s + chunk].float() @ b[:, s : s + chunk].float().T).double()
    return dice_from_counts(inter, a.sum(1)[:, None], b.sum(1)[None, :])


class NearestNeighbour(NamedTuple):
    """For each query pair: ``dice`` (n,) to its nearest reference pair and that pair's ``index`` (n,)."""

    dice: torch.Tensor
    index: torch.Tensor


def nearest_pair_dice(
    query: torch.Tensor, reference: torch.Tensor, *, exclude_self: bool = False
) -> NearestNeighbour:
    """Nearest reference pair by pair Dice (fixed and moving masks together, (N, 2, H, W, D) bool).

    ``exclude_self``: ``query`` *is* ``reference``; a pair may not be its own neighbour.
    """
    d = dice_matrix(query, reference)
    if exclude_self:
        if d.shape[0] != d.shape[1]:
            raise ValueError("exclude_self needs query and reference to be the same set")
        d.fill_diagonal_(-math.inf)
    best, index = d.max(dim=1)
    return NearestNeighbour(dice=best, index=index)


def token_histogram(tokens: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Relative frequency of each codebook index over all grids, (codebook_size,) float64, sums to 1."""
    counts = torch.bincount(tokens.flatten().long(), minlength=codebook_size).double()
    return counts / counts.sum().clamp(min=1)


def token_histogram_distance(tokens_a: torch.Tensor, tokens_b: torch.Tensor, codebook_size: int) -> float:
    """Total-variation distance ½ Σ_k |p_k − q_k| between two token histograms, in [0, 1]."""
    p = token_histogram(tokens_a, codebook_size)
    q = token_histogram(tokens_b, codebook_size)
    # TV(p, q) = ½ Σ_k |p_k − q_k|
    return float(0.5 * (p - q).abs().sum())


def neighbour_agreement(tokens: torch.Tensor) -> float:
    """Share of face-adjacent token pairs (along each of the 3 grid axes) that hold the same code.

    ``tokens`` (n, h, w, d). A spatial-coherence number the token histogram cannot see: tokens drawn
    independently per position can match the histogram yet form a patchwork.
    """
    same, total = 0, 0
    for axis in (1, 2, 3):
        a = tokens.narrow(axis, 0, tokens.shape[axis] - 1)
        b = tokens.narrow(axis, 1, tokens.shape[axis] - 1)
        same += int((a == b).sum())
        total += a.numel()
    return same / max(total, 1)


def pair_statistics(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair numbers of (N, 2, H, W, D) bool masks: ``volume_fraction`` and ``pair_dice`` (N,)."""
    return {"volume_fraction": volume_fraction(masks), "pair_dice": pair_dice(masks)}


def statistics_rows(stats: dict[str, dict[str, torch.Tensor]]) -> list[dict[str, object]]:
    """Table rows (mean ± sd) from ``{name: pair_statistics(masks)}``: volume fraction in %, pair Dice."""
    rows = []
    for name, s in stats.items():
        vf, pd = summarise(s["volume_fraction"]), summarise(s["pair_dice"])
        rows.append({
            "pairs": name, "n": len(s["pair_dice"]),
            "volume fraction (%)": f"{100 * vf['mean']:.2f} ± {100 * vf['std']:.2f}",
            "fixed-vs-moving Dice": f"{pd['mean']:.3f} ± {pd['std']:.3f}",
        })  # fmt: skip
    return rows


class Memorisation(NamedTuple):
    """``synthetic``: each synthetic pair's nearest training pair; ``real``: each training pair's nearest
    *other* training pair; ``copy_dice`` (N_train,): each training pair against its VQ-AE reconstruction,
    i.e. about what an exact copy of a training token grid scores after decoding."""

    synthetic: NearestNeighbour
    real: NearestNeighbour
    copy_dice: torch.Tensor

    def summary(self) -> str:
        """Two sentences built from the numbers (so the text never claims more than they show)."""
        s, r, c = self.synthetic.dice, self.real.dice, self.copy_dice
        close = int((s >= c.min()).sum())
        return (
            f"Mean pair Dice: synthetic → nearest training {float(s.mean()):.3f} (max {float(s.max()):.3f}); "
            f"real → nearest other training {float(r.mean()):.3f}; VQ-AE copy → original {float(c.mean()):.3f}.\n"
            f"{close} of {len(s)} synthetic pairs are at least as close to a training pair as the least faithful "
            f"VQ-AE copy ({float(c.min()):.3f}); {len(torch.unique(self.synthetic.index))} different training "
            "pairs are nearest neighbours."
        )


def memorisation_check(synthetic: torch.Tensor, train: torch.Tensor, copies: torch.Tensor) -> Memorisation:
    """Nearest-training-pair Dice of ``synthetic`` (n, 2, H, W, D) bool against ``train`` (N, 2, H, W, D),
    with the references of :class:`Memorisation`; ``copies``: the training pairs' VQ-AE reconstructions."""
    copy_dice = pair_dice(torch.stack((copies.flatten(1), train.flatten(1)), dim=1))
    return Memorisation(
        synthetic=nearest_pair_dice(synthetic, train),
        real=nearest_pair_dice(train, train, exclude_self=True),
        copy_dice=copy_dice,
    )


def quality_vs_steps(
    denoiser: Denoiser,
    vqae,
    reference_tokens: torch.Tensor,
    steps_list: Sequence[int],
    n: int,
    *,
    temperature: float,
    batch_size: int,
    threshold: float = 0.5,
    seed: int = 0,
    amp: bool = True,
) -> list[dict[str, float]]:
    """Sample ``n`` pairs (same seed) for each number of steps; one row per entry: denoiser calls, seconds
    per pair (sampling + decoding), mean volume fraction (%), mean fixed-vs-moving Dice, and the token
    histogram distance to ``reference_tokens`` and the :func:`neighbour_agreement` of the sampled grids."""
    rows = []
    for steps in steps_list:
        out = generate_pairs(
            denoiser, vqae, n, steps=steps, temperature=temperature, batch_size=batch_size, amp=amp,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        st = pair_statistics(torch.stack((out.fixed > threshold, out.moving > threshold), dim=1))
        rows.append({
            "steps": steps, "denoiser calls": out.network_calls, "s per pair": out.seconds_per_pair,
            "volume fraction (%)": 100 * float(st["volume_fraction"].mean()),
            "fixed-vs-moving Dice": float(st["pair_dice"].mean()),
            "token distance": token_histogram_distance(out.tokens, reference_tokens, denoiser.codebook_size),
            "neighbour agreement": neighbour_agreement(out.tokens),
        })  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------
# Showing the sampler at work
# --------------------------------------------------------------------------------------------------


class UnmaskingFrame(NamedTuple):
    """The state after ``step`` steps: ``x_t`` (h, w, d) with mask ids, ``unmasked`` fraction, and
    ``probs`` (2, H, W, D): the decoded one-shot guess of x_0 (denoiser argmax at the masked places)."""

    step: int
    x_t: torch.Tensor
    unmasked: float
    probs: torch.Tensor


@torch.no_grad()
def unmasking_frames(
    denoiser: Denoiser, vqae, samples: TokenSamples, index: int = 0, n_frames: int = 9, amp: bool = True
) -> list[UnmaskingFrame]:
    """Re-play sample ``index`` of a :func:`sample_tokens` run at ``n_frames`` steps from 0 to S.

    ``step`` s means "after s sampler steps" (s = 0: all masked; s = S: the final grid).
    """
    from regdiff_core.utils import autocast

    device = next(denoiser.parameters()).device
    S = samples.steps
    steps = sorted({int(round(s)) for s in np.linspace(0, S, n_frames)})
    tokens, when = samples.tokens[index], samples.unmask_step[index]
    frames = []
    for s in steps:
        # x after s steps: the tokens drawn at steps 0 … s−1, the mask id elsewhere
        x_t = torch.where(when < s, tokens, torch.full_like(tokens, denoiser.mask_id))
        with autocast(device, amp):
            logits = denoiser(x_t.reshape(1, -1).to(device))
        guess = torch.where(
            x_t.reshape(1, -1).to(device) == denoiser.mask_id,
            logits.argmax(-1),
            x_t.reshape(1, -1).to(device),
        )
        probs = decode_probabilities(vqae, guess.view(1, *tokens.shape), batch_size=1, amp=amp)[0]
        frames.append(UnmaskingFrame(step=s, x_t=x_t, unmasked=float((when < s).float().mean()), probs=probs))
    return frames


def summarise(values: torch.Tensor) -> dict[str, float]:
    """mean, std, min, max of a 1-D tensor as plain floats (for tables and metrics)."""
    v = values.double()
    return {
        "mean": float(v.mean()),
        "std": float(v.std()) if v.numel() > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
    }


__all__ = [
    "Memorisation",
    "memorisation_check",
    "quality_vs_steps",
    "statistics_rows",
    "NearestNeighbour",
    "SyntheticPairs",
    "UnmaskingFrame",
    "binarise_pairs",
    "decode_masks",
    "decode_probabilities",
    "dice_matrix",
    "generate_pairs",
    "nearest_pair_dice",
    "neighbour_agreement",
    "pair_dice",
    "pair_statistics",
    "summarise",
    "token_histogram",
    "token_histogram_distance",
    "unmasking_frames",
    "volume_fraction",
]
