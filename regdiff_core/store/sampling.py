"""Chapter 4's files: the synthetic pairs (and the VQ-AE reconstructions of the training pairs) on disk.

:func:`sample_to_disk` draws pairs with :func:`regdiff_core.sampling.generate_pairs`, batch by batch, and
:func:`export_pair` writes each one, in ``work_dir/synthetic/``:

- ``synth_NNNN.npz`` with fp16 arrays ``fix`` and ``mov`` (H, W, D): P(vessel) per voxel — what the
  registration chapter reads back with :func:`load_synthetic` — and the int16 token grid ``tokens``;
- ``synth_NNNN_1.nii.gz`` / ``synth_NNNN_2.nii.gz``: the masks binarised at 0.5, in the authors'
  canonical 256×208×256 frame (each profile voxel repeated over the block it covers, the inverse of
  :func:`regdiff_core.data.block_reduce`: :func:`to_canonical`), uint8, 1 mm voxels — for viewers such
  as ITK-SNAP;
- ``manifest.json``: how they were made (profile, steps, temperature, seed, timings).

A set is replaced only once it is complete (written to a temporary folder first), so an interrupted run
leaves the previous pairs. :func:`write_reconstructions` writes the VQ-AE reconstructions of the training
pairs the same way, to ``work_dir/reconstructions/recon_<case>.npz`` (chapter 5's ``reconstructions``
regime). :func:`read_synthetic_pair` reads one file (also the authors' own fp16 softmax pairs) without
ever unpickling: a file that is not a pair is a :class:`~regdiff_core.data.DataError` naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from regdiff_core import distributed
from regdiff_core.config import CANONICAL_SHAPE, ConfigError, Profile
from regdiff_core.data import DataError, PairSet, block_factors
from regdiff_core.diffusion import Denoiser
from regdiff_core.sampling import (
    batch_seed,
    binarise_pairs,
    decode_probabilities,
    generate_pairs,
    pair_statistics,
)
from regdiff_core.utils import atomic_write_text, remove_orphans

#: Where :func:`sample_to_disk` writes by default and :func:`load_synthetic` reads, under ``work_dir``.
SYNTHETIC_DIR = "synthetic"


PREFIX = "synth_"


#: The VQ-AE reconstructions of the real training pairs (the ``reconstructions`` regime of chapter 5),
#: written by :func:`write_reconstructions` in the synthetic pairs' format, one ``recon_<case>.npz`` each.
RECONSTRUCTIONS_DIR = "reconstructions"


RECON_PREFIX = "recon_"


def to_canonical(mask: torch.Tensor) -> torch.Tensor:
    """A profile-resolution volume (H, W, D) → the canonical 256×208×256 frame by repeating each voxel
    over the block it covers (voxel k ↦ canonical [k·f, (k+1)·f)); ``block_reduce`` undoes it exactly."""
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
    from regdiff_core.store.diffusion import load_denoiser
    from regdiff_core.store.vqae import load_vqae

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


def fraction_by_threshold(work_dir: str | Path, n: int, thresholds) -> dict[str, float]:
    """Mean vessel volume fraction of the first ``n`` synthetic pairs, binarised at each of ``thresholds``
    (keys: the threshold as text): how much the synthetic volume depends on where P(vessel) is cut."""
    fraction_at = {}
    for threshold in thresholds:
        pairs_at = load_synthetic(work_dir, n=n, binary=True, threshold=threshold)
        stats_at = pair_statistics(binarise_pairs(pairs_at))
        fraction_at[str(threshold)] = float(stats_at["volume_fraction"].mean())
    return fraction_at
