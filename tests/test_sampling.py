"""Chapter 4: export round trip, loading, the statistics against hand-computed values, and sampling to disk."""

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from regdiff_core.config import CANONICAL_SHAPE, DiffusionConfig, get_profile
from regdiff_core.data import block_reduce
from regdiff_core.diffusion import build_denoiser
from regdiff_core.sampling import (
    dice_matrix,
    nearest_pair_dice,
    pair_dice,
    token_histogram,
    token_histogram_distance,
    volume_fraction,
)
from regdiff_core.store.sampling import export_pair, load_synthetic, sample_to_disk, to_canonical
from regdiff_core.vqae import build_vqae

SHAPE = (64, 52, 64)  # the ci shape: the smallest that divides the canonical frame by 4 per axis


def test_export_round_trip_npz_and_canonical_nifti(tmp_path):
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(SHAPE, generator=g) ** 4  # mostly background, like vessels
    moving = torch.rand(SHAPE, generator=g) ** 4
    folder = tmp_path / "synthetic"
    paths = export_pair(folder, "synth_0001", fixed, moving)
    assert [p.name for p in paths] == ["synth_0001.npz", "synth_0001_1.nii.gz", "synth_0001_2.nii.gz"]
    with np.load(paths[0]) as z:
        assert z["fix"].dtype == np.float16 and z["fix"].shape == SHAPE
    pairs = load_synthetic(tmp_path)
    assert pairs.cases == ["synth_0001"] and len(pairs) == 1
    assert pairs.fixed.dtype == torch.float32 and pairs.fixed.shape == (1, *SHAPE)
    assert torch.allclose(pairs.fixed[0], fixed, atol=5e-4)  # fp16 keeps ~3 decimal digits in [0, 1]
    assert torch.allclose(pairs.moving[0], moving, atol=5e-4)
    assert torch.equal(pairs.spacing, torch.ones(1, 3))
    binary = load_synthetic(tmp_path, binary=True)
    assert binary.fixed.dtype == torch.uint8
    assert torch.equal(binary.fixed[0].bool(), pairs.fixed[0] > 0.5)
    for path, volume in zip(paths[1:], (fixed, moving)):
        image = nib.load(path)
        mask = torch.from_numpy(np.asarray(image.dataobj))
        assert tuple(mask.shape) == CANONICAL_SHAPE and mask.dtype == torch.uint8
        assert np.allclose(image.header.get_zooms(), 1.0)
        # the canonical mask reduces back to the profile-resolution mask exactly
        assert torch.equal(block_reduce(mask, SHAPE).bool(), volume.half().float() > 0.5)


def test_to_canonical_repeats_each_voxel_over_its_block():
    v = torch.zeros(SHAPE, dtype=torch.uint8)
    v[1, 2, 3] = 1
    c = to_canonical(v)
    assert int(c.sum()) == 4 * 4 * 4
    assert c[4:8, 8:12, 12:16].all()


def test_load_synthetic_reads_the_seed_layout_and_counts(tmp_path):
    folder = tmp_path / "synthetic"
    folder.mkdir()
    p = np.full((4, 4, 4), 0.75, dtype=np.float16)
    for i in range(3):  # the seed stores softmax (background, vessel) per volume
        np.savez_compressed(
            folder / f"synth_{i + 1:04d}.npz", fix=np.stack([1 - p, p]), mov=np.stack([p, 1 - p])
        )
    pairs = load_synthetic(tmp_path, n=2)
    assert pairs.cases == ["synth_0001", "synth_0002"]
    assert torch.allclose(pairs.fixed, torch.full((2, 4, 4, 4), 0.75))
    assert torch.allclose(pairs.moving, torch.full((2, 4, 4, 4), 0.25))
    with pytest.raises(ValueError, match="3 exist"):
        load_synthetic(tmp_path, n=4)
    with pytest.raises(FileNotFoundError, match="sample"):
        load_synthetic(tmp_path / "elsewhere")


def test_pair_statistics_match_hand_counts():
    masks = torch.zeros(2, 2, 2, 2, 5, dtype=torch.bool)  # 20 voxels per volume
    masks[0, 0, 0, 0, :4] = True  # fixed: 4 voxels
    masks[0, 1, 0, 0, 2:4] = True  # moving: 2 voxels, both inside fixed
    masks[1, 0, 1, 1, :] = True  # pair 1: fixed 5 voxels, moving empty
    assert torch.allclose(volume_fraction(masks), torch.tensor([(4 + 2) / 40, 5 / 40]).double())
    # Dice = 2·2 / (4 + 2) and 2·0 / (5 + 0)
    assert torch.allclose(pair_dice(masks), torch.tensor([4 / 6, 0.0]).double())
    assert float(pair_dice(torch.zeros(1, 2, 3, 3, 3, dtype=torch.bool))) == 1.0


