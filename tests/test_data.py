"""Chapter 1 (regdiff_core.data, regdiff_core.store.data): frame, dilation, resampling, landmarks, cache and error messages.

Expected values are computed by hand in the comments, or come from the paper's own release (its result
CSVs and landmark file), never from this module's output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regdiff_core import data, store
from regdiff_core.config import ALL_TEST_CASES, CANONICAL_SHAPE, RELEASE_TRAIN_CASES, get_profile

#: The 20 of the 27 test pairs that the shared mirror holds (its README).
MIRRORED_TEST_CASES = tuple(
    "002 008 054 055 056 097 104 106 107 108 109 110 113 114 116 117 118 119 121 123".split()
)


def write_nii(path, array, zooms=(1.0, 1.0, 1.0)):
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(array), affine=np.diag([*zooms, 1.0]))
    image.header.set_zooms(zooms)
    nib.save(image, str(path))
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory, mirror_url):
    """The mirrored test pairs (+ landmarks and CSVs) downloaded through the real download path."""
    data_dir = tmp_path_factory.mktemp("release")
    pairs = store.data.download_pairs(
        store.data.RELEASE, data_dir, MIRRORED_TEST_CASES, base_url=mirror_url, progress=False
    )
    return data_dir, pairs


# ----------------------------------------------------------------------------------------------------
# Landmarks
# ----------------------------------------------------------------------------------------------------


def test_landmarks_are_in_case_order(release):
    """Each mirrored case's landmarks reproduce the paper's initial TRE rows for that case.

    The CSV holds one row per landmark (4590) in case order; case i's rows start after the landmarks
    of the cases before it in ALL_TEST_CASES. A wrong case order shifts the rows and breaks the match.
    """
    data_dir, _ = release
    profile = get_profile("ci")
    csv = np.loadtxt(data_dir / store.data.RELEASE / "regnets_state_dilated_vessels.csv", delimiter=",")
    everything = store.data.load_landmarks(profile, data_dir, cases=ALL_TEST_CASES)
    counts = [len(p) for p in everything.canonical_fixed]
    assert sum(counts) == len(csv) == 4590  # PAPER.md: 4590 landmark pairs
    start = dict(zip(ALL_TEST_CASES, np.cumsum([0, *counts[:-1]])))
    for case in MIRRORED_TEST_CASES:
        lms = store.data.load_landmarks(profile, data_dir, cases=[case])
        tre = (lms.canonical_fixed[0] - lms.canonical_moving[0]).norm(dim=-1).double().numpy()
        rows = csv[start[case] : start[case] + len(tre), 0]
        assert tre.mean() == pytest.approx(rows.mean(), rel=1e-5), case
        np.testing.assert_allclose(tre, rows, atol=1e-3, err_msg=case)
        assert float(lms.initial_tre()[0]) == pytest.approx(rows.mean(), rel=1e-5)
    # the paper's headline: initial TRE 15.42 mm over all 4590 landmarks
    assert float(torch.cat([(f - m).norm(dim=-1) for f, m in zip(everything.canonical_fixed, everything.canonical_moving)]).mean()) == pytest.approx(15.42, abs=0.005)  # fmt: skip


def test_landmarks_at_profile_resolution(release):
    data_dir, _ = release
    lms = store.data.load_landmarks(get_profile("ci"), data_dir)  # ci's own test cases
    assert lms.cases == list(get_profile("ci").data.test_cases)
    for fixed, canonical in zip(lms.fixed, lms.canonical_fixed):
        # 64/256 = 1/4 along every axis: p = (i + 0.5)/4 − 0.5
        torch.testing.assert_close(fixed, (canonical + 0.5) / 4 - 0.5)
        assert bool(((fixed > -0.5) & (fixed < torch.tensor([63.5, 51.5, 63.5]))).all())


def test_unknown_landmark_case_is_a_clear_error(release):
    data_dir, _ = release
    with pytest.raises(data.DataError, match="'033'.*valid: 002 008"):
        store.data.load_landmarks(get_profile("ci"), data_dir, cases=["033"])


# ----------------------------------------------------------------------------------------------------
# The canonical frame
# ----------------------------------------------------------------------------------------------------


def test_canonical_padding_by_hand():
    # case 035 after the seed's crop, 268×188×280:
    # h1 = (352−268)//2 − 48 = −6, h2 = 352−268+6−96 = −6; w1 = (256−188)//2 − 32 = 2, w2 = 256−188−2−48 = 18;
    # d1 = (352−280)//2 − 48 = −12, d2 = 352−280+12−96 = −12
    assert data.canonical_padding((268, 188, 280)) == (-6, -6, 2, 18, -12, -12)
    # an odd size: H = 253 → h1 = 99//2 − 48 = 1, h2 = 352−253−1−96 = 2
    assert data.canonical_padding((253, 217, 302))[:2] == (1, 2)
    for shape in [(268, 188, 280), (253, 217, 302), (341, 250, 353), (200, 150, 180), (256, 208, 256)]:
        h1, h2, w1, w2, d1, d2 = data.canonical_padding(shape)
        assert (shape[0] + h1 + h2, shape[1] + w1 + w2, shape[2] + d1 + d2) == CANONICAL_SHAPE


def test_pad_crop_moves_a_voxel_by_the_offsets():
    v = torch.zeros(268, 188, 280, dtype=torch.uint8)
    v[10, 20, 30] = 1  # → (10 − 6, 20 + 2, 30 − 12) = (4, 22, 18)
    v[0, 0, 0] = 1  # cropped away (h1 = −6)
    out = data.pad_crop_to_canonical(v)
    assert out.shape == CANONICAL_SHAPE and out.dtype == torch.uint8
    assert out.nonzero().tolist() == [[4, 22, 18]]
    # leading dimensions pass through
    assert data.pad_crop_to_canonical(v[None].repeat(2, 1, 1, 1)).shape == (2, *CANONICAL_SHAPE)


def test_seed_crop_only_touches_case_035():
    v = torch.arange(451).expand(2, 3, 451)
    assert torch.equal(data.seed_crop(v, "035"), v[..., :280])
    assert data.seed_crop(v, "036") is v
    short = v[..., :200]
    assert data.seed_crop(short, "035") is short


def test_release_case_035_needs_the_crop(mirror_dir):
    import nibabel as nib

    shape = nib.load(str(mirror_dir / "dilated_vessels_10" / "case_035_1.nii.gz")).shape
    assert shape[2] > 280  # the release's 035 is the oversized scan (451 slices), so the rule applies


def test_pad_crop_puts_vessels_where_the_landmarks_are(release):
    """Pooled over the mirrored test pairs, fixed landmarks lie within 2 voxels of a vessel far more
    often in the canonical frame than in frames shifted by 5 voxels along any axis."""
    data_dir, pairs = release
    lms = store.data.load_landmarks(get_profile("ci"), data_dir, cases=MIRRORED_TEST_CASES)
    r = torch.arange(-2, 3)
    ball = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    ball = ball[ball.float().norm(dim=-1) <= 2]  # 33 offsets within 2 voxels
    shifts = [(0, 0, 0)] + [tuple(s * 5 * (a == k) for a in range(3)) for k in range(3) for s in (1, -1)]
    hits = dict.fromkeys(shifts, 0)
    total = 0
    for (_case, fixed_path, _), points in zip(pairs, lms.canonical_fixed):
        # the test split's path through prepare: load, binarise, (no dilation, no seed crop), pad/crop
        fixed = data.pad_crop_to_canonical(data.binarise(store.data.load_label_volume(fixed_path)[0]))
        total += len(points)
        for shift in shifts:
            q = (points.round().long() + torch.tensor(shift))[:, None, :] + ball[None]
            q = torch.minimum(q.clamp(min=0), torch.tensor(CANONICAL_SHAPE) - 1)
            hits[shift] += int(fixed[q[..., 0], q[..., 1], q[..., 2]].amax(dim=1).sum())
    share = {s: h / total for s, h in hits.items()}
    best_shifted = max(v for s, v in share.items() if s != (0, 0, 0))
    assert share[(0, 0, 0)] > best_shifted + 0.1, share


# ----------------------------------------------------------------------------------------------------
# Dilation and resampling
# ----------------------------------------------------------------------------------------------------


def test_dilation_of_a_hand_made_volume():
    v = torch.zeros(5, 6, 7, dtype=torch.uint8)
    v[0, 0, 0] = 1  # at a corner: {0, 1}³ inside the volume, minus the diagonal corner (1, 1, 1) → 7
    v[3, 3, 3] = 1  # inside: the 3×3×3 cube minus its 8 corners → 27 − 8 = 19
    expected = torch.zeros_like(v)
    expected[0:2, 0:2, 0:2] = 1
    expected[1, 1, 1] = 0
    expected[2:5, 2:5, 2:5] = 1
    for corner in ((2, 2, 2), (2, 2, 4), (2, 4, 2), (2, 4, 4), (4, 2, 2), (4, 2, 4), (4, 4, 2), (4, 4, 4)):
        expected[corner] = 0
    out = data.dilate3(v)
    assert out.dtype == torch.uint8 and torch.equal(out, expected)
    assert int(out.sum()) == 7 + 19
    # the same as scipy's binary dilation with the 18-neighbourhood on random data (batched too)
    from scipy import ndimage

    s18 = ndimage.generate_binary_structure(3, 2)
    g = torch.Generator().manual_seed(0)
    r = (torch.rand(2, 9, 8, 11, generator=g) > 0.9).to(torch.uint8)
    for i in range(2):
        reference = ndimage.binary_dilation(r[i].numpy().astype(bool), s18)
        assert np.array_equal(data.dilate3(r)[i].numpy().astype(bool), reference)


@pytest.mark.parametrize("case", ["034"])
def test_release_masks_are_18_neighbourhood_dilations(mirror_dir, case):
    """The release's masks were dilated with the 18-neighbourhood: each is the dilation (by ``dilate3``)
    of its own 18-erosion, i.e. unchanged by an 18-opening. With the full cube the opening loses voxels
    (4–10 % per mask by the paper's facts sheet), so the cube cannot have made them."""
    from scipy import ndimage

    for side in ("1", "2"):
        labels, _ = store.data.load_label_volume(
            mirror_dir / "dilated_vessels_10" / f"case_{case}_{side}.nii.gz"
        )
        mask = labels > 0
        eroded = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 2))
        reopened = data.dilate3(torch.from_numpy(eroded.view(np.uint8))).numpy().astype(bool)
        assert np.array_equal(reopened, mask)
        cube = np.ones((3, 3, 3), dtype=bool)
        opened_by_cube = ndimage.binary_dilation(ndimage.binary_erosion(mask, cube), cube)
        lost = 1 - opened_by_cube.sum() / mask.sum()
        assert 0.03 < lost < 0.11, lost


