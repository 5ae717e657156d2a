"""Chapter 2: the quantiser, the paired VQ-AE's shapes and parameter count, training, resume and I/O."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from regdiff_core import store, vqae
from regdiff_core.config import VQAEConfig, get_profile
from regdiff_core.utils import count_parameters

# A toy VQ-AE: 2 down-samplings (×4), 8-dim codes, 16 codes. Builds and steps in milliseconds.
TINY = VQAEConfig(
    channels=(4, 8),
    strides=(2, 2),
    codebook_size=16,
    embed_dim=8,
    patch_size=16,
    batch_size=2,
    lr=5e-3,
    iterations=4,
    amp=False,
    ckpt_every=2,
    log_every=1,
    dead_code_restart=True,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster, and far faster when cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quantiser(codes, beta=0.25, legacy_beta=True):
    q = vqae.VectorQuantizer(len(codes), len(codes[0]), beta=beta, legacy_beta=legacy_beta)
    q.embedding.weight.data = torch.tensor(codes, dtype=torch.float32)
    return q


def _tubes(n: int, shape=(16, 16, 16), seed=0) -> torch.Tensor:
    """(n, 2, *shape) uint8 pairs: straight tubes of radius ~1.5 voxels; moving = fixed shifted by one voxel."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"), -1
    )
    out = torch.zeros(n, 2, *shape, dtype=torch.uint8)
    for i in range(n):
        for _ in range(3):
            p = torch.rand(3, generator=g) * torch.tensor(shape, dtype=torch.float32)
            d = torch.nn.functional.normalize(torch.randn(3, generator=g), dim=0)
            r = grid - p
            dist = (r - (r @ d)[..., None] * d).norm(dim=-1)  # distance to the line p + s·d
            out[i, 0] |= (dist < 1.5).to(torch.uint8)
    out[:, 1] = torch.roll(out[:, 0], shifts=1, dims=-1)
    return out


# ------------------------------------------------------------------------------------------------
# Quantiser
# ------------------------------------------------------------------------------------------------


