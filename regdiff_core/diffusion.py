"""Chapter 3: absorbing (masked) discrete diffusion over VQ-AE token grids.

A paired volume is, after chapter 2, a grid of ``h×w×d`` codebook indices (paper: 16×13×16 = 3328
tokens, codebook ``K`` = 1024). Absorbing diffusion corrupts such a grid ``x_0`` by replacing each token
with a special *mask* token (id ``K``) with probability ``t``; at ``t = 1`` everything is masked. A
bidirectional transformer, the *denoiser*, learns ``p(x_0 | x_t)``; sampling starts from an all-masked
grid and unmasks it a few tokens at a time, each new token drawn from the denoiser's prediction.

What is here:

- :class:`Denoiser` — token embedding (``K + 1`` ids: the codebook and the mask), a learned position
  embedding over the ``N = h·w·d`` grid positions, ``nn.TransformerEncoder`` layers (paper: 12 layers,
  width 512, 16 heads, feed-forward 1024, GELU), a final LayerNorm and a linear head to ``K`` logits;
  init N(0, 0.02) as the seed. Paper size: 27,987,456 parameters (28.0 M). Attention runs through
  PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).
- :func:`sample_t`, :func:`q_sample`, :func:`weighted_elbo_loss` — the training objective: t ~ U{1..T}/T,
  mask with probability t, cross-entropy on the masked tokens only, weighted by (1 − t), in bits per token.
- :func:`train_denoiser` — training through the shared :func:`regdiff_core.training.train_loop`
  (resume, NaN guard, atomic checkpoints), with linear warm-up and optional EMA of the weights.
- :func:`augment_pairs` — the augmented training pairs: where the profile asks for it (not in the paper),
  each training pair mirrored left–right and shifted by half a token, encoded into extra training grids.
  Ten pairs are too few for a transformer: it memorises them (chapter 3 measures it).
- :func:`sample_tokens` — the sampler: all masked; at step i each still-masked token is unmasked with
  probability 1/(S − i), so any number of steps S ≥ 1 unmasks every token; the new token is drawn from
  the temperature-scaled categorical in float64 with a ``torch.Generator``; steps that unmask nothing
  skip the network call.
- :func:`fill_in`, :func:`evaluate_loss` — one-shot predictions and a held-out loss, for the chapter.
- :func:`split_tokens` — a token set cut into a training and a held-out set (the paper's own 97 grids).
- :func:`train_step` — one optimization step (what :mod:`regdiff_core.bench` times for ``make gpu-check``).

The files — ``diffusion/model.pt``, the training folders — and the entry points that read and write them
(``train``, ``load_denoiser``, ``training_tokens``, ``train_tracked``, ``compare_variants``,
``paper_tokens``) are in :mod:`regdiff_core.store.diffusion`.

Differences from the authors' code (the seed, ``unleashing_utils.py``) and why: one list, on the
book's profiles page (``book/profiles.md``; ``SEED_DIFFERENCES`` in ``book/_tools/bookpages.py``).
``paper`` sets the seed's ``dropout`` and ``loss_norm``; the other profiles use the alternatives.

Not a difference: ``nn.TransformerEncoder`` deep-copies one layer, so all layers would start identical;
the denoiser builds each layer separately, as the seed's ``nn.Sequential`` of fresh layers does.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from regdiff_core import distributed
from regdiff_core.config import DiffusionConfig, Profile
from regdiff_core.training import CHECKPOINT_FILE, train_loop
from regdiff_core.utils import autocast, count_parameters

#: Grids of the paper's 97 kept aside by :func:`~regdiff_core.store.diffusion.paper_tokens` (the last ones
#: in the file).
PAPER_HELDOUT = 10

#: The variants chapter 3 can compare (``DiffusionConfig.ablation_variants`` picks them): name → overrides.
#: "baseline" is the profile's own setting (paper: post-norm, dropout 0.1 as the seed, no EMA; colab: dropout 0).
ABLATIONS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "pre-norm": {"pre_norm": True},
    "dropout 0.1 (seed)": {"dropout": 0.1},
}


# --------------------------------------------------------------------------------------------------
# The denoiser
# --------------------------------------------------------------------------------------------------


class Denoiser(nn.Module):
    """Bidirectional transformer ``p(x_0 | x_t)`` over a flattened token grid.

    ``forward(x_t)``: ``x_t`` (B, N) long in ``[0, K]`` (``K`` = mask id) → logits (B, N, K) float32.
    """

    def __init__(self, codebook_size: int, grid: tuple[int, ...], cfg: DiffusionConfig) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.grid = tuple(int(g) for g in grid)
        self.n_tokens = n_tokens = math.prod(self.grid)
        self.cfg = cfg
        self.token_embedding = nn.Embedding(codebook_size + 1, cfg.width)
        self.position_embedding = nn.Embedding(n_tokens, cfg.width)

        def layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(
                cfg.width, cfg.n_heads, dim_feedforward=cfg.ff, dropout=cfg.dropout, activation="gelu",
                batch_first=True, norm_first=cfg.pre_norm,
            )  # fmt: skip

        self.transformer = nn.TransformerEncoder(layer(), cfg.n_layers, enable_nested_tensor=False)
        # TransformerEncoder deep-copies one layer (identical initial weights); build each one afresh
        self.transformer.layers = nn.ModuleList(layer() for _ in range(cfg.n_layers))
        self.layer_norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, codebook_size, bias=False)
        for weight in (self.token_embedding.weight, self.position_embedding.weight, self.head.weight):
            nn.init.normal_(weight, mean=0.0, std=0.02)

    @property
    def mask_id(self) -> int:
        """The absorbing state's id: one past the last codebook index."""
        return self.codebook_size

    def forward(self, x_t: torch.Tensor) -> torch.Tensor:
        h = self.token_embedding(x_t) + self.position_embedding.weight.unsqueeze(0)
        # PyTorch's inference "fast path" for encoder layers materialises the N×N attention on CPU
        # (2–3× slower here); without it every mode runs through scaled_dot_product_attention
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            h = self.layer_norm(self.transformer(h))
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        # the head in float32 even under autocast: the categorical must not be drawn from fp16 logits
        if h.device.type == "meta":  # shape checks (tests): autocast has no meta device
            return self.head(h.float())
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.head(h.float())