def test_release_is_not_dilated_twice_but_raw_data_is(tmp_path):
    profile = get_profile("ci")
    assert store.data.split_spec(profile, "train")[3] is False  # release: already dilated
    assert store.data.split_spec(profile, "test")[3] is False
    raw = get_profile("ci", {"data.train_dataset": "lung250m-4b", "data.train_cases": "000,001"})
    assert store.data.split_spec(raw, "train")[3] is True
    v = np.zeros((100, 80, 100), dtype=np.uint8)
    v[50, 40, 50] = 2  # pads by h1 = d1 = (352−100)//2 − 48 = 78, w1 = (256−80)//2 − 32 = 56 → (128, 96, 128)
    f, m = write_nii(tmp_path / "a.nii.gz", v), write_nii(tmp_path / "b.nii.gz", v)
    assert store.data.load_canonical_pair(f, m, case="000", dilate=False).fixed.nonzero().tolist() == [
        [128, 96, 128]
    ]
    pair = store.data.load_canonical_pair(f, m, case="000", dilate=True)
    # one voxel → its 18-neighbourhood: the 3×3×3 block around (128, 96, 128) without the 8 corners
    block = pair.fixed[127:130, 95:98, 127:130]
    assert int(pair.fixed.sum()) == 19 and int(block.sum()) == 19 and int(block[0, 0, 0]) == 0