def test_nearest_code_assignment_by_hand():
    q = _quantiser([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    # z_e (1, 2, 5): five 2-vectors along the last axis
    points = torch.tensor([[0.1, 0.1], [0.9, -0.2], [0.2, 0.7], [3.0, 3.1], [0.6, 0.0]])
    z_e = points.t().reshape(1, 2, 5)
    out = q(z_e)
    assert out.indices.tolist() == [[0, 1, 2, 3, 1]]
    codes = q.embedding.weight[out.indices[0]]  # (5, 2)
    assert torch.equal(out.z_q[0].t(), codes)  # the forward value is the code itself


def test_straight_through_gradient_and_loss_gradients_by_hand():
    # one code e = 0 and one vector z = (1, 2): L = (1 + β) · mean((z − e)²) = 1.25 · 2.5 = 3.125
    q = _quantiser([[0.0, 0.0]])
    z = torch.tensor([1.0, 2.0]).reshape(1, 2, 1).requires_grad_()
    out = q(z)
    assert out.loss.item() == pytest.approx(3.125)
    w = torch.tensor([3.0, -7.0]).reshape(1, 2, 1)
    (out.z_q * w).sum().backward(retain_graph=True)
    assert torch.equal(z.grad, w)  # dz_q/dz_e = identity
    assert q.embedding.weight.grad is None or not q.embedding.weight.grad.any()  # z_q sends nothing to e

    # legacy (seed): dL/dz = 2(z − e)/2 = z,  dL/de = β·2(e − z)/2 = −β z
    z.grad = None
    out.loss.backward()
    assert z.grad.flatten().tolist() == pytest.approx([1.0, 2.0])
    assert q.embedding.weight.grad[0].tolist() == pytest.approx([-0.25, -0.5])

    # van den Oord: dL/dz = β z,  dL/de = −z
    q = _quantiser([[0.0, 0.0]], legacy_beta=False)
    z = torch.tensor([1.0, 2.0]).reshape(1, 2, 1).requires_grad_()
    q(z).loss.backward()
    assert z.grad.flatten().tolist() == pytest.approx([0.25, 0.5])
    assert q.embedding.weight.grad[0].tolist() == pytest.approx([-1.0, -2.0])


def test_usage_and_perplexity_by_hand():
    q = _quantiser([[0.0], [1.0], [2.0], [3.0]])
    q.train()
    q(torch.tensor([0.0, 0.1, 1.0, 0.9]).reshape(1, 1, 4))  # codes 0, 0, 1, 1
    s = q.stats()
    assert s.used == 2 and s.perplexity == pytest.approx(2.0)  # p = (½, ½, 0, 0) → exp(ln 2)
    q(torch.tensor([2.0, 2.1, 3.0, 3.2]).reshape(1, 1, 4))  # codes 2, 2, 3, 3: now uniform
    assert q.stats().used == 4 and q.stats().perplexity == pytest.approx(4.0)
    q.eval()
    q(torch.tensor([0.0]).reshape(1, 1, 1))  # eval passes are not counted
    assert q.usage.tolist() == [2, 2, 2, 2]
    q.reset_usage()
    assert q.stats().used == 0 and math.isnan(q.stats().perplexity)


def test_dead_code_restart_moves_only_dead_codes_onto_encoder_outputs():
    torch.manual_seed(0)
    q = _quantiser([[0.0, 0.0], [100.0, 100.0], [-100.0, 50.0], [0.5, 0.5]])
    q.train()
    z = torch.randn(1, 2, 6, 5) * 0.1  # all near the origin: only codes 0 and 3 can win
    out = q(z)
    assert set(out.indices.unique().tolist()) <= {0, 3}
    alive = out.indices.unique().tolist()
    before = q.embedding.weight.detach().clone()
    assert q.restart_dead_codes() == 4 - len(alive)
    after = q.embedding.weight.detach()
    z_vectors = z.movedim(1, -1).reshape(-1, 2)
    for k in range(4):
        if k in alive:
            assert torch.equal(after[k], before[k])
        else:  # a restarted code sits exactly on one of the encoder outputs of the batch
            assert (z_vectors == after[k]).all(1).any(), k
    # nothing is dead after a window where every code was used
    q.reset_usage()
    q.usage += 1
    assert q.restart_dead_codes() == 0


def test_dead_code_restart_is_a_no_op_before_any_data():
    q = _quantiser([[0.0], [1.0]])
    assert q.restart_dead_codes() == 0


# ------------------------------------------------------------------------------------------------
# The paired VQ-AE
# ------------------------------------------------------------------------------------------------


def test_paper_profile_has_the_seeds_10_25_million_parameters():
    cfg = get_profile("paper").vqae
    assert cfg.channels == (48, 48, 64, 64, 128, 192, 256, 384) and cfg.strides == (1, 2, 1, 2, 1, 2, 1, 2)
    assert (cfg.codebook_size, cfg.embed_dim, cfg.beta) == (1024, 384, 0.25)
    model = vqae.build_vqae(cfg)
    assert round(count_parameters(model.autoencoder) / 1e6, 2) == 10.25
    assert count_parameters(model.quantiser) == 1024 * 384
    assert model.downsampling == 16 and model.grid_shape((256, 208, 256)) == (16, 13, 16)


def test_ci_profile_gives_the_papers_token_grid():
    profile = get_profile("ci")
    model = vqae.build_vqae(profile.vqae).eval()
    assert model.grid_shape(profile.data.shape) == (16, 13, 16)
    x = (torch.rand(1, 2, *profile.data.shape) > 0.95).float()
    tokens = model.encode(x)
    assert tokens.shape == (1, 16, 13, 16) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < profile.vqae.codebook_size
    probs = model.decode(tokens)
    assert probs.shape == (1, 2, *profile.data.shape) and probs.dtype == torch.float32
    assert 0 <= float(probs.min()) and float(probs.max()) <= 1


def test_forward_in_eval_mode_equals_encode_then_decode():
    torch.manual_seed(0)
    model = vqae.build_vqae(TINY).eval()
    x = _tubes(2).float()
    out = model(x)
    tokens = model.encode(x)
    assert torch.equal(out.tokens, tokens)
    torch.testing.assert_close(out.logits, model.decode_logits(tokens))
    torch.testing.assert_close(vqae.vessel_probabilities(out.logits), model.decode(tokens))


def test_two_dimensional_track_works_with_the_same_components():
    cfg = dataclasses.replace(TINY, spatial_dims=2)
    model = vqae.build_vqae(cfg)
    x = torch.rand(3, 2, 32, 24)
    assert model.encode(x).shape == (3, 8, 6)
    assert model.decode(model.encode(x)).shape == (3, 2, 32, 24)
    loss = vqae.paired_cross_entropy(model(x).logits, (x > 0.5).float(), torch.tensor([1.0, 2.5]))
    loss.backward()
    assert vqae.random_affine(x, 0.05).shape == x.shape
    assert vqae.sample_patches(x, 2, 16).shape == (2, 2, 16, 16)


def test_shapes_that_do_not_divide_are_refused():
    model = vqae.build_vqae(TINY)
    with pytest.raises(ValueError, match="divisible by 4"):
        model.encode(torch.zeros(1, 2, 16, 18, 16))
    with pytest.raises(ValueError, match=r"\(B, 2"):
        model.encode(torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.decode(torch.full((1, 4, 4, 4), 16))


def test_vessel_probabilities_are_the_two_heads_softmax():
    logits = torch.zeros(1, 4, 1, 1, 1)
    logits[0, 1] = math.log(3.0)  # fixed: P(vessel) = 3 / (1 + 3)
    logits[0, 2] = math.log(4.0)  # moving: P(vessel) = 1 / (4 + 1)
    assert vqae.vessel_probabilities(logits).flatten().tolist() == pytest.approx([0.75, 0.2])


# ------------------------------------------------------------------------------------------------
# Training pieces
# ------------------------------------------------------------------------------------------------


def test_paired_cross_entropy_by_hand():
    # two voxels; fixed targets (0, 1), moving targets (1, 1); logits (0, 0) then (0, ln 3) in both heads
    logits = torch.zeros(1, 4, 2)
    logits[0, 1, 1] = logits[0, 3, 1] = math.log(3.0)
    x = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    w = torch.tensor([1.0, 2.5])
    ln2, ln43 = math.log(2.0), math.log(4 / 3)  # −log ½, −log ¾
    ce_fixed = (1.0 * ln2 + 2.5 * ln43) / (1.0 + 2.5)  # weighted mean: Σ w_y ℓ / Σ w_y
    ce_moving = (2.5 * ln2 + 2.5 * ln43) / 5.0
    assert vqae.paired_cross_entropy(logits, x, w).item() == pytest.approx(0.5 * ce_fixed + 0.5 * ce_moving)


def test_patches_come_from_one_place_in_both_volumes():
    torch.manual_seed(0)
    fixed = torch.arange(2 * 10 * 9 * 8, dtype=torch.float32).reshape(2, 10, 9, 8)
    volumes = torch.stack((fixed, fixed + 0.5), 1)  # (2, 2, 10, 9, 8)
    patches = vqae.sample_patches(volumes, 5, 6)
    assert patches.shape == (5, 2, 6, 6, 6)
    assert torch.equal(patches[:, 1] - patches[:, 0], torch.full((5, 6, 6, 6), 0.5))
    for p in patches:
        n, i, j, k = (int(v) for v in torch.nonzero(fixed == p[0, 0, 0, 0])[0])
        assert torch.equal(p[0], fixed[n, i : i + 6, j : j + 6, k : k + 6])
    assert vqae.sample_patches(volumes, 1, 128).shape == (1, 2, 10, 9, 8)  # clipped to the volume


def test_random_affine_with_zero_noise_is_the_identity_and_keeps_masks_binary():
    x = _tubes(2).float()
    assert torch.equal(vqae.random_affine(x, 0.0), x)
    torch.manual_seed(0)
    y = vqae.random_affine(x, 0.05)
    assert set(y.unique().tolist()) <= {0.0, 1.0} and not torch.equal(y, x)


def test_baselines_by_hand():
    x = torch.zeros(1, 2, 4, 4, 4)
    x[0, 0, :2, :2, :2] = 1  # one full 2³ block: pooling by 2 keeps it exactly
    x[0, 1, 0, 0, 0] = 1  # a lone voxel: its block mean is 1/8 < ½, so pooling loses it
    b = vqae.baseline_dice(x, 2)
    # all-vessel: 2·|T| / (|volume| + |T|)
    assert b.all_vessel[0].tolist() == pytest.approx([2 * 8 / (64 + 8), 2 * 1 / (64 + 1)])
    assert b.pooled[0].tolist() == [1.0, 0.0]


def test_training_resumes_exactly_with_dead_code_restarts(tmp_path):
    volumes = _tubes(3)
    torch.manual_seed(0)
    ref = vqae.train_vqae(vqae.build_vqae(TINY), volumes, TINY, torch.device("cpu"), progress=False)

    torch.manual_seed(0)
    part = vqae.train_vqae(
        vqae.build_vqae(TINY),
        volumes,
        TINY,
        torch.device("cpu"),
        out_dir=tmp_path,
        iterations=2,
        progress=False,
    )
    assert len(part.history) == 2
    torch.manual_seed(1)  # a different init and RNG: only the checkpoint can make the runs agree
    res = vqae.train_vqae(
        vqae.build_vqae(TINY), volumes, TINY, torch.device("cpu"), out_dir=tmp_path, progress=False
    )
    assert res.resumed_from == 2
    assert [r["loss"] for r in res.history] == [r["loss"] for r in ref.history]
    # cosine warm restarts, T_0 = ⌈4 / 7⌉ = 1, T_mult = 2: cycles of 1, 2, 4 steps → lr₀, lr₀, ½·lr₀, lr₀
    assert [r["lr"] for r in ref.history] == pytest.approx([5e-3, 5e-3, 2.5e-3, 5e-3])
    assert sum(r["restarted"] for r in ref.history) > 0  # the restarts did happen, and were repeated
    assert [r["restarted"] for r in res.history] == [r["restarted"] for r in ref.history]
    for (k, p), q in zip(res.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.equal(p, q), k
    assert (tmp_path / "history.csv").exists() and (tmp_path / "checkpoint.pt").exists()


def test_a_run_stopped_early_is_the_start_of_the_full_run_and_its_snapshot(tmp_path):
    """Chapter 2's comparison: stop_after=k keeps the full schedule, snapshot_at=k saves the full run at k."""
    cfg = dataclasses.replace(TINY, iterations=8)  # T_0 = ⌈8 / 7⌉ = 2: a 3-step run would have T_0 = 1
    volumes = _tubes(3)
    torch.manual_seed(0)
    full = vqae.train_vqae(
        vqae.build_vqae(cfg), volumes, cfg, torch.device("cpu"), out_dir=tmp_path / "full", snapshot_at=3,
        progress=False,
    )  # fmt: skip
    torch.manual_seed(0)
    short = vqae.train_vqae(
        vqae.build_vqae(cfg), volumes, cfg, torch.device("cpu"), out_dir=tmp_path / "short", stop_after=3,
        progress=False,
    )  # fmt: skip
    assert len(full.history) == 8 and len(short.history) == 3
    assert short.history == full.history[:3]  # losses, lr (the 8-step schedule) and codebook counts
    assert [r["lr"] for r in short.history] == pytest.approx([5e-3, 2.5e-3, 5e-3])
    snap = torch.load(store.vqae.snapshot_path(tmp_path / "full", 3), weights_only=True)["weights"]["model"]
    for (k, p), q in zip(short.model.state_dict().items(), snap.values()):
        assert torch.equal(p, q), k
    # the snapshot is step 3, not the end of the run
    assert any(not torch.equal(p, q) for p, q in zip(full.model.state_dict().values(), snap.values()))
    assert not store.vqae.snapshot_path(tmp_path / "short", 3).exists()


def test_training_beats_the_trivial_baseline_on_tubes():
    # a quality threshold, not just "it runs": 60 steps on 16³ tube pairs, judged on unseen pairs
    cfg = dataclasses.replace(
        TINY, channels=(8, 16), codebook_size=32, embed_dim=16, batch_size=4, iterations=60, log_every=20
    )
    torch.manual_seed(0)
    res = vqae.train_vqae(vqae.build_vqae(cfg), _tubes(8), cfg, torch.device("cpu"), progress=False)
    held_out = _tubes(4, seed=1)
    rec = vqae.reconstruct(res.model, held_out, torch.device("cpu"))
    base = vqae.baseline_dice(held_out, res.model.downsampling)
    assert res.history[-1]["loss"] < 0.5 * res.history[0]["loss"]
    best_baseline = max(base.all_vessel.mean(), base.pooled.mean())
    assert rec.dice.mean() > best_baseline + 0.25, (rec.dice.mean(), base)
    assert res.params == count_parameters(res.model.autoencoder)


def test_save_load_and_tokens_round_trip(tmp_path):
    profile = get_profile("ci").replace({f"vqae.{k}": v for k, v in dataclasses.asdict(TINY).items()})
    with pytest.raises(FileNotFoundError, match="train-vqae"):
        store.vqae.load_vqae(profile, tmp_path, "cpu")
    with pytest.raises(FileNotFoundError, match="encode"):
        store.vqae.load_tokens(tmp_path)
    torch.manual_seed(0)
    model = vqae.build_vqae(profile.vqae)
    model.quantiser.embedding.weight.data.normal_()  # spread the codes so tokens differ
    store.vqae.save_vqae(model, store.vqae.model_path(tmp_path))
    loaded = store.vqae.load_vqae(profile, tmp_path, torch.device("cpu"))
    assert not loaded.training
    x = _tubes(2).float()
    tokens = loaded.encode(x)
    assert torch.equal(tokens, model.eval().encode(x))

    store.vqae.save_tokens(vqae.Tokens(tokens, ["032", "033"], (4, 4, 4), 16), tmp_path)
    back = store.vqae.load_tokens(tmp_path)
    assert torch.equal(back.tokens, tokens) and back.tokens.dtype == torch.long
    assert back.cases == ["032", "033"] and back.grid == (4, 4, 4) and back.codebook_size == 16

    # the network is built from the file's config: under a profile of another VQ-AE it loads as saved
    other = profile.replace({"vqae.codebook_size": 32, "vqae.channels": (8, 16), "vqae.embed_dim": 16})
    again = store.vqae.load_vqae(other, tmp_path, "cpu")
    assert again.cfg == profile.vqae and again.codebook_size == 16
    assert torch.equal(again.encode(x), tokens)


def test_token_stats_by_hand():
    tokens = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])  # p = (¼, ¼, ½): H = 1.5 ln 2
    s = vqae.token_stats(tokens, 8)
    assert s.used == 3 and s.perplexity == pytest.approx(2**1.5)


def test_cli_train_then_encode(tmp_path, monkeypatch, capsys):
    from regdiff_core import cli, data, store

    def fake_load_pairs(profile, work_dir, split):  # tube pairs instead of chapter 1's prepared data
        v = _tubes(3 if split == "train" else 2, seed=0 if split == "train" else 1)
        cases = ["032", "033", "034"] if split == "train" else ["104", "108"]
        return data.PairSet(cases=cases, fixed=v[:, 0], moving=v[:, 1], spacing=torch.ones(len(cases), 3))

    monkeypatch.setattr(store.data, "load_pairs", fake_load_pairs)
    tiny = ["vqae.channels=4,8", "vqae.strides=2,2", "vqae.embed_dim=8", "vqae.codebook_size=16"]
    tiny += ["vqae.iterations=3", "vqae.patch_size=16", "vqae.batch_size=2", "vqae.log_every=1"]
    common = ["--profile", "ci", "--work-dir", str(tmp_path), "--device", "cpu"]
    common += [arg for item in tiny for arg in ("--set", item)]
    assert cli.main(["train-vqae", *common]) == 0
    assert "train-vqae: 3 steps" in capsys.readouterr().out
    assert (tmp_path / "vqae" / "model.pt").exists() and (tmp_path / "vqae" / "history.csv").exists()
    assert cli.main(["encode", *common]) == 0
    assert "3 pairs → tokens (3, 4, 4, 4)" in capsys.readouterr().out
    tokens = store.vqae.load_tokens(tmp_path)
    assert tokens.cases == ["032", "033", "034"] and tokens.grid == (4, 4, 4) and tokens.codebook_size == 16


def test_encode_accepts_uint8_masks():
    model = vqae.build_vqae(TINY).eval()
    x = _tubes(1)
    assert torch.equal(model.encode(x), model.encode(x.float()))


def test_nearest_code_stays_fp32_under_autocast():
    # On CUDA, encode_volumes runs under fp16 autocast; the code distances must still be fp32, or
    # near-ties flip tokens. CPU bf16 autocast rounds the same matmul: the assignment must not change.
    torch.manual_seed(0)
    vq = vqae.VectorQuantizer(codebook_size=128, embed_dim=64)
    z = torch.randn(4000, 64)
    exact = vq.nearest(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vq.nearest(z), exact)


def test_motion_kept_is_full_for_a_copy_and_zero_for_an_average():
    # two 1D "scans" on 8 voxels: fixed vessels at 0–3, moving shifted by 2 (2–5)
    f = torch.zeros(1, 8, dtype=torch.uint8)
    m = torch.zeros(1, 8, dtype=torch.uint8)
    f[0, 0:4] = 1
    m[0, 2:6] = 1
    x = torch.stack((f, m), 1)  # (1, 2, 8)
    # Dice(f, m) = 2·2 / (4 + 4) = 0.5
    copy = vqae.motion_kept(x, x.float())
    assert copy.pair_inputs.item() == pytest.approx(0.5) and copy.pair_recon.item() == pytest.approx(0.5)
    assert copy.contrast_recon.item() == pytest.approx(0.5) and copy.kept == pytest.approx(1.0)
    # both scans decoded as the same union 0–5: Dice(u, f) = Dice(u, m) = 2·4 / (6 + 4) → contrast 0
    union = ((f + m) > 0).float()
    same = vqae.motion_kept(x, torch.stack((union, union), 1))
    assert same.pair_recon.item() == pytest.approx(1.0)
    assert same.contrast_recon.item() == pytest.approx(0.0) and same.kept == pytest.approx(0.0)
    # swapped volumes (fixed decoded as moving) give the negative contrast
    assert vqae.motion_kept(x, x.flip(1).float()).contrast_recon.item() == pytest.approx(-0.5)


# --- the paper's own tokens --------------------------------------------------------------------------------


def test_codebook_usage_by_hand():
    # grid 0: codes 0,0,1,1 (2 used, perplexity 2); grid 1: 3,3,3,3 (1 used, perplexity 1)
    # pooled: counts (2, 2, 0, 4) of 8 → p = (¼, ¼, ½), H = 1.5 bits, perplexity 2^1.5
    t = vqae.Tokens(torch.tensor([[0, 0, 1, 1], [3, 3, 3, 3]]).view(2, 1, 2, 2), ["a", "b"], (1, 2, 2), 4)
    row = vqae.codebook_usage(t, "toy")
    assert (row["codes used"], row["share used (%)"], row["lowest code"], row["highest code"]) == (
        3,
        75,
        0,
        3,
    )
    assert row["entropy (bits)"] == pytest.approx(1.5)
    assert row["perplexity"] == pytest.approx(2**1.5)
    assert row["codes used per grid (mean)"] == 1.5 and row["perplexity per grid (mean)"] == pytest.approx(
        1.5
    )


def test_paper_tokens_are_97_grids_with_the_documented_statistics(mirror_dir):
    """The release's lung250_3d_vqae_model_dilated.pth: 72 of 1024 codes (12–1001), pooled perplexity ≈ 35.7."""
    tokens = store.vqae.load_paper_tokens(mirror_dir.parent)
    assert tokens.tokens.shape == (97, 16, 13, 16) and tokens.codebook_size == 1024
    raw = torch.load(mirror_dir / store.vqae.PAPER_TOKENS_FILE, map_location="cpu", weights_only=True)
    assert torch.equal(tokens.tokens[5].flatten(), raw[5].long())  # C order: reshape, no permutation
    row = vqae.codebook_usage(tokens, "paper")
    assert (row["codes used"], row["lowest code"], row["highest code"]) == (72, 12, 1001)
    assert row["perplexity"] == pytest.approx(35.7, abs=0.05)


def test_paper_tokens_missing_or_wrong_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_download unleashing-registration"):
        store.vqae.load_paper_tokens(tmp_path)
    path = store.vqae.paper_tokens_path(tmp_path)
    path.parent.mkdir(parents=True)
    torch.save([torch.zeros(3328, dtype=torch.int16), torch.zeros(3327, dtype=torch.int16)], path)
    with pytest.raises(ValueError, match=r"lung250_3d_vqae_model_dilated.pth: entries \[1\]"):
        store.vqae.load_paper_tokens(tmp_path)
    torch.save([torch.full((3328,), 1024, dtype=torch.int16)], path)
    with pytest.raises(ValueError, match="outside"):
        store.vqae.load_paper_tokens(tmp_path)