def token_grid(profile: Profile) -> tuple[int, int, int]:
    """Token grid (h, w, d) of the profile: the volume shape divided by the VQ-AE's total stride."""
    factor = math.prod(profile.vqae.strides)
    shape = profile.data.shape
    if any(s % factor for s in shape):
        raise ValueError(f"data.shape {shape} is not divisible by the VQ-AE's total stride {factor}")
    return tuple(s // factor for s in shape)  # type: ignore[return-value]


def architecture_row(profile: Profile) -> dict[str, Any]:
    """One table row describing the profile's denoiser, with its parameter count in millions."""
    cfg, grid = profile.diffusion, token_grid(profile)
    params = count_parameters(build_denoiser(cfg, profile.vqae.codebook_size, grid))
    return {
        "profile": profile.name, "layers": cfg.n_layers, "width": cfg.width, "heads": cfg.n_heads,
        "feed-forward": cfg.ff, "dropout": cfg.dropout, "pre-norm": cfg.pre_norm, "tokens N": math.prod(grid),
        "codebook K": profile.vqae.codebook_size, "parameters (M)": round(params / 1e6, 2),
    }  # fmt: skip


def build_denoiser(cfg: DiffusionConfig, codebook_size: int, grid: tuple[int, ...]) -> Denoiser:
    """A freshly initialised :class:`Denoiser` for a codebook of ``codebook_size`` and a token ``grid``."""
    return Denoiser(codebook_size, grid, cfg)


# --------------------------------------------------------------------------------------------------
# The forward (masking) process and the loss
# --------------------------------------------------------------------------------------------------


class MaskedTokens(NamedTuple):
    """``x_t`` (B, N) long: ``x_0`` with masked positions set to the mask id; ``mask`` (B, N) bool."""

    x_t: torch.Tensor
    mask: torch.Tensor


class DiffusionLoss(NamedTuple):
    """Scalars (0-d tensors). ``loss``: reweighted ELBO, bits/token (what is optimized);
    ``elbo``: the unweighted variational bound term CE/t, bits/token (an estimate of −log p per token);
    ``accuracy``: fraction of masked tokens whose argmax prediction is right."""

    loss: torch.Tensor
    elbo: torch.Tensor
    accuracy: torch.Tensor


def sample_t(batch_size: int, T: int, *, device: torch.device | str = "cpu", generator=None) -> torch.Tensor:
    """Diffusion times ``t`` (B,) float, uniform on {1/T, 2/T, …, 1}."""
    # t ~ U{1, …, T} / T
    steps = torch.randint(
        1, T + 1, (batch_size,), generator=generator, device=generator.device if generator else device
    )
    return (steps.float() / T).to(device)


def q_sample(x_0: torch.Tensor, t: torch.Tensor, mask_id: int, *, generator=None) -> MaskedTokens:
    """Absorbing forward process ``q(x_t | x_0)``: each token independently becomes ``mask_id`` w.p. ``t``.

    ``x_0`` (B, N) long; ``t`` (B,) float in (0, 1].
    """
    u = torch.rand(x_0.shape, generator=generator, device=generator.device if generator else x_0.device)
    # m_n ~ Bernoulli(t)
    mask = u.to(x_0.device) < t.to(x_0.device).unsqueeze(-1)
    x_t = torch.where(mask, torch.full_like(x_0, mask_id), x_0)
    return MaskedTokens(x_t=x_t, mask=mask)


#: How :func:`weighted_elbo_loss` scales the summed cross-entropy (``DiffusionConfig.loss_norm``).
LOSS_NORMS = ("per-token", "seed")


def weighted_elbo_loss(
    logits: torch.Tensor, x_0: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, *, norm: str = "per-token"
) -> DiffusionLoss:
    """The seed's reweighted ELBO, and the plain ELBO term in bits per token for reporting.

    ``logits`` (B, N, K); ``x_0`` (B, N) long; ``mask`` (B, N) bool (True = masked); ``t`` (B,).
    Unmasked positions contribute nothing (the denoiser sees them; predicting them is trivial).
    ``norm``: ``"per-token"`` divides by ``ln 2 · N`` (``loss`` in bits per token); ``"seed"`` by
    ``ln 2 · K · N`` as the seed does (``loss`` K times smaller; ``elbo`` stays in bits per token).
    """
    if norm not in LOSS_NORMS:
        raise ValueError(f"loss norm {norm!r}: choose one of {LOSS_NORMS}")
    B, N, K = logits.shape
    ce = F.cross_entropy(logits.float().reshape(B * N, -1), x_0.reshape(-1), reduction="none").view(B, N)
    # CE_b = Σ_{n masked} −log p(x_0,n | x_t)   (nats)
    ce_sum = (ce * mask).sum(dim=1)
    # L = mean_b (1 − t_b) · CE_b / (ln 2 · N)        ("per-token")
    # L = mean_b (1 − t_b) · CE_b / (ln 2 · K · N)    ("seed")
    scale = math.log(2) * N * (K if norm == "seed" else 1)
    loss = ((1.0 - t) * ce_sum / scale).mean()
    # L_vb = mean_b CE_b / t_b / (ln 2 · N): the ELBO term, unbiased over t ~ U{1..T}/T
    elbo = (ce_sum / t / (math.log(2) * N)).mean()
    hits = ((logits.argmax(-1) == x_0) & mask).sum()
    accuracy = hits / mask.sum().clamp(min=1)
    return DiffusionLoss(loss=loss, elbo=elbo.detach(), accuracy=accuracy.detach().float())


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


class _Warmup:
    """lr factor min(1, s / warmup) at optimizer step s = 1, 2, … (a class, so LambdaLR can pickle it)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = max(int(warmup), 1)

    def __call__(self, epoch: int) -> float:
        # LambdaLR calls with 0 before the first step, so step s uses epoch = s − 1
        return min(1.0, (epoch + 1) / self.warmup)


#: Half-token shifts of :func:`augment_pairs`, as which axes (H, W, D) move, per ``augment_shift``.
SHIFT_SETS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "none": ((0, 0, 0),),
    "diagonal": ((0, 0, 0), (1, 1, 1)),
    "axes": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "all": tuple((a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)),
}


def shift_volumes(x: torch.Tensor, offset: tuple[int, ...]) -> torch.Tensor:
    """Shift (N, C, *S) volumes by ``offset`` voxels along the spatial axes, filling with zeros."""
    out = torch.zeros_like(x)
    src, dst = [slice(None), slice(None)], [slice(None), slice(None)]
    for size, o in zip(x.shape[2:], offset):
        if abs(o) >= size:
            return out
        src.append(slice(0, size - o) if o >= 0 else slice(-o, None))
        dst.append(slice(o, None) if o >= 0 else slice(0, size + o))
    out[tuple(dst)] = x[tuple(src)]
    return out


def augment_versions(flip: bool, shift: str) -> list[tuple[bool, tuple[int, int, int], str]]:
    """The versions :func:`augment_pairs` makes of every pair, in its order: (mirrored, shifted axes, tag),
    the original first with tag ``""``, then e.g. ``"shift-101"``, ``"flip"``, ``"flip:shift-111"``."""
    if shift not in SHIFT_SETS:
        raise ValueError(f"augment_shift {shift!r}: choose one of {sorted(SHIFT_SETS)}")
    versions = []
    for mirrored in (False, True) if flip else (False,):
        for axes in SHIFT_SETS[shift]:
            parts = (["flip"] if mirrored else []) + (
                [f"shift-{''.join(map(str, axes))}"] if any(axes) else []
            )
            versions.append((mirrored, axes, ":".join(parts)))
    return versions


def augment_pairs(volumes: torch.Tensor, downsampling: int, *, flip: bool, shift: str) -> torch.Tensor:
    """The training pairs (N, 2, H, W, D) and their augmented copies, for encoding into extra token grids.

    Every pair appears once per (mirror, shift) combination, the original first: mirrored left–right
    (axis H, the axis that separates the two lungs) with ``flip``, and shifted by half a token
    (``downsampling // 2`` voxels) along the axes of each entry of :data:`SHIFT_SETS` ``[shift]``. Both
    volumes of a pair move together, so the breathing motion between them is kept. Why it helps: a
    whole-token shift only moves the grid, but a half-token shift puts the token boundaries elsewhere in
    the anatomy, so the VQ-AE describes the same vessels with other codes, and the denoiser cannot
    simply memorise the few training grids (chapter 3 measures it on held-out grids).
    """
    half = downsampling // 2
    out = []
    for mirrored, axes, _ in augment_versions(flip, shift):
        x = volumes.flip(2) if mirrored else volumes
        out.append(shift_volumes(x, tuple(half * a for a in axes)) if any(axes) else x)
    return torch.cat(out)


def train_step(
    net: torch.nn.Module,
    x_0: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: DiffusionConfig,
    mask_id: int,
    amp: bool,
) -> DiffusionLoss:
    """One optimization step on a batch of token sequences ``x_0`` (B, N): draw t, mask, predict, and
    step on the weighted ELBO (:func:`weighted_elbo_loss`). The scheduler and EMA stay with the caller
    (:func:`train_denoiser`, and :mod:`regdiff_core.bench`, which times this very function)."""
    t = sample_t(len(x_0), cfg.T, device=x_0.device)
    x_t, mask = q_sample(x_0, t, mask_id)
    with autocast(x_0.device, amp):
        logits = net(x_t)
    out = weighted_elbo_loss(logits, x_0, mask, t, norm=cfg.loss_norm)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out.loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return out


class DiffusionRun(NamedTuple):
    """What :func:`train_denoiser` returns. ``denoiser`` is in eval mode; ``ema`` the EMA copy or None;
    ``model_path`` the model file :func:`regdiff_core.store.diffusion.train` wrote (None before)."""

    denoiser: Denoiser
    ema: Denoiser | None
    history: list[dict[str, float]]
    seconds: float
    params: int
    model_path: Path | None


def _tokens_as_sequences(tokens) -> tuple[torch.Tensor, int, tuple[int, ...]]:
    """``Tokens`` NamedTuple (or a dict / a tensor) → (N_grids, N) long, codebook size, grid."""
    if isinstance(tokens, torch.Tensor):
        raise TypeError("pass a Tokens record (tokens, cases, grid, codebook_size), not a bare tensor")
    grid = tuple(int(g) for g in tokens.grid)
    x = tokens.tokens.reshape(len(tokens.tokens), -1).long()
    return x, int(tokens.codebook_size), grid


def train_denoiser(
    tokens,
    cfg: DiffusionConfig,
    device: torch.device,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> DiffusionRun:
    """Train a denoiser of ``cfg`` on the grids of ``tokens`` (a :class:`~regdiff_core.vqae.Tokens`).

    With ``out_dir``, the resumable checkpoint (``checkpoint.pt``) and ``history.csv`` go there and an
    existing checkpoint is resumed: if it is finished, nothing is retrained. The model file is written by
    the entry point, :func:`regdiff_core.store.diffusion.train` (``model_path`` is None here).
    History columns: ``loss`` (the optimized value: bits/token, or bits/token / K with
    ``loss_norm="seed"``), ``elbo`` (bits/token), ``accuracy`` (masked tokens), ``lr``.
    """
    out_dir = Path(out_dir) if out_dir is not None else None
    x_all, codebook_size, grid = _tokens_as_sequences(tokens)
    x_all = x_all.to(device)
    denoiser = build_denoiser(cfg, codebook_size, grid).to(device)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _Warmup(cfg.warmup))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state: dict[str, Any] = {
        "model": denoiser,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
    }
    ema = None
    if cfg.ema is not None:
        ema = torch.optim.swa_utils.AveragedModel(
            denoiser, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema)
        )
        state["ema"] = ema
    n_grids = len(x_all)
    batch = distributed.rank_batch(cfg.batch_size, "diffusion.batch_size")  # torchrun: this rank's share
    net = distributed.wrap(denoiser, cfg.batch_size)  # torchrun: in DDP; one process: the denoiser itself

    def step_fn(step: int) -> dict[str, Any]:
        denoiser.train()
        # a batch of distinct grids when there are enough (the seed's randperm), else with replacement
        if n_grids >= batch:
            idx = torch.randperm(n_grids)[:batch]
        else:
            idx = torch.randint(0, n_grids, (batch,))
        x_0 = x_all[idx.to(device)]
        out = train_step(net, x_0, optimizer, scaler, cfg, denoiser.mask_id, use_amp)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if ema is not None:
            ema.update_parameters(denoiser)
        return {"loss": out.loss.detach(), "elbo": out.elbo, "accuracy": out.accuracy, "lr": lr}

    result = train_loop(
        step_fn, state, cfg.iterations, ckpt_path=out_dir / CHECKPOINT_FILE if out_dir else None,
        ckpt_every=cfg.ckpt_every, log_every=cfg.log_every,
        history_csv=out_dir / "history.csv" if out_dir else None, desc="diffusion", progress=progress,
        stage="diffusion", settings=dataclasses.asdict(cfg),
        inputs=x_all,  # other tokens or settings (a retrained VQ-AE): the checkpoint is set aside
    )  # fmt: skip
    denoiser.eval()
    ema_net = ema.module.eval() if ema is not None else None
    return DiffusionRun(
        denoiser=denoiser, ema=ema_net, history=result.history, seconds=result.seconds,
        params=count_parameters(denoiser), model_path=None,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Evaluation helpers for the chapter
# --------------------------------------------------------------------------------------------------


class FillIn(NamedTuple):
    """One-shot reconstruction of a partly masked grid. Tensors (B, N); ``accuracy`` over masked tokens."""

    x_t: torch.Tensor
    mask: torch.Tensor
    x_hat: torch.Tensor
    accuracy: float


@torch.no_grad()
def fill_in(denoiser: Denoiser, x_0: torch.Tensor, mask_ratio: float, *, generator=None) -> FillIn:
    """Mask exactly ``round(mask_ratio · N)`` random tokens of each grid and predict them (argmax).

    ``x_0`` (B, N) long. Unmasked positions keep their true token in ``x_hat``.
    """
    device = next(denoiser.parameters()).device
    x_0 = x_0.to(device)
    B, N = x_0.shape
    k = int(round(mask_ratio * N))
    gen_device = generator.device if generator is not None else torch.device("cpu")
    order = torch.stack([torch.randperm(N, generator=generator, device=gen_device) for _ in range(B)])
    mask = (order < k).to(device)
    x_t = torch.where(mask, torch.full_like(x_0, denoiser.mask_id), x_0)
    x_hat = torch.where(mask, denoiser(x_t).argmax(-1), x_0)
    accuracy = float(((x_hat == x_0) & mask).sum() / mask.sum().clamp(min=1))
    return FillIn(x_t=x_t, mask=mask, x_hat=x_hat, accuracy=accuracy)


@torch.no_grad()
def evaluate_loss(
    denoiser: Denoiser, x_0: torch.Tensor, T: int, *, levels: int = 4, batch_size: int = 4, generator=None
) -> dict[str, float]:
    """Held-out loss: the training objective averaged over ``levels`` evenly spaced t (midpoint rule).

    ``x_0`` (B, N) long. Returns ``loss`` and ``elbo`` (bits/token) and ``accuracy`` (masked tokens).
    """
    device = next(denoiser.parameters()).device
    was_training = denoiser.training
    denoiser.eval()
    totals = {"loss": 0.0, "elbo": 0.0, "accuracy": 0.0}
    count = 0
    for k in range(levels):
        # t_k = round((k + ½) T / levels) / T, the midpoint of the k-th slice of U{1..T}/T
        t_k = max(1, round((k + 0.5) * T / levels)) / T
        for chunk in x_0.split(batch_size):
            chunk = chunk.to(device)
            t = torch.full((len(chunk),), t_k, device=device)
            x_t, mask = q_sample(chunk, t, denoiser.mask_id, generator=generator)
            out = weighted_elbo_loss(denoiser(x_t), chunk, mask, t)
            for name in totals:
                totals[name] += float(getattr(out, name)) * len(chunk)
            count += len(chunk)
    denoiser.train(was_training)
    return {name: value / count for name, value in totals.items()}


class TrackedRun(NamedTuple):
    """:func:`~regdiff_core.store.diffusion.train_tracked`'s result: the finished ``run`` (its ``seconds``
    summed over the stages) and ``curve``, one row per milestone: ``steps``, then held-out
    ``elbo``/``accuracy`` of the raw weights and, when the run keeps an EMA, ``ema_elbo``/``ema_accuracy``."""

    run: DiffusionRun
    curve: list[dict[str, float]]


class TokenSplit(NamedTuple):
    """A token set cut into ``train`` and ``heldout`` :class:`~regdiff_core.vqae.Tokens`."""

    train: Any
    heldout: Any


def split_tokens(tokens, heldout: int) -> TokenSplit:
    """The last ``heldout`` grids of ``tokens`` held out, the others for training (deterministic)."""
    from regdiff_core.vqae import Tokens

    n = len(tokens.tokens)
    if not 0 <= heldout < n:
        raise ValueError(f"heldout = {heldout}: need 0 ≤ heldout < {n} (the number of grids)")
    cut = n - heldout

    def part(sl: slice) -> Tokens:
        return Tokens(tokens.tokens[sl], list(tokens.cases[sl]), tuple(tokens.grid), tokens.codebook_size)

    return TokenSplit(part(slice(0, cut)), part(slice(cut, n)))


# --------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------


class TokenSamples(NamedTuple):
    """``tokens`` (n, h, w, d) long; ``unmask_step`` (n, h, w, d) long: the step (0 … S−1) at which each
    token was drawn, so the grid after step i is ``tokens`` where ``unmask_step <= i`` and masked elsewhere;
    ``steps``: S; ``network_calls``: denoiser evaluations (steps that unmask nothing are skipped);
    ``seconds``: wall time."""

    tokens: torch.Tensor
    unmask_step: torch.Tensor
    steps: int
    network_calls: int
    seconds: float


def unmask_probability(step: int, steps: int) -> float:
    """The sampler's schedule: at step ``i`` (0-based) a still-masked token is unmasked w.p. 1/(S − i).

    Under it every token is unmasked at a step uniform on {0, …, S−1}: P(step i) =
    Π_{j<i} (1 − 1/(S−j)) · 1/(S−i) = (S−i)/S · 1/(S−i) = 1/S; and at i = S − 1 the probability is 1.
    """
    if not 0 <= step < steps:
        raise ValueError(f"step {step} outside 0 … {steps - 1}")
    return 1.0 / (steps - step)


def _draw_categorical(logits: torch.Tensor, temperature: float, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from softmax(logits / temperature) in float64; ``u`` (M,) uniform on [0, 1)."""
    # p_k = softmax(ℓ_k / τ), computed in float64
    p = torch.softmax(logits.double() / temperature, dim=-1)
    cdf = p.cumsum(-1)
    # k = min{k : F_k > u · F_K}
    k = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return k.clamp_(max=p.shape[-1] - 1)


@torch.no_grad()
def sample_tokens(
    denoiser: Denoiser,
    n: int,
    *,
    steps: int | None = None,
    temperature: float = 0.9,
    batch_size: int = 2,
    generator: torch.Generator | None = None,
    amp: bool = True,
    progress: bool = False,
) -> TokenSamples:
    """Draw ``n`` token grids from the denoiser by iterative unmasking.

    ``steps`` S (default the training T): at step i = 0 … S−1 each still-masked token is unmasked with
    probability 1/(S − i) and replaced by a draw from softmax(logits / ``temperature``). All randomness
    (which tokens, which values) comes from ``generator`` (a CPU generator works for any device: the
    uniforms are drawn on the generator's device and copied), so a seeded generator gives the same grids.
    """
    device = next(denoiser.parameters()).device
    S = int(steps if steps is not None else denoiser.cfg.T)
    if S < 1:
        raise ValueError(f"steps must be >= 1, got {S}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    grid, N = denoiser.grid, denoiser.n_tokens
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    gen_device = generator.device
    K = denoiser.codebook_size
    use_amp = amp and device.type == "cuda"
    was_training = denoiser.training
    denoiser.eval()
    out_tokens, out_steps, calls = [], [], 0
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=n * S, desc="sampling", disable=not progress, mininterval=1.0)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        # x_S: every token absorbed
        x_t = torch.full((b * N,), denoiser.mask_id, dtype=torch.long, device=device)
        masked = torch.ones(b * N, dtype=torch.bool, device=gen_device)
        unmask_step = torch.full((b * N,), -1, dtype=torch.long, device=gen_device)
        for i in range(S):
            u = torch.rand(b * N, generator=generator, device=gen_device)
            # unmask each still-masked token w.p. 1/(S − i)
            change = masked & (u < unmask_probability(i, S))
            where = change.nonzero().squeeze(-1)
            bar.update(b)
            if where.numel() == 0:
                continue  # nothing to unmask at this step: no network call
            with autocast(device, use_amp):
                logits = denoiser(x_t.view(b, N))
            calls += 1
            u_k = torch.rand(where.numel(), generator=generator, device=gen_device)
            where_dev = where.to(device)
            # x_0,n ~ Cat(softmax(ℓ_n / τ)) only at the newly unmasked positions
            x_t[where_dev] = _draw_categorical(logits.view(b * N, K)[where_dev], temperature, u_k.to(device))
            masked &= ~change
            unmask_step[where] = i
        out_tokens.append(x_t.view(b, *grid).cpu())
        out_steps.append(unmask_step.view(b, *grid).cpu())
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    denoiser.train(was_training)
    return TokenSamples(
        tokens=torch.cat(out_tokens), unmask_step=torch.cat(out_steps), steps=S, network_calls=calls,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Fill-in
# --------------------------------------------------------------------------------------------------

#: Mask ratios at which chapter 3 lets the denoiser fill in a held-out grid.
FILL_IN_RATIOS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
