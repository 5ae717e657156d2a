"""Chapter 2: the paired VQ-AE — turn a (fixed, moving) vessel pair into one grid of discrete tokens.

A MONAI :class:`~monai.networks.nets.AutoEncoder` maps the two-channel volume ``x`` (fixed, moving) to
a feature map ``z_e`` with ``embed_dim`` channels on a grid ``prod(strides)`` times coarser; a
:class:`VectorQuantizer` replaces each feature vector by its nearest codebook entry ``e_k`` (the
*token* is ``k``); the decoder turns the quantised map ``z_q`` back into four logits, two classes
(background, vessel) for each of the two volumes. Because both volumes go through one encoder, a
token describes the *pair* at that place, so the diffusion model of chapter 3 learns fixed and
moving vessels — and their correspondence — jointly.

Shapes (``paper`` profile; ``ci`` is 4× smaller in every axis with 2 down-samplings instead of 4)::

    x      (B, 2, 256, 208, 256)  float in [0, 1], channels (fixed, moving)
    z_e    (B, 384, 16, 13, 16)   encoder output
    tokens (B, 16, 13, 16)        long in [0, codebook_size)
    logits (B, 4, 256, 208, 256)  (fixed bg, fixed vessel, moving bg, moving vessel)

Every component takes ``spatial_dims`` (2 or 3) so a 2D track can reuse it.

Here: the networks, the loss, :func:`train_step` and :func:`train_vqae` (the training loop over tensors),
encoding and decoding whole volumes, and the token statistics. The files — ``vqae/model.pt``, ``tokens.pt``,
the paper's token grids — and the entry points that read and write them (``train``, ``encode_pairs``,
``compare_restarts``) are in :mod:`regdiff_core.store.vqae`.

Differences from the authors' code (the seed, ``train_vqae.py`` / ``infer_vqae.py``) and why: one list,
on the book's profiles page (``book/profiles.md``; ``SEED_DIFFERENCES`` in ``book/_tools/bookpages.py``).

Left out on purpose: a restarted dead code keeps its Adam moment estimates (resetting them would mean
reaching into the optimizer's state for a few rows); the next steps overwrite them quickly.

Hand-written where a library has one: the vector quantiser. MONAI's
``monai.networks.layers.vector_quantizer.EMAQuantizer`` learns its codebook by exponential moving
averages and has no codebook loss term, while the paper trains the codebook by gradient with the
loss ``0.1 · codebook loss`` (the unleashing-transformers quantiser). Reproducing the paper needs the
gradient form, and the dead-code restart needs access to the usage counts, so we write the ~40 lines.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoEncoder
from torch import nn

from regdiff_core import distributed
from regdiff_core.config import VQAEConfig
from regdiff_core.data import dice
from regdiff_core.training import CHECKPOINT_FILE

#: ``VQAEConfig.norm`` → MONAI's ``norm`` argument. "instance" is MONAI's default and the paper's; its
#: statistics are taken over each whole volume, so the code of a cell also depends on the rest of the
#: volume (chapter 2 measures how case-specific that makes the codes). "batch" learns fixed statistics,
#: so equal neighbourhoods get equal codes in every volume.
NORMS: dict[str, str | None] = {"instance": "INSTANCE", "batch": "BATCH", "none": None}


# --------------------------------------------------------------------------------------------------
# The vector quantiser
# --------------------------------------------------------------------------------------------------


class QuantiserOutput(NamedTuple):
    """``z_q``: (B, C, *grid) quantised features (straight-through); ``loss``: scalar codebook loss;
    ``indices``: (B, *grid) long, the nearest code of each position."""

    z_q: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor


class CodebookStats(NamedTuple):
    """Usage over a window of training steps: ``used`` codes with at least one assignment, and the
    ``perplexity`` exp(H(p)) of the assignment frequencies p (1 = one code, ``codebook_size`` = uniform)."""

    used: int
    perplexity: float


def codebook_stats(counts: torch.Tensor) -> CodebookStats:
    """:class:`CodebookStats` from assignment ``counts`` (K,) per code; NaN perplexity when all are 0."""
    counts = counts.double()
    total = float(counts.sum())
    if total == 0:
        return CodebookStats(0, float("nan"))
    p = counts[counts > 0] / total
    # perplexity = exp(H(p)) = exp(−Σ_k p_k log p_k)
    return CodebookStats(int((counts > 0).sum()), float((-(p * p.log()).sum()).exp()))


def token_stats(tokens: torch.Tensor, codebook_size: int) -> CodebookStats:
    """:class:`CodebookStats` of a tensor of tokens (any shape)."""
    return codebook_stats(torch.bincount(tokens.flatten().cpu(), minlength=codebook_size))


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantiser with straight-through gradients (van den Oord et al. 2017).

    ``codebook``: ``codebook_size`` × ``embed_dim``, initialised U(−1/K, 1/K) as in the seed.

    Loss, as in the seed (taming-/unleashing-transformers' *legacy* form, ``legacy_beta=True``)::

        L = ||sg[e] − z_e||² + β · ||e − sg[z_e]||²

    i.e. β weights the codebook term; van den Oord's form (``legacy_beta=False``) puts β on the
    commitment term instead: ``||sg[z_e] − e||² + β · ||z_e − sg[e]||²``.

    For codebook health it keeps, as buffers (so they survive checkpoints and resume exactly):
    ``usage`` — assignments per code since the last :meth:`reset_usage`; ``recent`` — a ring buffer
    of ``codebook_size`` recent encoder outputs, from which :meth:`restart_dead_codes` draws.
    """

    def __init__(
        self, codebook_size: int, embed_dim: int, beta: float = 0.25, legacy_beta: bool = True
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.beta = beta
        self.legacy_beta = legacy_beta
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("usage", torch.zeros(codebook_size, dtype=torch.float64))
        self.register_buffer("recent", torch.zeros(codebook_size, embed_dim))
        self.register_buffer("recent_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("recent_next", torch.zeros((), dtype=torch.long))

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """(N, C) features → (N,) index of the nearest code (Euclidean), computed in fp32."""
        # autocast off: under it the matmul below would run in fp16/bf16 whatever its inputs' dtype
        with torch.autocast(device_type=z_flat.device.type, enabled=False):
            e = self.embedding.weight.float()
            z_flat = z_flat.float()
            # ||z − e||² = ||z||² + ||e||² − 2 z·e
            d = (z_flat**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * z_flat @ e.t()
            return d.argmin(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, *grid) long → (B, C, *grid) codebook vectors."""
        e = self.embedding(indices)  # (B, *grid, C)
        return e.movedim(-1, 1).contiguous()

    def forward(self, z_e: torch.Tensor) -> QuantiserOutput:
        """``z_e``: (B, C, *grid) encoder output → :class:`QuantiserOutput`. Records usage when training."""
        if z_e.shape[1] != self.embed_dim:
            raise ValueError(
                f"quantiser expects {self.embed_dim} channels, got z_e of shape {tuple(z_e.shape)}"
            )
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z = z_e.float().movedim(1, -1)  # (B, *grid, C)
            z_flat = z.reshape(-1, self.embed_dim)
            indices = self.nearest(z_flat)
            e = self.embedding(indices).view_as(z)
            if self.legacy_beta:
                # L = ||sg[e] − z_e||² + β ||e − sg[z_e]||²   (the seed)
                loss = ((e.detach() - z) ** 2).mean() + self.beta * ((e - z.detach()) ** 2).mean()
            else:
                # L = ||sg[z_e] − e||² + β ||z_e − sg[e]||²   (van den Oord et al.)
                loss = ((z.detach() - e) ** 2).mean() + self.beta * ((z - e.detach()) ** 2).mean()
            # straight-through: forward value e, gradient of z_e (dz_q/dz_e = identity)
            z_q = z + (e - z).detach()
        if self.training:
            self._record(z_flat.detach(), indices)
        return QuantiserOutput(z_q.movedim(-1, 1).contiguous(), loss, indices.view(z.shape[:-1]))

    @torch.no_grad()
    def _record(self, z_flat: torch.Tensor, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.codebook_size)
        # under torchrun: the whole batch's counts on every rank, or the ranks' restarts would drift apart
        self.usage += distributed.all_reduce_sum_(counts).to(self.usage)
        # keep up to K random encoder outputs of this batch in the ring buffer
        k = min(self.codebook_size, z_flat.shape[0])
        pick = z_flat[torch.randperm(z_flat.shape[0], device=z_flat.device)[:k]]
        slots = (self.recent_next + torch.arange(k, device=pick.device)) % self.codebook_size
        self.recent[slots] = pick.to(self.recent)
        self.recent_next.copy_((self.recent_next + k) % self.codebook_size)
        self.recent_filled.copy_(torch.clamp(self.recent_filled + k, max=self.codebook_size))

    def stats(self) -> CodebookStats:
        """Codes used and perplexity of the assignments recorded since the last :meth:`reset_usage`."""
        return codebook_stats(self.usage)

    def reset_usage(self) -> None:
        self.usage.zero_()

    @torch.no_grad()
    def restart_dead_codes(self) -> int:
        """Replace every code unused since the last :meth:`reset_usage` by a random recent encoder output.

        Returns the number of codes restarted (0 if none were dead or nothing was recorded yet).
        Draws from torch's global RNG, so a resumed run repeats the same choices.
        """
        dead = (self.usage == 0).nonzero().flatten()
        n_recent = int(self.recent_filled)
        if len(dead) == 0 or n_recent == 0 or float(self.usage.sum()) == 0:
            return 0
        pick = torch.randint(0, n_recent, (len(dead),), device=self.recent.device)
        self.embedding.weight.data[dead] = self.recent[pick].to(self.embedding.weight)
        return len(dead)


# --------------------------------------------------------------------------------------------------
# The paired VQ-AE
# --------------------------------------------------------------------------------------------------


class VQAEOutput(NamedTuple):
    """``logits``: (B, 4, *shape); ``codebook_loss``: scalar; ``tokens``: (B, *grid) long."""

    logits: torch.Tensor
    codebook_loss: torch.Tensor
    tokens: torch.Tensor


class PairedVQAE(nn.Module):
    """MONAI ``AutoEncoder`` (2 → 4 channels) with a :class:`VectorQuantizer` at its bottleneck.

    ``codebook_size``: number of tokens K; ``downsampling``: volume voxels per token along each axis.
    """

    def __init__(self, cfg: VQAEConfig) -> None:
        super().__init__()
        if cfg.embed_dim != cfg.channels[-1]:
            raise ValueError(
                f"embed_dim {cfg.embed_dim} must equal the last channel count {cfg.channels[-1]}"
            )
        self.cfg = cfg
        self.spatial_dims = cfg.spatial_dims
        self.codebook_size = cfg.codebook_size
        self.downsampling = math.prod(cfg.strides)
        self.autoencoder = AutoEncoder(
            spatial_dims=cfg.spatial_dims,
            in_channels=2,
            out_channels=4,
            channels=cfg.channels,
            strides=cfg.strides,
            norm=NORMS[cfg.norm],
        )
        self.quantiser = VectorQuantizer(cfg.codebook_size, cfg.embed_dim, cfg.beta, cfg.legacy_beta)

    def grid_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Volume shape (H, W, D) → token grid (h, w, d); every axis must divide by ``downsampling``."""
        if len(shape) != self.spatial_dims or any(s % self.downsampling for s in shape):
            raise ValueError(
                f"volume shape {tuple(shape)} must have {self.spatial_dims} axes, each divisible by "
                f"{self.downsampling} (the product of the VQ-AE strides)"
            )
        return tuple(s // self.downsampling for s in shape)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != 2:
            raise ValueError(
                f"expected x of shape (B, 2, *spatial) with {self.spatial_dims} axes, got {tuple(x.shape)}"
            )
        self.grid_shape(tuple(x.shape[2:]))

    def forward(self, x: torch.Tensor) -> VQAEOutput:
        """``x``: (B, 2, *shape) float → logits, codebook loss and tokens (gradients flow straight through)."""
        self._check_input(x)
        z_e = self.autoencoder.encode(x if x.is_floating_point() else x.float())
        q = self.quantiser(z_e)
        logits = self.autoencoder.decode(q.z_q)
        return VQAEOutput(logits, q.loss, q.indices)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, 2, H, W, D) float in [0, 1] → tokens (B, h, w, d) long, on ``x``'s device."""
        self._check_input(x)
        z_e = self.autoencoder.encode(x if x.is_floating_point() else x.float())
        z_flat = z_e.float().movedim(1, -1).reshape(-1, z_e.shape[1])
        return self.quantiser.nearest(z_flat).view(z_e.shape[0], *z_e.shape[2:])

    def decode_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: (B, h, w, d) long → logits (B, 4, H, W, D)."""
        if tokens.ndim != self.spatial_dims + 1:
            raise ValueError(
                f"expected tokens of shape (B, *grid) with {self.spatial_dims} axes, got {tuple(tokens.shape)}"
            )
        if tokens.min() < 0 or tokens.max() >= self.codebook_size:
            raise ValueError(
                f"tokens must lie in [0, {self.codebook_size}); got [{int(tokens.min())}, {int(tokens.max())}]"
            )
        return self.autoencoder.decode(self.quantiser.lookup(tokens.long()))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: (B, h, w, d) long → vessel probabilities (B, 2, H, W, D) float32, channels (fixed, moving)."""
        return vessel_probabilities(self.decode_logits(tokens))


def vessel_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(B, 4, *shape) logits of two 2-class heads → (B, 2, *shape) P(vessel) of fixed and moving, fp32."""
    logits = logits.float()
    # p_vessel = softmax over (background, vessel) of each head, second entry
    p_fixed = logits[:, 0:2].softmax(1)[:, 1]
    p_moving = logits[:, 2:4].softmax(1)[:, 1]
    return torch.stack((p_fixed, p_moving), 1)


def build_vqae(cfg: VQAEConfig) -> PairedVQAE:
    """A freshly initialised :class:`PairedVQAE` for a profile's ``vqae`` config."""
    return PairedVQAE(cfg)


class Tokens(NamedTuple):
    """Token grids of the training pairs. ``tokens``: (N, h, w, d) long; ``grid``: (h, w, d)."""

    tokens: torch.Tensor
    cases: list[str]
    grid: tuple[int, ...]
    codebook_size: int


# --------------------------------------------------------------------------------------------------
# How a token set uses its codebook
# --------------------------------------------------------------------------------------------------


def codebook_usage(tokens: Tokens, name: str) -> dict[str, Any]:
    """One table row on how a token set uses its codebook: pooled over all grids (codes used, their share
    of the codebook, perplexity and its log2 — the entropy of the pooled code histogram in bits), the
    range of codes, and the means over single grids."""
    pooled = token_stats(tokens.tokens, tokens.codebook_size)
    per_grid = [token_stats(t, tokens.codebook_size) for t in tokens.tokens]
    return {
        "tokens": name,
        "grids": len(tokens.tokens),
        "grid": tuple(tokens.grid),
        "codebook K": tokens.codebook_size,
        "codes used": pooled.used,
        "share used (%)": 100.0 * pooled.used / tokens.codebook_size,
        "perplexity": pooled.perplexity,
        "entropy (bits)": math.log2(pooled.perplexity),
        "lowest code": int(tokens.tokens.min()),
        "highest code": int(tokens.tokens.max()),
        "codes used per grid (mean)": sum(s.used for s in per_grid) / len(per_grid),
        "perplexity per grid (mean)": sum(s.perplexity for s in per_grid) / len(per_grid),
    }


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def sample_patches(volumes: torch.Tensor, batch_size: int, patch_size: int) -> torch.Tensor:
    """Random cubes of the same place in fixed and moving: ``volumes`` (N, 2, *shape) → (B, 2, p, …, p).

    Each sample picks a pair and a corner uniformly (torch's global RNG); ``p`` is clipped to each axis.
    Returns the dtype of ``volumes``, on its device.
    """
    n, shape = volumes.shape[0], volumes.shape[2:]
    size = [min(patch_size, s) for s in shape]
    idx = torch.randint(0, n, (batch_size,))
    out = []
    for i in idx.tolist():
        corner = [int(torch.randint(0, s - p + 1, (1,))) for s, p in zip(shape, size)]
        region = tuple(slice(c, c + p) for c, p in zip(corner, size))
        out.append(volumes[(i, slice(None), *region)])
    return torch.stack(out)


def random_affine(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Resample ``x`` (B, C, *shape) with a random affine map per sample, nearest neighbour, zero padding.

    The map is ``A = [I | 0] + ε`` with ε ~ N(0, σ²) on every entry of the d×(d+1) matrix (normalised
    coordinates, as the seed). The noise is drawn on the CPU (global RNG), so CPU and GPU runs agree.
    """
    b, d = x.shape[0], x.ndim - 2
    # A = [I | 0] + σ·N(0, 1)
    theta = torch.eye(d, d + 1).unsqueeze(0) + sigma * torch.randn(b, d, d + 1)
    grid = F.affine_grid(theta.to(x.device, torch.float32), list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)


def paired_cross_entropy(
    logits: torch.Tensor, x: torch.Tensor, class_weights: torch.Tensor, global_batch: int | None = None
) -> torch.Tensor:
    """½·CE(fixed) + ½·CE(moving) with class weights; ``logits`` (B, 4, *s), ``x`` (B, 2, *s) in {0, 1}.

    Each CE is the weighted mean Σ w_y·CE / Σ w_y. Under torchrun, with ``global_batch``, the denominator
    is the whole batch's (:func:`regdiff_core.distributed.global_denominator`), so that the ranks' gradients
    add up to the full batch's.
    """
    target = (x > 0.5).long()
    terms = []
    for head, y in ((logits[:, 0:2], target[:, 0]), (logits[:, 2:4], target[:, 1])):
        # CE_w = Σ_i w_{y_i} CE_i / Σ_i w_{y_i}
        total = F.cross_entropy(head.float(), y, weight=class_weights, reduction="sum")
        norm = class_weights[y].sum()
        if global_batch is not None:
            norm = distributed.global_denominator(norm, len(x), global_batch)
        terms.append(total / norm)
    # L = ½ CE(logits[:, 0:2], x_fixed) + ½ CE(logits[:, 2:4], x_moving)
    return 0.5 * terms[0] + 0.5 * terms[1]


class MotionKept(NamedTuple):
    """How much of the breathing motion between fixed and moving a reconstruction keeps (per pair, (N,)).

    ``pair_inputs`` / ``pair_recon``: Dice(fixed, moving) of the inputs and of the thresholded
    reconstructions — higher for the reconstructions means they look more alike than the scans do.
    ``contrast_inputs`` = 1 − ``pair_inputs`` and ``contrast_recon`` = ½[Dice(f̂, f) − Dice(f̂, m)] +
    ½[Dice(m̂, m) − Dice(m̂, f)]: how much more each reconstructed volume looks like its own input than
    like the other scan of the pair. A perfect copy scores ``contrast_inputs``; a VQ-AE that decodes the
    same average for both scans scores 0. ``kept`` = the ratio of the two means.
    """

    pair_inputs: torch.Tensor
    pair_recon: torch.Tensor
    contrast_inputs: torch.Tensor
    contrast_recon: torch.Tensor

    @property
    def kept(self) -> float:
        return float(self.contrast_recon.mean() / self.contrast_inputs.mean().clamp(min=1e-12))


def motion_kept(x: torch.Tensor, probs: torch.Tensor, threshold: float = 0.5) -> MotionKept:
    """``x``: (N, 2, *shape) input masks (fixed, moving); ``probs``: (N, 2, *shape) decoded P(vessel)."""
    dims = tuple(range(1, x.ndim - 1))
    f, m = x[:, 0].bool(), x[:, 1].bool()
    f_hat, m_hat = probs[:, 0] > threshold, probs[:, 1] > threshold
    pair_in, pair_rec = dice(f, m, dims).float(), dice(f_hat, m_hat, dims).float()
    # ½[Dice(f̂, f) − Dice(f̂, m)] + ½[Dice(m̂, m) − Dice(m̂, f)]
    contrast = 0.5 * (dice(f_hat, f, dims).float() - dice(f_hat, m, dims).float()) + 0.5 * (
        dice(m_hat, m, dims).float() - dice(m_hat, f, dims).float()
    )
    return MotionKept(pair_in, pair_rec, 1 - pair_in, contrast)


class VQAEStep(NamedTuple):
    """What one :func:`train_step` computed: the optimized ``loss``, its ``ce`` part, the network's output."""

    loss: torch.Tensor
    ce: torch.Tensor
    out: VQAEOutput


def train_step(
    net: torch.nn.Module,
    x: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: VQAEConfig,
    class_weights: torch.Tensor,
    amp: bool,
    amp_dtype: torch.dtype = torch.float16,
) -> VQAEStep:
    """One optimization step on a batch of patches ``x`` (B, 2, *patch) in {0, 1}, on ``net``'s device.

    L = ½·CE(fixed) + ½·CE(moving) + ``codebook_weight`` · L_codebook; mixed precision (``amp_dtype``)
    on CUDA when ``amp``. ``cfg.batch_size`` is the global batch (under torchrun ``x`` is this rank's share).
    The scheduler, codebook statistics and logging stay with the caller (:func:`train_vqae`, and
    :mod:`regdiff_core.bench`, which times this very function).
    """
    from regdiff_core.utils import autocast

    optimizer.zero_grad(set_to_none=True)
    with autocast(x.device, amp, amp_dtype):
        out = net(x)
        ce = paired_cross_entropy(out.logits, x, class_weights, cfg.batch_size)
        # L = ½CE(fixed) + ½CE(moving) + 0.1 · L_codebook
        loss = ce + cfg.codebook_weight * out.codebook_loss
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return VQAEStep(loss, ce, out)


@dataclasses.dataclass
class VQAETrainResult:
    """``history``: one dict per step (loss, ce, codebook_loss, dice, lr; on logging steps also
    codebook_used, perplexity, restarted); ``params``: parameters of the AutoEncoder alone."""

    model: PairedVQAE
    history: list[dict[str, float]]
    seconds: float
    resumed_from: int | None
    params: int
    out_dir: Path | None


def train_vqae(
    model: PairedVQAE,
    volumes: torch.Tensor,
    cfg: VQAEConfig,
    device: torch.device,
    *,
    out_dir: str | Path | None = None,
    iterations: int | None = None,
    stop_after: int | None = None,
    snapshot_at: int | None = None,
    progress: bool = True,
) -> VQAETrainResult:
    """Train ``model`` on random patches of ``volumes`` (N, 2, *shape), {0,1}, kept on the CPU.

    Adam(lr) with CosineAnnealingWarmRestarts(T_0 = ⌈iterations / restart_divisor⌉, T_mult = 2),
    stepped every iteration; fp16 autocast + gradient scaling on CUDA when ``cfg.amp``.
    Every ``cfg.log_every`` steps: codebook usage and perplexity over the window, and (if
    ``cfg.dead_code_restart``) dead codes are re-initialised from recent encoder outputs.
    With ``out_dir``, checkpoints (``checkpoint.pt``) and ``history.csv`` go there and an existing
    checkpoint is resumed. Seed torch before calling for a repeatable run.

    ``stop_after``: end after that many steps of the ``iterations``-step schedule (the same steps as a
    full run up to there). ``snapshot_at`` (with ``out_dir``): also save the model after that step as
    ``model_step<k>.pt`` (:func:`~regdiff_core.store.vqae.snapshot_path`); saving changes nothing in the
    run.
    """
    from regdiff_core.store.vqae import save_vqae, snapshot_path
    from regdiff_core.training import train_loop
    from regdiff_core.utils import count_parameters

    iterations = cfg.iterations if iterations is None else iterations
    n_steps = iterations if stop_after is None else min(stop_after, iterations)
    out_dir = Path(out_dir) if out_dir is not None else None
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # T_0 = ⌈iterations / 7⌉ (the seed's iterations // 7 when that divides): with T_mult = 2 the cycles
    # of T_0, 2·T_0 and 4·T_0 steps end at or just after the last step, not just before it
    t_0 = max(1, math.ceil(iterations / cfg.restart_divisor))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=t_0, T_mult=2)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    class_weights = torch.tensor(cfg.class_weights, dtype=torch.float32, device=device)
    batch = distributed.rank_batch(cfg.batch_size, "vqae.batch_size")  # torchrun: this rank's share
    net = distributed.wrap(model, cfg.batch_size)  # torchrun: in DDP; one process: the model itself

    def step_fn(step: int) -> dict[str, float]:
        x = sample_patches(volumes, batch, cfg.patch_size)
        with torch.no_grad():
            x = random_affine(x.to(device), cfg.affine_sigma)
        loss, ce, out = train_step(net, x, optimizer, scaler, cfg, class_weights, use_amp)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        with torch.no_grad():
            pred = torch.stack((out.logits[:, 0:2].argmax(1), out.logits[:, 2:4].argmax(1)), 1)
            d = dice(pred, x > 0.5, dims=(0, *range(2, x.ndim))).float()  # per channel over the batch
        # tensors, left on the device: training.train_loop reads them when it logs
        row = {
            "loss": loss.detach(),
            "ce": ce.detach(),
            "codebook_loss": out.codebook_loss.detach(),
            "dice": d.mean(),
            "lr": lr,
        }
        if step % cfg.log_every == 0 or step == iterations:
            stats = model.quantiser.stats()
            row["codebook_used"], row["perplexity"] = stats.used, stats.perplexity
            row["restarted"] = model.quantiser.restart_dead_codes() if cfg.dead_code_restart else 0
            distributed.broadcast_(model.quantiser.embedding.weight.data)  # rank 0's restarts for all
            model.quantiser.reset_usage()
        if step == snapshot_at and out_dir is not None:
            save_vqae(model, snapshot_path(out_dir, step))
        return row

    result = train_loop(
        step_fn,
        {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler},
        n_steps,
        ckpt_path=out_dir / CHECKPOINT_FILE if out_dir else None,
        ckpt_every=cfg.ckpt_every,
        log_every=cfg.log_every,
        history_csv=out_dir / "history.csv" if out_dir else None,
        desc="vqae",
        progress=progress,
        stage="vqae",
        settings=dataclasses.asdict(cfg),
        inputs=volumes if out_dir else None,  # other pairs or settings: the checkpoint is set aside
    )
    model.eval()
    return VQAETrainResult(
        model,
        result.history,
        result.seconds,
        result.resumed_from,
        count_parameters(model.autoencoder),
        out_dir,
    )


# --------------------------------------------------------------------------------------------------
# Whole volumes: encode, reconstruct, judge
# --------------------------------------------------------------------------------------------------


def _batches(volumes: torch.Tensor, batch_size: int):
    for start in range(0, volumes.shape[0], batch_size):
        yield volumes[start : start + batch_size]


@torch.no_grad()
def encode_volumes(
    model: PairedVQAE, volumes: torch.Tensor, device: torch.device, batch_size: int = 2, amp: bool = True
) -> torch.Tensor:
    """(N, 2, *shape) volumes (any device/dtype) → (N, *grid) long tokens on the CPU, ``batch_size`` at a time."""
    from regdiff_core.utils import autocast

    model = model.to(device).eval()
    out = []
    for x in _batches(volumes, batch_size):
        with autocast(device, amp):
            out.append(model.encode(x.to(device).float()).cpu())
    return torch.cat(out)


@torch.no_grad()
def decode_tokens(
    model: PairedVQAE, tokens: torch.Tensor, device: torch.device, batch_size: int = 2, amp: bool = True
) -> torch.Tensor:
    """(N, *grid) tokens → (N, 2, *shape) vessel probabilities, float32 on the CPU."""
    from regdiff_core.utils import autocast

    model = model.to(device).eval()
    out = []
    for t in _batches(tokens, batch_size):
        with autocast(device, amp):
            out.append(vessel_probabilities(model.decode_logits(t.to(device))).cpu())
    return torch.cat(out)


class Reconstruction(NamedTuple):
    """``tokens``: (N, *grid); ``probs``: (N, 2, *shape) P(vessel); ``dice``: (N, 2) of fixed and moving
    at threshold 0.5 against the inputs."""

    tokens: torch.Tensor
    probs: torch.Tensor
    dice: torch.Tensor


def reconstruct(
    model: PairedVQAE, volumes: torch.Tensor, device: torch.device, batch_size: int = 2, amp: bool = True
) -> Reconstruction:
    """Encode and decode whole volumes (N, 2, *shape) and score the reconstructions by Dice."""
    tokens = encode_volumes(model, volumes, device, batch_size, amp)
    probs = decode_tokens(model, tokens, device, batch_size, amp)
    spatial = tuple(range(2, volumes.ndim))
    return Reconstruction(tokens, probs, dice(probs > 0.5, volumes > 0.5, dims=spatial).float())


class Baselines(NamedTuple):
    """Dice (N, 2) of two reconstructions that need no training.

    ``all_vessel``: every voxel called vessel, the best constant guess (all background scores 0);
    ``pooled``: each channel averaged over the token cells (``downsampling``³ voxels) and upsampled
    back by nearest neighbour, threshold 0.5 — the token grid's resolution with a *continuous* value
    per cell and channel instead of one shared discrete code.
    """

    all_vessel: torch.Tensor
    pooled: torch.Tensor


def baseline_dice(volumes: torch.Tensor, downsampling: int) -> Baselines:
    """Dice of the :class:`Baselines` for volumes (N, 2, *shape) in {0, 1}."""
    x = volumes.float()
    spatial = tuple(range(2, x.ndim))
    pool = F.avg_pool3d if x.ndim == 5 else F.avg_pool2d
    pooled = F.interpolate(pool(x, downsampling), scale_factor=downsampling, mode="nearest")
    return Baselines(
        all_vessel=dice(torch.ones_like(x, dtype=torch.bool), x > 0.5, dims=spatial).float(),
        pooled=dice(pooled > 0.5, x > 0.5, dims=spatial).float(),
    )
