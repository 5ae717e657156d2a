"""Chapter 4: sample new token grids, decode them into synthetic paired volumes, export and judge them.

The pipeline: :func:`regdiff_core.diffusion.sample_tokens` draws token grids from the trained denoiser
(chapter 3); the VQ-AE decoder (chapter 2) turns each grid into two vessel-probability volumes, fixed
(inhale) and moving (exhale), at ``profile.data.shape``; :func:`export_pair` writes each pair as

- ``synth_NNNN.npz`` with fp16 arrays ``fix`` and ``mov`` (H, W, D): P(vessel) per voxel — what the
  registration chapter reads back with :func:`load_synthetic` — and the int16 token grid ``tokens``;
- ``synth_NNNN_1.nii.gz`` / ``synth_NNNN_2.nii.gz``: the masks binarised at 0.5, in the seed's canonical
  256×208×256 frame (each profile voxel repeated over the block it covers, the inverse of
  :func:`regdiff_core.data.block_reduce`), uint8, 1 mm voxels — for viewers such as ITK-SNAP;
- ``manifest.json``: how they were made (profile, steps, temperature, seed, timings).

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

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from regdiff_core import distributed
from regdiff_core.config import CANONICAL_SHAPE, Profile
from regdiff_core.data import dice, dice_from_counts
from regdiff_core.diffusion import Denoiser, TokenSamples, sample_tokens

if TYPE_CHECKING:
    from regdiff_core.data import PairSet

#: Where :func:`sample_to_disk` writes by default and :func:`load_synthetic` reads, under ``work_dir``.
SYNTHETIC_DIR = "synthetic"
PREFIX = "synth_"
#: The VQ-AE reconstructions of the real training pairs (the ``reconstructions`` regime of chapter 5),
#: written by :func:`write_reconstructions` in the synthetic pairs' format, one ``recon_<case>.npz`` each.
RECONSTRUCTIONS_DIR = "reconstructions"
RECON_PREFIX = "recon_"


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
    """Sample ``n`` token grids and decode them, all in memory (use :func:`sample_to_disk` for many)."""
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


def to_canonical(mask: torch.Tensor) -> torch.Tensor:
    """A profile-resolution volume (H, W, D) → the canonical 256×208×256 frame by repeating each voxel
    over the block it covers (voxel k ↦ canonical [k·f, (k+1)·f)); ``block_reduce`` undoes it exactly."""
    from regdiff_core.data import block_factors

    f = block_factors(mask.shape[-3:])
    out = mask
    for axis, factor in zip((-3, -2, -1), f):
        if factor > 1:
            out = out.repeat_interleave(factor, dim=axis)
    assert tuple(out.shape[-3:]) == CANONICAL_SHAPE
    return out


def export_pair(
    out_dir: str | Path, name: str, fixed: torch.Tensor, moving: torch.Tensor, *, tokens: torch.Tensor | None = None,
    nifti: bool = True, threshold: float = 0.5,
) -> list[Path]:  # fmt: skip
    """Write one synthetic pair: ``name.npz`` (fp16 ``fix``/``mov``, (H, W, D) P(vessel), and the token grid
    ``tokens`` (h, w, d) int16 when given) and, with ``nifti``, ``name_1.nii.gz``/``name_2.nii.gz`` (masks
    ``p > threshold`` in the canonical frame)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # round to fp16 first, so that the nii.gz masks agree with load_synthetic(binary=True) voxel for voxel
    fixed, moving = fixed.detach().cpu().half(), moving.detach().cpu().half()
    npz = out_dir / f"{name}.npz"
    tmp = out_dir / f".{name}.tmp.npz"
    extra = {"tokens": tokens.detach().cpu().to(torch.int16).numpy()} if tokens is not None else {}
    np.savez_compressed(tmp, fix=fixed.numpy(), mov=moving.numpy(), **extra)
    tmp.replace(npz)
    paths = [npz]
    if nifti:
        import nibabel as nib

        for suffix, volume in (("1", fixed), ("2", moving)):
            mask = to_canonical((volume.float() > threshold).to(torch.uint8)).numpy()
            image = nib.Nifti1Image(mask, affine=np.eye(4))  # 1 mm voxels, canonical frame
            image.header.set_data_dtype(np.uint8)
            path = out_dir / f"{name}_{suffix}.nii.gz"
            nib.save(image, path)
            paths.append(path)
    return paths


def _clear(out_dir: Path, keep: set[str] = frozenset()) -> None:
    """Remove earlier synthetic pairs (only files this module names, except ``keep``) so a smaller run
    leaves no extras."""
    for path in list(out_dir.glob(f"{PREFIX}*.npz")) + list(out_dir.glob(f"{PREFIX}*.nii.gz")):
        if path.name not in keep:
            path.unlink()