def test_dice_matrix_and_nearest_neighbour_by_hand():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    d = dice_matrix(a, a, chunk=3)  # chunks of 3 voxels exercise the accumulation
    expected = torch.tensor(
        [[1.0, 0.0, 2 * 2 / 5], [0.0, 1.0, 2 * 1 / 5], [2 * 2 / 5, 2 * 1 / 5, 1.0]], dtype=torch.float64
    )
    assert torch.allclose(d, expected)
    nn = nearest_pair_dice(a, a, exclude_self=True)
    assert nn.index.tolist() == [2, 2, 0]
    assert torch.allclose(nn.dice, torch.tensor([0.8, 0.4, 0.8], dtype=torch.float64))
    # a copy of a reference pair is found with Dice 1
    copy = nearest_pair_dice(a[1:2], a)
    assert copy.index.tolist() == [1] and float(copy.dice) == 1.0


def test_token_histogram_distance_is_total_variation():
    a = torch.tensor([0, 0, 1, 1])
    assert torch.allclose(token_histogram(a, 3), torch.tensor([0.5, 0.5, 0.0]).double())
    assert token_histogram_distance(a, a.flip(0), 3) == 0.0
    assert token_histogram_distance(a, torch.tensor([2, 2]), 3) == 1.0
    # p = (½, ½, 0), q = (¼, ¼, ½): ½ (¼ + ¼ + ½) = ½
    assert token_histogram_distance(a, torch.tensor([0, 1, 2, 2]), 3) == pytest.approx(0.5)


def test_sample_to_disk_writes_loadable_reproducible_pairs(tmp_path):
    profile = get_profile("ci")
    profile = dataclasses.replace(
        profile, sampling=dataclasses.replace(profile.sampling, steps=3, batch_size=2, export_nifti=False)
    )
    torch.manual_seed(0)
    tiny = DiffusionConfig(n_layers=1, width=16, n_heads=2, ff=32, T=4, amp=False)
    vqae_cfg = dataclasses.replace(
        profile.vqae, channels=(4, 8), strides=(1, 2), embed_dim=8, codebook_size=8
    )
    vqae = build_vqae(vqae_cfg).eval()
    denoiser = build_denoiser(tiny, 8, (4, 4, 4)).eval()
    kwargs = dict(n=3, seed=5, progress=False, denoiser=denoiser, vqae=vqae)
    report = sample_to_disk(profile, tmp_path, torch.device("cpu"), **kwargs)
    assert report.n == 3 and report.seconds_per_pair > 0
    files = sorted(p.name for p in (tmp_path / "synthetic").iterdir())
    assert files == ["manifest.json", "synth_0001.npz", "synth_0002.npz", "synth_0003.npz"]
    assert json.loads((tmp_path / "synthetic" / "manifest.json").read_text())["n"] == 3
    first = load_synthetic(tmp_path)
    assert first.fixed.shape == (3, 8, 8, 8)
    assert float(first.fixed.min()) >= 0 and float(first.fixed.max()) <= 1
    # the same seed gives the same pairs; a smaller rerun leaves no stale files
    sample_to_disk(profile, tmp_path, torch.device("cpu"), **{**kwargs, "n": 2})
    second = load_synthetic(tmp_path)
    assert len(second) == 2 and torch.equal(second.fixed, first.fixed[:2])


def test_fraction_by_threshold_cuts_the_stored_probabilities(tmp_path):
    """Two stored pairs of known P(vessel): the volume fraction at each threshold is counted by hand."""
    from regdiff_core.store.sampling import fraction_by_threshold

    p = torch.zeros(4, 4, 4)
    p.view(-1)[:16] = 0.8  # a quarter of the voxels at 0.8
    p.view(-1)[16:24] = 0.4  # an eighth at 0.4
    for k in (1, 2):
        export_pair(tmp_path / "synthetic", f"synth_{k:04d}", p, p, nifti=False)
    assert fraction_by_threshold(tmp_path, 2, (0.3, 0.5, 0.9)) == {"0.3": 0.375, "0.5": 0.25, "0.9": 0.0}
