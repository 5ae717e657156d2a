"""Chapter 5: the displacement convention, scaling and squaring, inverse consistency by construction,
the loss, greedy training (resume, save/load), test-time adaptation and the paper's parameters."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

from regdiff_core import reference
from regdiff_core import registration as R
from regdiff_core.config import EvaluationConfig, RegistrationConfig, get_profile
from regdiff_core.store import registration as SR

TINY = RegistrationConfig(channels=(4, 8, 8, 8, 8, 8), ss_steps=12)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smooth_field(shape, amplitude, seed=0, batch=1):
    """A random smooth velocity (batch, dim, *shape) in voxels, max |v| = amplitude."""
    g = torch.Generator().manual_seed(seed)
    dim = len(shape)
    coarse = torch.randn(batch, dim, *(max(2, s // 6) for s in shape), generator=g)
    mode = "trilinear" if dim == 3 else "bilinear"
    v = F.interpolate(coarse, size=shape, mode=mode, align_corners=False)
    return v / v.abs().max() * amplitude


def blobs(shape, seed=0):
    """A smooth random image in [0, 1] (1, 1, *shape)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *(max(2, s // 4) for s in shape), generator=g)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(coarse, size=shape, mode=mode, align_corners=False)


# ---------------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("shape", [(20, 16, 24), (28, 22)])
def test_seed_and_monai_scaling_and_squaring_agree(shape):
    v = smooth_field(shape, amplitude=4.0, batch=2)
    ours = R.exp_velocity(v, 12)
    monai = reference.monai_exp_velocity(v, 12)
    seed = R.seed_to_voxel(reference.seed_scaling_and_squaring(R.voxel_to_seed(v), 12))
    assert (ours - monai).abs().max() < 1e-4
    assert (ours - seed).abs().max() < 1e-4
    assert ours.abs().max() > 1.0  # a real deformation, not a trivial agreement of zeros


@pytest.mark.parametrize("shape", [(12, 10, 14), (16, 18)])
def test_warp_equals_monai_and_seed(shape):
    image = blobs(shape).repeat(2, 3, *([1] * len(shape)))
    u = smooth_field(shape, amplitude=3.0, batch=2)
    ours = R.warp(image, u)
    assert (ours - reference.monai_warp(image, u)).abs().max() < 1e-5
    assert (ours - reference.seed_warp(image, R.voxel_to_seed(u))).abs().max() < 1e-5


def test_known_translation_warps_as_expected():
    shape = (10, 12, 14)
    image = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    t = (2, -1, 3)  # voxels along H, W, D: warp(I, t)(x) = I(x + t)
    u = torch.tensor(t, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    warped = R.warp(image, u)
    expected = torch.roll(image, shifts=tuple(-s for s in t), dims=(2, 3, 4))
    inner = (slice(None), slice(None), slice(0, 8), slice(1, 12), slice(0, 11))  # away from wrap-around
    assert torch.allclose(warped[inner], expected[inner], atol=1e-6)
    # half a voxel along D on a ramp along D: linear interpolation is exact
    ramp = torch.arange(14.0).view(1, 1, 1, 1, 14).expand(1, 1, *shape)
    half = torch.zeros(1, 3, *shape)
    half[:, 2] = 0.5
    assert torch.allclose(R.warp(ramp, half)[..., :13], ramp[..., :13] + 0.5, atol=1e-5)
    # a constant velocity is a translation: exp(v) = v exactly (border padding)
    assert torch.allclose(R.exp_velocity(u.clone(), 12), u, atol=1e-5)


def test_seed_units_convert_to_voxels():
    shape = (8, 6, 10)
    field = torch.zeros(1, 3, *shape)
    field[:, 0] = 2.0 / 10  # the seed's channel 0 is x = the last axis (D); 2/S units = one voxel
    field[:, 2] = -2.0 / 8 * 3  # channel 2 is z = the first axis (H): −3 voxels
    u = R.seed_to_voxel(field)
    assert torch.allclose(u[:, 2], torch.ones(1, *shape))
    assert torch.allclose(u[:, 0], -3 * torch.ones(1, *shape))
    assert torch.allclose(u[:, 1], torch.zeros(1, *shape))
    assert torch.allclose(R.voxel_to_seed(u), field)


def test_exp_of_minus_v_inverts_exp_of_v():
    for shape in [(24, 20, 24), (40, 36)]:
        v = smooth_field(shape, amplitude=3.0, seed=2)
        u = R.exp_velocity(v)
        residual = R.compose(u, R.exp_velocity(-v))
        inner = (slice(None), slice(None), *(slice(4, -4) for _ in shape))
        # interpolation error only: a few hundredths of a voxel against displacements up to 3 voxels
        assert residual[inner].norm(dim=1).mean() < 0.03
        assert residual[inner].norm(dim=1).mean() < 0.05 * u[inner].norm(dim=1).mean()
        assert residual[inner].abs().max() < 0.3 and u.abs().max() > 2.0


def test_compose_order():
    # Φ_outer ∘ Φ_inner with a translation inner and a ramp outer: x + t + a·(x + t)
    shape = (16, 12)
    t = torch.zeros(1, 2, *shape)
    t[:, 0] = 2.0
    ramp = torch.zeros(1, 2, *shape)
    ramp[:, 0] = 0.1 * torch.arange(16.0).view(16, 1)
    composed = R.compose(ramp, t)
    x = torch.arange(16.0).view(16, 1)
    assert torch.allclose(composed[0, 0, :13], (2 + 0.1 * (x + 2)).expand(16, 12)[:13], atol=1e-5)


def test_rescale_points_is_align_corners_false_and_matches_data():
    from regdiff_core.data import canonical_to_profile

    p = torch.tensor([[0.0, 0.0, 0.0], [255.0, 207.0, 255.0], [1.5, 5.5, 9.5]])
    q = R.rescale_points(p, (256, 208, 256), (64, 52, 64))
    # canonical voxels 0..3 form profile voxel 0: their centre 1.5 maps to 0
    assert torch.allclose(q[2], torch.tensor([0.0, 1.0, 2.0]))
    assert torch.allclose(q[0], torch.tensor([-0.375] * 3))
    assert torch.allclose(q, canonical_to_profile(p, (64, 52, 64)))
    assert torch.allclose(R.rescale_points(q, (64, 52, 64), (256, 208, 256)), p, atol=1e-5)


def test_resize_field_scales_displacements():
    u = torch.zeros(1, 3, 32, 26, 32)
    u[:, 1] = 2.0  # 2 voxels of a 26-voxel axis
    half = R.resize_field(u, (16, 13, 16))
    assert half.shape == (1, 3, 16, 13, 16)
    assert torch.allclose(half[:, 1], torch.ones(1, 16, 13, 16))
    assert torch.allclose(half[:, 0], torch.zeros(1, 16, 13, 16))


# ---------------------------------------------------------------------------------- the network


def test_smooth_velocity_is_linear_odd_and_keeps_constants_inside():
    x = torch.randn(2, 3, 24, 20, 24)
    assert torch.allclose(R.smooth_velocity(-x), -R.smooth_velocity(x))
    assert R.smooth_velocity(x).shape == x.shape
    const = torch.ones(1, 2, 96, 96)
    centre = R.smooth_velocity(const)[..., 40:56, 40:56]
    assert torch.allclose(centre, torch.ones_like(centre), atol=1e-5)
    # the seed counts zero padding, so the field decays towards the border
    assert R.smooth_velocity(const)[0, 0, 0, 0] < 0.5


# a fresh network's velocity is tiny (its smoothing also damps small grids, the more so in 3D): a large
# tanh scale magnifies it so that maps of a few voxels are tested
@pytest.mark.parametrize("shape, tanh_scale", [((24, 20, 24), 1000.0), ((40, 36), 3.5)])
def test_inverse_consistent_by_construction(shape, tanh_scale):
    torch.manual_seed(0)
    model = R.build_registration(dataclasses.replace(TINY, tanh_scale=tanh_scale), len(shape)).eval()
    A, B = blobs(shape, 1), blobs(shape, 2)
    with torch.no_grad():
        v_AB = model.velocity(0, A, B)
        v_BA = model.velocity(0, B, A)
    assert torch.allclose(v_BA, -v_AB, atol=1e-5 * float(v_AB.abs().max()))
    ab, ba = model.register(A, B), model.register(B, A)
    # swapping the inputs gives exactly the inverse map: φ_BA(A, B) = φ_AB(B, A)
    assert torch.allclose(ab.phi_BA, ba.phi_AB, atol=1e-4)
    inner = (slice(None), slice(None), *(slice(3, -3) for _ in shape))
    size = ab.phi_AB[inner].norm(dim=1)
    assert size.max() > 1.0  # voxels: a real deformation
    residual = R.compose(ab.phi_AB, ab.phi_BA)[inner].norm(dim=1)
    assert residual.mean() < 0.02 * size.mean()


def test_both_directions_in_one_batch_are_bit_for_bit_two_calls():
    """exp_both / warp_both (and register) batch the two directions; with two threads grid_sample splits
    that batch between them, and no number of either direction, value or gradient, may change."""
    shape = (12, 10, 14)
    torch.set_num_threads(2)  # the fixture sets one thread and restores the count afterwards
    v = smooth_field(shape, 3.0, seed=1, batch=2)
    A = torch.cat([blobs(shape, 1), blobs(shape, 2)])
    B = torch.cat([blobs(shape, 3), blobs(shape, 4)])
    e_ab, e_ba = R.exp_both(v, 4)
    assert torch.equal(e_ab, R.exp_velocity(v, 4)) and torch.equal(e_ba, R.exp_velocity(-v, 4))
    w_a, w_b = R.warp_both(A, B, e_ab, e_ba)
    assert torch.equal(w_a, R.warp(A, e_ab)) and torch.equal(w_b, R.warp(B, e_ba))
    # the loss and its gradient against the two-call formula
    v1, v2 = v.clone().requires_grad_(), v.clone().requires_grad_()
    terms = R.registration_loss(A, B, v1, 4, 0.5)
    terms.loss.backward()
    phi_ab, phi_ba = R.exp_velocity(v2, 4), R.exp_velocity(-v2, 4)
    l1 = F.l1_loss(R.warp(A, phi_ab), B) + F.l1_loss(R.warp(B, phi_ba), A)
    ref = l1 + 0.5 * (R.smoothness(phi_ab) + R.smoothness(phi_ba))
    ref.backward()
    assert torch.equal(terms.loss, ref) and torch.equal(v1.grad, v2.grad)
    # the final maps of register: φ_AB = root₁ ∘ φ₂ ∘ root₁ and its inverse, one direction at a time
    model = R.build_registration(dataclasses.replace(TINY, ss_steps=4, tanh_scale=2000.0)).eval()
    out = model.register(A, B)
    A_mid, B_mid = R.warp(A, R.exp_velocity(out.v1 / 2, 4)), R.warp(B, R.exp_velocity(-out.v1 / 2, 4))
    with torch.no_grad():
        assert torch.equal(model.velocity(1, A_mid, B_mid), out.v2)
    r_ab, r_ba = R.exp_velocity(out.v1 / 2, 4), R.exp_velocity(-out.v1 / 2, 4)
    phi_ab = R.compose(r_ab, R.compose(R.exp_velocity(out.v2, 4), r_ab))
    phi_ba = R.compose(r_ba, R.compose(R.exp_velocity(-out.v2, 4), r_ba))
    assert float(phi_ab.abs().max()) > 0.2  # voxels: a deformation, not the identity
    assert torch.equal(out.phi_AB, phi_ab) and torch.equal(out.phi_BA, phi_ba)
    assert torch.equal(out.root1, r_ab) and torch.equal(out.warped_A, R.warp(A, phi_ab))


def test_network_handles_sizes_not_divisible_by_the_strides():
    model = R.build_registration(TINY)
    A = torch.rand(1, 1, 13, 11, 17)
    v = model.velocity(0, A, A.flip(2))
    assert v.shape == (1, 3, 13, 11, 17)


def test_loss_terms_by_hand():
    shape = (12, 10, 8)
    A = blobs(shape)
    zero = torch.zeros(1, 3, *shape)
    terms = R.registration_loss(A, A, zero, 12, 0.5)
    assert float(terms.loss) < 1e-6
    # a linear field u_H = a·h: seed units 2a/S_H per step along H, only in 1 of 3 channels
    a = 0.2
    u = torch.zeros(1, 3, *shape)
    u[:, 0] = a * torch.arange(12.0).view(12, 1, 1)
    expected = (2 * a / 12) ** 2 * (11 * 10 * 8) / (3 * 11 * 10 * 8)
    assert math.isclose(float(R.smoothness(u)), expected, rel_tol=1e-5)


def test_tta_improves_a_synthetic_misaligned_pair():
    torch.manual_seed(0)
    shape = (32, 32)
    A = blobs(shape, seed=3)
    t = torch.zeros(1, 2, *shape)
    t[:, 0], t[:, 1] = 2.0, -1.5
    B = R.warp(A, t, padding_mode="border")  # B(x) = A(x + t): φ_AB should approach +t
    model = R.build_registration(dataclasses.replace(TINY, lr=0.015), spatial_dims=2)
    before = model.register(A, B)
    result = R.test_time_adapt(model, A, B, iterations=40, lr=0.01)
    after = result.model.register(A, B)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    l1_before = (before.warped_A - B)[inner].abs().mean()
    l1_after = (after.warped_A - B)[inner].abs().mean()
    err_before = (before.phi_AB - t)[inner].norm(dim=1).mean()
    err_after = (after.phi_AB - t)[inner].norm(dim=1).mean()
    assert l1_after < 0.6 * l1_before
    assert err_after < 0.5 * err_before
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # the input model is untouched (TTA adapts a copy)
    assert torch.allclose(model.register(A, B).phi_AB, before.phi_AB)


# ---------------------------------------------------------------------------------- training


def test_train_regime_saves_resumes_and_loads(tmp_path):
    g = torch.Generator().manual_seed(0)
    fixed = (torch.rand(4, 16, 12, 16, generator=g) > 0.6).float()
    moving = torch.roll(fixed, 1, dims=1)
    data = SR.RegimeData("real_all", ["a", "b", "c", "d"], fixed, moving, 4, 0)
    profile = get_profile(
        "ci",
        {
            "registration.channels": "4,8,8,8,8,8",
            "registration.scale": "1.0",
            "registration.iterations": "3",
            "registration.batch_size": "2",
            "registration.ckpt_every": "2",
        },
    )
    torch.manual_seed(0)
    first = SR.train_regime(profile, "real_all", tmp_path, torch.device("cpu"), progress=False, data=data)
    assert [h["step"] for h in first.history] == [1, 2, 3]
    assert {"loss", "loss_step1", "loss_step2"} <= set(first.history[0])
    assert (tmp_path / "registration/real_all/history.csv").exists()
    again = SR.train_regime(profile, "real_all", tmp_path, torch.device("cpu"), progress=False, data=data)
    assert again.history == first.history  # resumed at the end: nothing retrained
    loaded = SR.load_registration(profile, tmp_path, "real_all", torch.device("cpu"))
    for a, b in zip(loaded.state_dict().values(), first.model.state_dict().values()):
        assert torch.equal(a, b)


def test_missing_model_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-registration --profile ci --regime synthetic"):
        SR.load_registration(get_profile("ci"), tmp_path, "synthetic", torch.device("cpu"))


def test_released_network_format_loads(tmp_path):
    cfg = get_profile("paper").registration
    nets = [UNet(3, 2, 3, cfg.channels, cfg.strides) for _ in range(2)]
    # the seed saves the uncompiled modules; accept fp16 copies and compile prefixes too
    states = [{f"_orig_mod.{k}": v.half() for k, v in n.state_dict().items()} for n in nets]
    torch.save(states, tmp_path / "regnets_state_synth.pth")
    model = SR.load_registration(get_profile("ci"), tmp_path, tmp_path / "regnets_state_synth.pth", "cpu")
    assert model.cfg.channels == (8, 16, 32, 64, 64, 64)
    assert model.cfg.scale == 2.0  # ci's 64×52×64 volumes → the paper's 128×104×128 grid
    w = nets[1].state_dict()["model.0.conv.weight"].half().float()
    assert torch.equal(model.nets[1].state_dict()["model.0.conv.weight"], w)


def test_few_cases_prefers_the_release_cases():
    assert R.few_cases(["001", "032", "033", "050", "034"], 2) == ["032", "033"]
    assert R.few_cases(["001", "032"], 3) == ["032", "001"]


def test_paper_parameters():
    paper = get_profile("paper")
    cfg, ev = paper.registration, paper.evaluation
    assert cfg == RegistrationConfig() and ev == EvaluationConfig()
    assert cfg.channels == (8, 16, 32, 64, 64, 64) and cfg.strides == (2, 2, 1, 2, 1)
    assert (cfg.tanh_scale, cfg.smooth_kernel, cfg.ss_steps, cfg.smooth_weight) == (0.35, 7, 12, 0.5)
    assert (cfg.lr, cfg.batch_size, cfg.iterations) == (0.015, 8, 2500 // 8 * 4)
    assert cfg.amp  # the seed trains under fp16 autocast (CUDA only here)
    assert (cfg.n_few, cfg.n_synthetic) == (10, 256)
    assert (ev.tta_iterations, ev.tta_lr) == (50, 0.005)
    assert R.registration_grid(paper.data.shape, cfg.scale) == (128, 104, 128)
    model = R.build_registration(cfg)
    seed_net = UNet(spatial_dims=3, in_channels=2, out_channels=3, channels=cfg.channels, strides=cfg.strides)
    shapes = {k: v.shape for k, v in seed_net.state_dict().items()}
    assert {k: v.shape for k, v in model.nets[0].state_dict().items()} == shapes
    for name in ("ci", "colab"):
        p = get_profile(name)
        assert p.registration.n_few < len(p.data.train_cases or range(97))


def test_gpu_benchmark_small_runs_on_cpu():
    from regdiff_core.bench import bench_registration

    out = bench_registration(torch.device("cpu"), small=True)
    assert out["train_iteration_seconds"] > 0 and out["tta_iteration_seconds"] > 0
    assert out["train_peak_memory_gb"] is None


def test_cli_stages_are_registered():
    from regdiff_core.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train-registration", "--regime", "real_few"])
    assert args.regime == "real_few"
    args = parser.parse_args(["evaluate", "--checkpoint", "identity", "--tta", "0", "--json", "x.json"])
    assert (args.checkpoint, args.tta, args.json) == ("identity", 0, "x.json")


def test_regime_data_streams_synthetic_pairs_through_a_bounded_cache(tmp_path):
    """Synthetic pairs stay on disk: a batch reads them (the same values load_synthetic gives), and the
    cache never holds more than its byte bound; real pairs stay uint8 until a batch converts them."""
    from regdiff_core.store.sampling import export_pair, load_synthetic

    g = torch.Generator().manual_seed(0)
    shape = (8, 6, 8)
    for i in range(5):
        p = torch.rand(2, *shape, generator=g)
        export_pair(tmp_path / "synthetic", f"synth_{i + 1:04d}", p[0], p[1], nifti=False)
    files = sorted((tmp_path / "synthetic").glob("synth_*.npz"))
    pair_bytes = 2 * 8 * 6 * 8 * 2  # two fp16 volumes
    real = (torch.rand(2, *shape, generator=g) > 0.5).to(torch.uint8)
    data = SR.RegimeData("synthetic_plus_few", ["r0", "r1"] + [f.stem for f in files], real, real.roll(1, 1),
                        2, 5, synthetic_files=files, cache_bytes=2 * pair_bytes)  # fmt: skip
    assert len(data) == 7 and data.shape == shape and data.fixed.dtype == torch.uint8
    expected = load_synthetic(tmp_path)
    fixed, moving = data.batch(torch.tensor([6, 0, 3, 2, 4]))
    assert fixed.dtype == torch.float32 and fixed.shape == (5, *shape)
    assert torch.equal(fixed[0], expected.fixed[4]) and torch.equal(moving[2], expected.moving[1])
    assert torch.equal(fixed[1], real[0].float())
    assert data._cached_bytes <= 2 * pair_bytes and len(data._cache) == 2
    # the LRU keeps the last two read (synthetic 0 and 2 of the files), in that order
    assert list(data._cache) == [0, 2]
    with pytest.raises(ValueError, match="differ in shape"):
        SR.RegimeData("synthetic_plus_few", ["r0"] + [f.stem for f in files], real[:1, :4], real[:1, :4],
                     1, 5, synthetic_files=files)  # fmt: skip


def test_runs_of_a_regime_train_into_their_own_folders_and_load_back(tmp_path):
    """Run 0 keeps the regime's folder; run k > 0 writes registration/<regime>-run<k>; each loads back by
    (regime, run), and two seeds give two different networks."""
    g = torch.Generator().manual_seed(0)
    fixed = (torch.rand(2, 16, 12, 16, generator=g) > 0.6).float()
    data = SR.RegimeData("real_few", ["a", "b"], fixed, torch.roll(fixed, 1, dims=1), 2, 0)
    profile = get_profile(
        "ci",
        {"registration.channels": "4,8,8,8,8,8", "registration.scale": "1.0", "registration.iterations": "2"},
    )
    nets = []
    for run in (0, 1):
        torch.manual_seed(run)
        nets.append(
            SR.train_regime(
                profile, "real_few", tmp_path, torch.device("cpu"), progress=False, data=data, run=run
            )
        )
    assert (tmp_path / "registration/real_few/model.pt").exists()
    assert (tmp_path / "registration/real_few-run1/model.pt").exists()
    loaded = SR.load_registration(profile, tmp_path, "real_few", torch.device("cpu"), run=1)
    for a, b in zip(loaded.state_dict().values(), nets[1].model.state_dict().values()):
        assert torch.equal(a, b)
    w0, w1 = (n.model.nets[0].state_dict()["model.0.conv.weight"] for n in nets)
    assert not torch.equal(w0, w1)
    assert SR.run_name("synthetic", 0) == "synthetic" and SR.run_name("synthetic", 2) == "synthetic-run2"
    with pytest.raises(ValueError, match="unknown regime"):
        SR.run_name("nope")


def test_regime_runs_follow_the_profile():
    profile = get_profile(
        "ci", {"registration.seeds": "3", "registration.seed_regimes": "real_few,synthetic"}
    )
    runs = R.regime_runs(profile)
    assert runs["real_few"] == 3 and runs["synthetic"] == 3 and runs["real_all"] == 1
    assert set(runs) == set(profile.registration.regimes)


def test_reconstructions_regime_reads_the_decoded_training_pairs(tmp_path):
    """The `reconstructions` regime serves recon_<case>.npz as the synthetic regime serves its pairs, and
    says what to run when they are missing."""
    from regdiff_core.store.sampling import RECONSTRUCTIONS_DIR, export_pair

    profile = get_profile("ci")
    with pytest.raises(FileNotFoundError, match="regdiff_core sample"):
        SR.regime_data(profile, tmp_path, "reconstructions")
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 2, 8, 6, 8, generator=g)
    for case, p in zip(("032", "033", "034"), probs):
        export_pair(tmp_path / RECONSTRUCTIONS_DIR, f"recon_{case}", p[0], p[1], nifti=False)
    data = SR.regime_data(profile, tmp_path, "reconstructions")
    assert (data.n_real, data.n_synthetic, len(data)) == (0, 3, 3)
    assert data.cases == ["reconstruction:032", "reconstruction:033", "reconstruction:034"]
    fixed, moving = data.batch([1])
    assert torch.equal(fixed[0], probs[1, 0].half().float()) and torch.equal(
        moving[0], probs[1, 1].half().float()
    )


def test_train_regimes_seeds_run_k_with_seed_plus_k_and_loss_rows_average_thirds(tmp_path):
    """Chapter 5's loop as one call: each regime's runs, run k seeded with seed + k (so run k equals a
    lone train_regime after seed_everything(seed + k)); loss_rows averages the middle and last thirds."""
    from regdiff_core.utils import seed_everything

    g = torch.Generator().manual_seed(0)
    fixed = (torch.rand(2, 16, 12, 16, generator=g) > 0.6).float()
    data = SR.RegimeData("real_few", ["a", "b"], fixed, torch.roll(fixed, 1, dims=1), 2, 0)
    tiny = {
        "registration.channels": "4,8,8,8,8,8",
        "registration.scale": "1.0",
        "registration.iterations": "2",
    }
    profile = get_profile(
        "ci", {**tiny, "registration.regimes": "real_few", "registration.seed_regimes": "real_few",
               "registration.seeds": "2"},
    )  # fmt: skip
    trained = SR.train_regimes(
        profile, tmp_path / "all", torch.device("cpu"), 7, data={"real_few": data}, progress=False
    )
    assert list(trained) == [("real_few", 0), ("real_few", 1)]
    seed_everything(8)
    alone = SR.train_regime(profile, "real_few", tmp_path / "alone", torch.device("cpu"), data=data, run=1,
                            progress=False)  # fmt: skip
    for a, b in zip(alone.model.state_dict().values(), trained["real_few", 1].model.state_dict().values()):
        assert torch.equal(a, b)

    class Run:  # what loss_rows reads of a run
        def __init__(self, losses):
            self.history, self.n_pairs, self.seconds = [{"loss": v} for v in losses], 3, 1.5

    rows = R.loss_rows({("synthetic", 1): Run([9.0, 8.0, 4.0, 2.0, 1.0, 3.0])}, seed=10, third=2)
    assert rows == [
        {
            "regime": "synthetic",
            "seed": 11,
            "pairs": 3,
            "middle third": 3.0,
            "last third": 2.0,
            "seconds": 1.5,
        }
    ]