class SampleReport(NamedTuple):
    """What :func:`sample_to_disk` did: ``n`` pairs in ``out_dir``; seconds of sampling + decoding per pair
    (export excluded); ``seconds_export``: writing the files; ``network_calls``: denoiser evaluations."""

    n: int
    out_dir: Path
    seconds_per_pair: float
    seconds_tokens: float
    seconds_decode: float
    seconds_export: float
    network_calls: int


def sample_to_disk(
    profile: Profile,
    work_dir: str | Path,
    device: torch.device,
    *,
    n: int | None = None,
    out_dir: str | Path | None = None,
    seed: int = 0,
    nifti: bool | None = None,
    progress: bool = True,
    denoiser: Denoiser | None = None,
    vqae=None,
) -> SampleReport:
    """Sample ``n`` (default ``profile.sampling.n_pairs``) pairs batch by batch and export each one.

    Keeps only one batch in memory, so 256 full-size pairs fit anywhere. ``out_dir`` defaults to
    ``work_dir/synthetic`` (where :func:`load_synthetic` looks). The new pairs are written to a temporary
    folder inside it and replace the earlier ``synth_*`` files only once all of them are complete: a
    failed or interrupted run leaves the previous pairs as they were.

    Batch k draws from its own generator (:func:`batch_seed`), so a batch's pairs do not depend on which
    process samples it: under ``torchrun`` the batches are dealt to the ranks (:func:`~regdiff_core.
    distributed.shard`), each rank writes its own pairs into the shared temporary folder, and rank 0 publishes
    the set once every rank has finished — the same files as one process with the same seed.
    """
    from regdiff_core.config import ConfigError
    from regdiff_core.store.diffusion import load_denoiser
    from regdiff_core.store.vqae import load_vqae
    from regdiff_core.utils import atomic_write_text, remove_orphans

    cfg = profile.sampling
    work_dir = Path(work_dir)
    n = cfg.n_pairs if n is None else int(n)
    nifti = cfg.export_nifti if nifti is None else nifti
    out_dir = Path(out_dir) if out_dir is not None else work_dir / SYNTHETIC_DIR
    if n < 1:
        raise ConfigError(
            f"sample: the number of pairs (--n) must be >= 1, got {n}; {out_dir} was not changed"
        )
    denoiser = denoiser if denoiser is not None else load_denoiser(work_dir, device)
    vqae = vqae if vqae is not None else load_vqae(profile, work_dir, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    main = distributed.is_main()
    if main:
        remove_orphans(out_dir / "staging")  # the temporary folder of a run that was killed
    staging = out_dir / distributed.broadcast_object(f".staging.tmp-{os.getpid()}")  # one for all ranks
    try:
        # every rank's report, or an error on every rank when one of them failed
        reports = distributed.gather(
            lambda: _sample_into(
                staging, profile, denoiser, vqae, n, seed=seed, nifti=nifti, progress=progress
            )
        )
        report = _merge_reports(reports, n)
        if main:
            names = {f.name for f in staging.iterdir()}
            missing = [f"{PREFIX}{i:04d}.npz" for i in range(1, n + 1) if f"{PREFIX}{i:04d}.npz" not in names]
            if missing:
                raise FileNotFoundError(
                    f"sample: {staging} lacks {missing[:3]}…: the ranks must share the work folder; "
                    f"{out_dir} was not changed"
                )
            for f in sorted(staging.iterdir()):  # complete: now replace the earlier pairs
                os.replace(f, out_dir / f.name)
            _clear(out_dir, keep=names)
    finally:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
    distributed.barrier()  # every rank returns after the set is published
    report = report._replace(out_dir=out_dir)
    manifest = {
        "profile": profile.name, "n": n, "steps": cfg.steps, "temperature": cfg.temperature, "seed": seed,
        "shape": list(profile.data.shape), "device": str(device), "nifti": nifti,
        "seconds_per_pair": report.seconds_per_pair, "network_calls": report.network_calls,
        "processes": distributed.context().world_size,
    }  # fmt: skip
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return report


def _sample_into(
    out_dir: Path, profile: Profile, denoiser, vqae, n: int, *, seed: int, nifti: bool, progress: bool
) -> SampleReport:
    """Sample and export ``n`` pairs into the (new) folder ``out_dir``, one batch at a time (under
    ``torchrun``: this rank's batches, and ``n`` in the report counts them)."""
    from tqdm.auto import tqdm

    cfg = profile.sampling
    out_dir.mkdir(parents=True, exist_ok=True)
    amp = profile.diffusion.amp
    totals = {"tokens": 0.0, "decode": 0.0, "export": 0.0, "calls": 0}
    sizes = {
        start: min(cfg.batch_size, n - start) for start in distributed.shard(range(0, n, cfg.batch_size))
    }
    n = sum(sizes.values())  # this rank's pairs
    bar = tqdm(total=n, desc="synthetic pairs", disable=not progress)
    for start, b in sizes.items():
        # batch k's own generator: its pairs do not depend on which rank samples it
        generator = torch.Generator().manual_seed(batch_seed(seed, start // cfg.batch_size))
        pairs = generate_pairs(
            denoiser, vqae, b, steps=cfg.steps, temperature=cfg.temperature, batch_size=cfg.batch_size,
            generator=generator, amp=amp,
        )  # fmt: skip
        t0 = time.perf_counter()
        for j in range(b):
            export_pair(out_dir, f"{PREFIX}{start + j + 1:04d}", pairs.fixed[j], pairs.moving[j],
                        tokens=pairs.tokens[j], nifti=nifti, threshold=cfg.threshold)  # fmt: skip
        totals["export"] += time.perf_counter() - t0
        totals["tokens"] += pairs.seconds_tokens
        totals["decode"] += pairs.seconds_decode
        totals["calls"] += pairs.network_calls
        bar.update(b)
    bar.close()
    report = SampleReport(
        n=n, out_dir=out_dir, seconds_per_pair=(totals["tokens"] + totals["decode"]) / max(n, 1),
        seconds_tokens=totals["tokens"], seconds_decode=totals["decode"], seconds_export=totals["export"],
        network_calls=int(totals["calls"]),
    )  # fmt: skip
    return report


def write_reconstructions(
    profile: Profile, work_dir: str | Path, device: torch.device, *, vqae=None
) -> list[Path]:
    """Decode the training pairs' token grids (``work_dir/tokens.pt``) with the VQ-AE and write each as
    ``work_dir/reconstructions/recon_<case>.npz`` (fp16 P(vessel), as :func:`export_pair` writes synthetic
    pairs). They train the ``reconstructions`` regime of chapter 5: what a *perfect* generative model of
    the training tokens could give with this VQ-AE, so that chapter 6 can tell what the VQ-AE loses from
    what the denoiser fails to learn. Like :func:`sample_to_disk`, the set is replaced only once complete.
    """
    from regdiff_core.store.vqae import load_tokens, load_vqae

    work_dir = Path(work_dir)
    tokens = load_tokens(work_dir)
    vqae = vqae if vqae is not None else load_vqae(profile, work_dir, device)
    out_dir = work_dir / RECONSTRUCTIONS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".staging.tmp-{os.getpid()}"
    try:
        batch = profile.vqae.encode_batch
        for start in range(0, len(tokens.cases), batch):
            grids = tokens.tokens[start : start + batch]
            probs = decode_probabilities(vqae, grids, batch_size=batch, amp=profile.vqae.amp)
            for j, case in enumerate(tokens.cases[start : start + batch]):
                export_pair(
                    staging, f"{RECON_PREFIX}{case}", probs[j, 0], probs[j, 1], tokens=grids[j], nifti=False
                )
        names = {f.name for f in staging.iterdir()}
        for f in sorted(staging.iterdir()):
            os.replace(f, out_dir / f.name)
        for old in out_dir.glob(f"{RECON_PREFIX}*.npz"):
            if old.name not in names:
                old.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return reconstruction_files(work_dir)


def reconstruction_files(work_dir: str | Path) -> list[Path]:
    """The ``recon_*.npz`` files of ``work_dir/reconstructions``, sorted by name (= by case)."""
    return sorted((Path(work_dir) / RECONSTRUCTIONS_DIR).glob(f"{RECON_PREFIX}*.npz"))


def batch_seed(seed: int, k: int) -> int:
    """The seed of batch ``k`` of a sampling run with ``seed``: ``seed`` itself for the first batch, a hash
    of (``seed``, ``k``) for the others."""
    if k == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1, np.uint64)[0] % 2**63)


def _merge_reports(reports: Sequence[SampleReport], n: int) -> SampleReport:
    """One report from every rank's: the pairs, seconds and denoiser calls added up."""
    if len(reports) == 1:
        return reports[0]
    seconds = {
        k: sum(getattr(r, k) for r in reports) for k in ("seconds_tokens", "seconds_decode", "seconds_export")
    }
    return SampleReport(
        n=n, out_dir=reports[0].out_dir, seconds_per_pair=(seconds["seconds_tokens"] + seconds["seconds_decode"]) / n,
        network_calls=sum(r.network_calls for r in reports), **seconds,
    )  # fmt: skip


def synthetic_files(work_dir: str | Path, folder: str | Path | None = None) -> list[Path]:
    """The ``synth_*.npz`` files of ``folder`` (default ``work_dir/synthetic``), sorted by name."""
    folder = Path(folder) if folder is not None else Path(work_dir) / SYNTHETIC_DIR
    return sorted(folder.glob(f"{PREFIX}*.npz"))


def _vessel_channel(array: np.ndarray) -> np.ndarray:
    """(H, W, D) P(vessel) as stored here, or the seed's (2, H, W, D) softmax → its vessel channel."""
    return array[1] if array.ndim == 4 and array.shape[0] == 2 else array


def read_synthetic_pair(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One stored pair: ``(fixed, moving)`` (H, W, D) P(vessel) as stored (fp16 here, the seed's fp16 softmax
    reduced to its vessel channel). A file that is not such a pair (cut short, another format, no ``fix`` or
    ``mov``) raises :class:`~regdiff_core.data.DataError` naming it; NumPy never unpickles objects here."""
    import zipfile

    from regdiff_core.data import DataError

    try:
        with np.load(path, allow_pickle=False) as z:
            return tuple(
                torch.from_numpy(np.ascontiguousarray(_vessel_channel(z[k]))) for k in ("fix", "mov")
            )  # type: ignore[return-value]
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as err:
        raise DataError(
            f"{path} is not a readable pair file ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "it may have been cut short. Sample the pairs again (chapter 4, or `python -m regdiff_core sample`)."
        ) from None


def load_synthetic(
    work_dir: str | Path, n: int | None = None, *, binary: bool = False, threshold: float = 0.5,
    folder: str | Path | None = None,
) -> PairSet:  # fmt: skip
    """The first ``n`` (default all) synthetic pairs from ``work_dir/synthetic/*.npz`` as a ``PairSet``.

    ``fixed``/``moving`` (n, H, W, D): float32 P(vessel), or with ``binary=True`` uint8 masks
    ``p > threshold`` (a quarter of the memory, like the real pairs). ``spacing`` is all ones (mm).
    """
    from regdiff_core.data import PairSet

    files = synthetic_files(work_dir, folder)
    if not files:
        where = Path(folder) if folder is not None else Path(work_dir) / SYNTHETIC_DIR
        raise FileNotFoundError(
            f"no synthetic pairs ({PREFIX}*.npz) in {where}: run chapter 4 (notebooks/04_sampling.ipynb) or "
            "`python -m regdiff_core sample --profile <P> --work-dir <W>` first"
        )
    if n is not None:
        if n > len(files):
            raise ValueError(f"asked for {n} synthetic pairs, {len(files)} exist in {files[0].parent}")
        files = files[:n]
    fixed, moving = [], []
    for path in files:
        for p, out in zip(read_synthetic_pair(path), (fixed, moving)):
            p = p.float()
            out.append((p > threshold).to(torch.uint8) if binary else p)
    return PairSet(
        cases=[p.stem for p in files], fixed=torch.stack(fixed), moving=torch.stack(moving),
        spacing=torch.ones(len(files), 3), raw_shapes=None,
    )  # fmt: skip


def load_synthetic_tokens(
    work_dir: str | Path, n: int | None = None, folder: str | Path | None = None
) -> torch.Tensor:
    """The token grids (n, h, w, d) long stored with the first ``n`` synthetic pairs (see :func:`export_pair`)."""
    files = synthetic_files(work_dir, folder)[:n]
    if not files:
        raise FileNotFoundError(f"no synthetic pairs in {Path(folder or Path(work_dir) / SYNTHETIC_DIR)}")
    grids = []
    for path in files:
        with np.load(path) as z:
            if "tokens" not in z:
                raise KeyError(f"{path} has no token grid (written by the seed or with tokens=None)")
            grids.append(torch.from_numpy(z["tokens"].astype(np.int64)))
    return torch.stack(grids)


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
    "SampleReport",
    "SyntheticPairs",
    "UnmaskingFrame",
    "binarise_pairs",
    "decode_masks",
    "decode_probabilities",
    "dice_matrix",
    "export_pair",
    "generate_pairs",
    "load_synthetic",
    "read_synthetic_pair",
    "reconstruction_files",
    "write_reconstructions",
    "load_synthetic_tokens",
    "nearest_pair_dice",
    "neighbour_agreement",
    "pair_dice",
    "pair_statistics",
    "sample_to_disk",
    "summarise",
    "synthetic_files",
    "to_canonical",
    "token_histogram",
    "token_histogram_distance",
    "unmasking_frames",
    "volume_fraction",
]