def test_resampling_keeps_a_one_voxel_thin_vessel():
    canonical = torch.zeros(CANONICAL_SHAPE, dtype=torch.uint8)
    canonical[101, 50, :] = 1  # a straight line, one voxel thin, along D
    idx = torch.arange(256)
    canonical[idx, (idx * 0.8).long(), idx] = 1  # a diagonal line
    out = data.block_reduce(canonical, (64, 52, 64))
    assert out.shape == (64, 52, 64) and out.dtype == torch.uint8
    # block k covers canonical [4k, 4k+4): voxel 101 → block 25, 50 → block 12
    assert bool(out[25, 12, :].all())
    expected = torch.zeros_like(out)
    expected[25, 12, :] = 1
    expected[idx // 4, (idx * 0.8).long() // 4, idx // 4] = 1
    assert torch.equal(out, expected)
    # why not the mean: averaging the block and thresholding at 0.5 loses both lines entirely
    assert not bool((F.avg_pool3d(canonical[None, None].float(), 4) > 0.5).any())


def test_block_reduce_rejects_shapes_that_do_not_divide():
    with pytest.raises(data.DataError, match="must divide the canonical frame"):
        data.block_reduce(torch.zeros(CANONICAL_SHAPE, dtype=torch.uint8), (100, 52, 64))
    assert data.block_reduce(torch.zeros(2, *CANONICAL_SHAPE, dtype=torch.uint8), (128, 104, 128)).shape == (
        2,
        128,
        104,
        128,
    )


def test_canonical_profile_coordinates_by_hand():
    ci = (64, 52, 64)  # f = 4 on every axis
    # p = (i + 0.5)·s/S − 0.5: i = 0 → −0.375; i = 255 → 63.375; i = 1.5 (centre of block 0) → 0
    torch.testing.assert_close(
        data.canonical_to_profile(
            torch.tensor([[0.0, 0.0, 0.0], [255.0, 207.0, 255.0], [1.5, 1.5, 1.5]]), ci
        ),
        torch.tensor([[-0.375, -0.375, -0.375], [63.375, 51.375, 63.375], [0.0, 0.0, 0.0]]),
    )
    # half resolution: i = 10 → 10.5/2 − 0.5 = 4.75; inverse of p = 0 → 0.5·2 − 0.5 = 0.5
    torch.testing.assert_close(
        data.canonical_to_profile(torch.tensor([10.0, 10.0, 10.0]), (128, 104, 128)), torch.full((3,), 4.75)
    )
    torch.testing.assert_close(
        data.profile_to_canonical(torch.zeros(3), (128, 104, 128)), torch.full((3,), 0.5)
    )
    # the paper's frame maps to itself; integer input gives floats
    torch.testing.assert_close(data.canonical_to_profile(torch.tensor([[3, 4, 5]]), CANONICAL_SHAPE), torch.tensor([[3.0, 4.0, 5.0]]))  # fmt: skip
    # round trip
    x = torch.rand(100, 3, dtype=torch.float64) * torch.tensor([256.0, 208.0, 256.0]) - 0.5
    for shape in (ci, (128, 104, 128), CANONICAL_SHAPE):
        torch.testing.assert_close(data.profile_to_canonical(data.canonical_to_profile(x, shape), shape), x)
    # the block a canonical voxel falls into is the profile voxel nearest to its mapped position
    i = torch.arange(256, dtype=torch.float32)[:, None].expand(256, 3)
    assert torch.equal(data.canonical_to_profile(i, ci).round().long()[:, 0], torch.arange(256) // 4)


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    f = write_nii(tmp_path / "case_001_1.nii.gz", np.zeros((4, 4, 4), np.uint8))
    missing = tmp_path / "case_001_2.nii.gz"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        store.data.load_canonical_pair(f, missing, case="001", dilate=False)


def test_missing_mirror_case_names_case_and_file(tmp_path, mirror_url, monkeypatch):
    from data_download import DownloadError

    monkeypatch.setattr("data_download.core.RETRIES", 0)  # a 404 stays a 404; don't wait for retries

    with pytest.raises(DownloadError, match=r"case 094.*dilated_vessels_ts/case_094_1\.nii\.gz"):
        store.data.download_pairs(store.data.RELEASE, tmp_path, ["094"], base_url=mirror_url, progress=False)


def test_pair_of_different_shapes_names_both(tmp_path):
    f = write_nii(tmp_path / "case_001_1.nii.gz", np.zeros((4, 5, 6), np.uint8))
    m = write_nii(tmp_path / "case_001_2.nii.gz", np.zeros((4, 5, 7), np.uint8))
    with pytest.raises(data.DataError) as err:
        store.data.load_canonical_pair(f, m, case="001", dilate=False)
    message = str(err.value)
    assert all(s in message for s in (str(f), str(m), "(4, 5, 6)", "(4, 5, 7)")), message


@pytest.mark.parametrize(
    "array, shown",
    [
        (np.array([0, 1, 2, 7], np.uint8), "[7]"),
        (np.array([0, 1, -1, 2], np.int16), "[-1]"),
        (np.array([0.0, 0.5, 1.0, 2.0], np.float32), "[0.5]"),
        (np.array([0.0, 1.0, 2.0, 1000.0], np.float32), "[1000.0]"),
    ],
)
def test_non_label_data_names_file_and_values(tmp_path, array, shown):
    path = write_nii(tmp_path / "ct.nii.gz", np.resize(array, (4, 4, 4)))
    with pytest.raises(data.DataError) as err:
        store.data.load_label_volume(path)
    assert str(path) in str(err.value) and shown in str(err.value), err.value


def test_label_data_as_float_is_accepted(tmp_path):
    path = write_nii(tmp_path / "ok.nii.gz", np.resize(np.array([0.0, 1.0, 2.0]), (3, 3, 3)))
    array, spacing = store.data.load_label_volume(path)
    assert torch.equal(data.binarise(array), torch.from_numpy((array > 0).astype(np.uint8)))
    assert spacing == (1.0, 1.0, 1.0)


def test_load_pairs_without_prepare_names_file_and_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prepared/train\.pt.*prepare --profile ci"):
        store.data.load_pairs(get_profile("ci"), tmp_path, "train")


# ----------------------------------------------------------------------------------------------------
# The prepared ci data (tests/conftest.py: prepared_ci)
# ----------------------------------------------------------------------------------------------------


def test_prepared_ci_pairs(prepared_ci):
    profile = prepared_ci.profile
    train = store.data.load_pairs(profile, prepared_ci.work_dir, "train")
    test = store.data.load_pairs(profile, prepared_ci.work_dir, "test")
    assert train.cases == list(RELEASE_TRAIN_CASES) and len(train) == 10
    assert test.cases == list(profile.data.test_cases)
    for pairs in (train, test):
        assert pairs.fixed.shape == pairs.moving.shape == (len(pairs), *profile.data.shape)
        assert pairs.fixed.dtype == torch.uint8 and int(pairs.fixed.max()) == 1
        assert pairs.spacing.shape == (len(pairs), 3)
        assert bool(((pairs.spacing - 1).abs() < 0.01).all())  # ≈ 1 mm voxels (README)
        v = pairs.volumes([0, 1])
        assert v.shape == (2, 2, *profile.data.shape) and v.dtype == torch.float32
        assert torch.equal(v[1, 1], pairs.moving[1].float())
    assert train.raw_shapes[train.cases.index("035")].tolist() == [268, 188, 451]


def test_prepared_landmarks_sit_on_prepared_vessels(prepared_ci):
    """At 64×52×64 the fixed landmarks hit a vessel voxel more often than one profile voxel off."""
    profile = prepared_ci.profile
    test = store.data.load_pairs(profile, prepared_ci.work_dir, "test")
    lms = store.data.load_landmarks(profile, prepared_ci.data_dir, test.cases)
    upper = torch.tensor(profile.data.shape) - 1
    shifts = [(0, 0, 0)] + [tuple(s * (a == k) for a in range(3)) for k in range(3) for s in (1, -1)]
    share = {}
    for shift in shifts:
        hits = total = 0
        for volume, points in zip(test.fixed, lms.fixed):
            q = torch.minimum((points.round().long() + torch.tensor(shift)).clamp(min=0), upper)
            hits += int(volume[q[:, 0], q[:, 1], q[:, 2]].sum())
            total += len(q)
        share[shift] = hits / total
    assert share[(0, 0, 0)] > max(v for s, v in share.items() if s != (0, 0, 0)) + 0.05, share


def test_prepare_again_uses_the_cache_and_cli(prepared_ci, mirror_url, capsys):
    import argparse

    from regdiff_core.cli import add_prepare, common_parser, profile_from_args

    parser = argparse.ArgumentParser()
    add_prepare(parser.add_subparsers(), common_parser())
    dirs = ["--data-dir", str(prepared_ci.data_dir), "--work-dir", str(prepared_ci.work_dir)]
    args = parser.parse_args(["prepare", "--profile", "ci", *dirs, "--base-url", mirror_url, "--no-progress"])
    assert args.func(args, profile_from_args(args)) == 0
    out = capsys.readouterr().out
    n_test = len(prepared_ci.profile.data.test_cases)
    assert "train: 10 pairs at 64×52×64 cached" in out and f"test: {n_test} pairs" in out
    result = store.data.prepare(
        prepared_ci.profile, prepared_ci.data_dir, prepared_ci.work_dir, progress=False
    )
    assert result.cached == ("train", "test")


def test_cached_prepare_still_fetches_a_missing_release_file(prepared_ci, mirror_url, tmp_path):
    """A data_dir from before the paper's token grids came with the release gets them on the next run."""
    import shutil

    shutil.copytree(prepared_ci.work_dir / "prepared", tmp_path / "work" / "prepared")
    release = tmp_path / "data" / store.data.RELEASE
    release.mkdir(parents=True)
    shutil.copy(prepared_ci.data_dir / store.data.RELEASE / store.data.LANDMARKS_FILE, release)
    result = store.data.prepare(
        prepared_ci.profile, tmp_path / "data", tmp_path / "work", base_url=mirror_url, progress=False
    )
    assert result.cached == ("train", "test")
    assert (release / "lung250_3d_vqae_model_dilated.pth").is_file()


def test_stale_cache_is_refused(prepared_ci):
    other = get_profile("ci", {"data.shape": "128,104,128"})
    with pytest.raises(
        data.DataError, match=r"same --set data.train_cases=… as to prepare.*another --work-dir"
    ):
        store.data.load_pairs(other, prepared_ci.work_dir, "train")


def test_case_lists_agree_with_the_download_manifest():
    from data_download import DATASETS

    assert store.data.LUNG250M_TRAIN_CASES == DATASETS["lung250m-4b"].splits["train"]
    assert RELEASE_TRAIN_CASES == DATASETS[store.data.RELEASE].splits["train"]
    assert ALL_TEST_CASES == DATASETS[store.data.RELEASE].splits["test"]
    for dataset, layout in store.data.DATASETS.items():
        case = layout.train_cases[0]
        expected = tuple(p.as_posix() for p in store.data.pair_paths("", layout.train_folder, case))
        assert DATASETS[dataset].pair(case) == expected


def test_input_record_takes_a_relative_data_dir(tmp_path, monkeypatch):
    # the notebooks get data_dir relative to notebooks/ ("../data") while downloads return absolute paths
    (tmp_path / "data" / "ds").mkdir(parents=True)
    (tmp_path / "nb").mkdir()
    f = tmp_path / "data" / "ds" / "case_1.nii.gz"
    f.write_bytes(b"abc")
    monkeypatch.chdir(tmp_path / "nb")
    record = store.data.input_record([f], Path("../data/ds"))
    assert list(record) == ["case_1.nii.gz"] and record["case_1.nii.gz"][0] == 3


def test_dice_by_hand():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    target = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]])
    assert data.dice(pred, target, dims=(1,)).tolist() == [0.5, 1.0]  # 2·1/(2+2); both empty → 1
    assert data.dice(pred, target).item() == 0.5
    a = torch.zeros(10, 10, 10)
    b = torch.zeros(10, 10, 10)
    a[:4] = 1  # 400 voxels
    b[2:8] = 1  # 600 voxels, 200 shared
    assert data.dice(a > 0.5, b > 0.5).item() == 2 * 200 / 1000
    assert data.dice(a, a).item() == 1.0
    assert data.dice(a * 0.4 > 0.5, a > 0.5).item() == 0.0  # probabilities: threshold them first
    assert data.dice(a, b).dtype == torch.float64
    # from counts, broadcast: |A∩B| = 1, |A| = 2, |B| ∈ {2, 0}
    counts = data.dice_from_counts(torch.tensor([[1.0, 0.0]]), torch.tensor([[2]]), torch.tensor([[2, 0]]))
    assert counts.tolist() == [[0.5, 0.0]]
    assert data.dice_from_counts(torch.tensor(0), torch.tensor(0), torch.tensor(0)).item() == 1.0
