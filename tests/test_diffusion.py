"""Chapter 3: the masking schedule, the loss weighting, the sampler, the denoiser's size, and training."""

import dataclasses
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from regdiff_core import diffusion as D
from regdiff_core import store
from regdiff_core.config import DiffusionConfig, get_profile
from regdiff_core.diffusion import (
    build_denoiser,
    fill_in,
    q_sample,
    sample_t,
    sample_tokens,
    split_tokens,
    token_grid,
    unmask_probability,
    weighted_elbo_loss,
)
from regdiff_core.utils import count_parameters
from regdiff_core.vqae import Tokens

TINY = DiffusionConfig(n_layers=1, width=16, n_heads=2, ff=32, T=16, warmup=5, lr=3e-3, batch_size=4,
                       iterations=40, amp=False, ckpt_every=20, log_every=10)  # fmt: skip


class StubDenoiser(nn.Module):
    """Returns fixed logits ``base`` (K,) everywhere, or, with ``by_call``, a one-hot on token (call index)."""

    def __init__(self, grid, codebook_size, base=None, by_call=False, T=16):
        super().__init__()
        self.grid, self.codebook_size, self.n_tokens = tuple(grid), codebook_size, math.prod(grid)
        self.mask_id = codebook_size
        self.cfg = dataclasses.replace(TINY, T=T)
        self.dummy = nn.Parameter(torch.zeros(()))
        self.base = base if base is not None else torch.zeros(codebook_size)
        self.by_call, self.calls, self.inputs = by_call, 0, []

    def forward(self, x_t):
        self.inputs.append(x_t.clone())
        B, N = x_t.shape
        if self.by_call:
            logits = torch.full((B, N, self.codebook_size), -1e4)
            logits[..., self.calls % self.codebook_size] = 0.0
        else:
            logits = self.base.expand(B, N, -1).clone()
        self.calls += 1
        return logits


def test_paper_denoiser_has_28_0_million_parameters():
    paper = get_profile("paper")
    grid = token_grid(paper)
    assert grid == (16, 13, 16)
    net = build_denoiser(paper.diffusion, paper.vqae.codebook_size, grid)
    d, K, N, ff, L = 512, 1024, 3328, 1024, 12
    # embeddings + L × (attention in/out projections + feed-forward + 2 LayerNorms) + final LayerNorm + head
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d
    expected = (K + 1) * d + N * d + L * per_layer + 2 * d + d * K
    assert count_parameters(net) == expected == 27_987_456
    assert round(count_parameters(net) / 1e6, 1) == 28.0
    # the seed: nn.TransformerEncoderLayer's default dropout 0.1, post-norm, no EMA, the loss / (ln 2 · K · N)
    assert paper.diffusion.dropout == 0.1 and not paper.diffusion.pre_norm and paper.diffusion.ema is None
    assert paper.diffusion.loss_norm == "seed"
    drops = [m.p for m in net.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 12 * 3 and set(drops) == {0.1}  # per layer: after attention, inside and after FF
    assert nn.TransformerEncoderLayer(8, 2).dropout.p == 0.1  # PyTorch's default, which the seed keeps


def test_layers_start_from_independent_weights_and_embeddings_from_n0_002():
    torch.manual_seed(0)
    net = build_denoiser(dataclasses.replace(TINY, n_layers=2, width=64, n_heads=4), 128, (16, 13, 16))
    w0 = net.transformer.layers[0].linear1.weight
    w1 = net.transformer.layers[1].linear1.weight
    assert not torch.equal(w0, w1)
    assert abs(float(net.position_embedding.weight.detach().std()) - 0.02) < 0.001
    assert abs(float(net.head.weight.detach().std()) - 0.02) < 0.002


def test_training_times_and_masks_follow_the_schedule():
    g = torch.Generator().manual_seed(0)
    t = sample_t(20000, 8, generator=g)
    assert set((t * 8).round().long().tolist()) == set(range(1, 9))  # t ∈ {1/8, …, 1}, never 0
    x_0 = torch.randint(0, 10, (4, 50000), generator=g)
    t = torch.tensor([0.125, 0.5, 0.75, 1.0])
    x_t, mask = q_sample(x_0, t, mask_id=10, generator=g)
    frac = mask.float().mean(1)
    assert torch.allclose(frac, t, atol=0.01)  # binomial sd ≤ 0.0023
    assert mask[3].all()
    assert torch.equal(x_t[mask], torch.full_like(x_t[mask], 10))
    assert torch.equal(x_t[~mask], x_0[~mask])


def test_sampler_schedule_unmasks_each_token_at_a_uniform_step():
    for S in (1, 2, 5, 16):
        survive = Fraction(1)
        for i in range(S):
            p = Fraction(1, S - i)
            assert unmask_probability(i, S) == float(p)
            # P(unmasked exactly at step i) = P(survived so far) · 1/(S − i) = 1/S
            assert survive * p == Fraction(1, S)
            survive *= 1 - p
        assert survive == 0  # nothing stays masked
    with pytest.raises(ValueError):
        unmask_probability(4, 4)


def test_weighted_elbo_loss_matches_a_hand_computed_case():
    # B = 2 grids of N = 3 tokens, K = 2 codes
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0], [0.0, 3.0]]])
    x_0 = torch.tensor([[0, 0, 1], [1, 0, 1]])
    mask = torch.tensor([[True, True, False], [False, False, True]])
    t = torch.tensor([0.25, 0.5])
    # masked CE (nats): grid 0: −log ½ and −log(e²/(e²+1)); grid 1: −log(e³/(e³+1))
    ce0 = math.log(2) + math.log(1 + math.exp(-2))
    ce1 = math.log(1 + math.exp(-3))
    expected = ((1 - 0.25) * ce0 + (1 - 0.5) * ce1) / (math.log(2) * 3) / 2
    elbo = (ce0 / 0.25 + ce1 / 0.5) / (math.log(2) * 3) / 2
    out = weighted_elbo_loss(logits, x_0, mask, t)
    assert float(out.loss) == pytest.approx(expected, rel=1e-6)
    assert float(out.elbo) == pytest.approx(elbo, rel=1e-6)
    # argmax on the masked tokens: grid 0 → (tie → 0 ✓, 0 ✓); grid 1 → 1 ✓
    assert float(out.accuracy) == pytest.approx(1.0)
    # the seed's normalisation divides by ln 2 · K · N instead: K = 2 times smaller, ELBO term unchanged
    seed = weighted_elbo_loss(logits, x_0, mask, t, norm="seed")
    assert float(seed.loss) == pytest.approx(expected / 2, rel=1e-6)
    assert float(seed.elbo) == pytest.approx(elbo, rel=1e-6)
    with pytest.raises(ValueError, match="loss norm"):
        weighted_elbo_loss(logits, x_0, mask, t, norm="per-code")
    # unmasked positions do not count
    logits2 = logits.clone()
    logits2[0, 2] = torch.tensor([9.0, -9.0])
    assert float(weighted_elbo_loss(logits2, x_0, mask, t).loss) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 7, 16, 100])
def test_sampler_unmasks_every_token_for_any_number_of_steps(steps):
    grid = (3, 2, 4)
    stub = StubDenoiser(grid, 5, T=16)
    out = sample_tokens(stub, 3, steps=steps, batch_size=2, generator=torch.Generator().manual_seed(1))
    assert out.tokens.shape == (3, *grid)
    assert ((out.tokens >= 0) & (out.tokens < 5)).all()
    assert ((out.unmask_step >= 0) & (out.unmask_step < steps)).all()
    # one network call per step that unmasks something, none for the others
    distinct = sum(len(torch.unique(out.unmask_step[b : b + 2])) for b in (0, 2))
    assert out.network_calls == stub.calls == distinct
    if steps == 100:
        assert out.network_calls < steps  # 24 tokens cannot fill 100 steps


def test_sampler_writes_only_newly_unmasked_positions():
    grid = (4, 4, 2)
    stub = StubDenoiser(grid, 64, by_call=True)
    out = sample_tokens(stub, 1, steps=12, generator=torch.Generator().manual_seed(3))
    # call c predicts token c everywhere; a token keeps the value of the call that unmasked it
    steps_used = torch.unique(out.unmask_step)
    rank = torch.searchsorted(steps_used, out.unmask_step)
    assert torch.equal(out.tokens, rank)
    # the denoiser always saw the mask id exactly where nothing had been drawn yet
    for call, x_t in enumerate(stub.inputs):
        drawn_before = (out.unmask_step < steps_used[call]).flatten()
        assert torch.equal(x_t[0] != stub.mask_id, drawn_before)


def test_sampler_is_reproducible_with_a_generator():
    torch.manual_seed(0)
    net = build_denoiser(TINY, 8, (3, 3, 2)).eval()
    a = sample_tokens(net, 3, steps=6, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG must not matter
    b = sample_tokens(net, 3, steps=6, generator=torch.Generator().manual_seed(7))
    c = sample_tokens(net, 3, steps=6, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.unmask_step, b.unmask_step)
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampler_draws_from_the_temperature_scaled_categorical(temperature):
    p = torch.tensor([0.6, 0.3, 0.1])
    stub = StubDenoiser((10, 10, 10), 3, base=p.log())
    out = sample_tokens(stub, 4, steps=3, temperature=temperature, batch_size=4,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    freq = torch.bincount(out.tokens.flatten(), minlength=3).double() / out.tokens.numel()
    # softmax(log p / τ) = p^(1/τ) / Σ p^(1/τ)
    q = p.double() ** (1 / temperature)
    q /= q.sum()
    assert torch.allclose(freq, q, atol=0.02)  # 4000 draws: sd ≤ 0.008


def test_fill_in_masks_the_requested_share_and_keeps_the_rest():
    grid = (4, 5, 5)
    stub = StubDenoiser(grid, 6, base=torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0, 0.0]))
    x_0 = torch.randint(0, 6, (2, 100), generator=torch.Generator().manual_seed(0))
    x_0[:, :50] = 2
    out = fill_in(stub, x_0, 0.3, generator=torch.Generator().manual_seed(1))
    assert out.mask.sum(1).tolist() == [30, 30]
    assert torch.equal(out.x_hat[~out.mask], x_0[~out.mask])
    assert (out.x_hat[out.mask] == 2).all()
    assert out.accuracy == pytest.approx(float((x_0[out.mask] == 2).float().mean()))


def test_training_learns_saves_resumes_and_reloads(tmp_path):
    """A tiny denoiser learns a grid whose token is a function of position (a few seconds on a CPU)."""
    torch.manual_seed(0)
    grid = (4, 3, 4)
    pattern = torch.arange(48).remainder(6).view(1, *grid)
    tokens = Tokens(pattern.repeat(6, 1, 1, 1), [f"{i:03d}" for i in range(6)], grid, 6)
    profile = get_profile("ci")
    run = store.diffusion.train(
        profile, tmp_path, torch.device("cpu"), tokens=tokens, cfg=TINY, progress=False
    )
    losses = [row["loss"] for row in run.history]
    assert len(losses) == TINY.iterations
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5
    assert run.model_path == tmp_path / "diffusion" / "model.pt" and run.model_path.exists()
    # a rerun finds the finished checkpoint and does not train again
    again = store.diffusion.train(
        profile, tmp_path, torch.device("cpu"), tokens=tokens, cfg=TINY, progress=False
    )
    assert again.history == run.history
    loaded = store.diffusion.load_denoiser(tmp_path, torch.device("cpu"))
    x = torch.full((1, 48), loaded.mask_id)
    with torch.no_grad():
        assert torch.allclose(loaded(x), run.denoiser(x))
    # the trained model fills in a fully masked grid with the pattern
    filled = fill_in(loaded, pattern.view(1, -1), 1.0)
    assert filled.accuracy > 0.9
    # new tokens (say, a retrained VQ-AE) must not resume the old run
    other = tokens._replace(tokens=tokens.tokens.flip(-1))
    short = dataclasses.replace(TINY, iterations=2)
    fresh = store.diffusion.train(
        profile, tmp_path, torch.device("cpu"), tokens=other, cfg=short, progress=False
    )
    assert len(fresh.history) == 2


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_optimizes_the_profiles_loss_norm(tmp_path, dropout):
    """The first step's logged loss is the per-token one divided by K = 6 under ``loss_norm="seed"``
    (same seed, same batch, same weights: only the normalisation differs)."""
    grid = (4, 3, 4)
    pattern = torch.arange(48).remainder(6).view(1, *grid)
    tokens = Tokens(pattern.repeat(6, 1, 1, 1), [f"{i:03d}" for i in range(6)], grid, 6)
    first = {}
    for norm in ("per-token", "seed"):
        cfg = dataclasses.replace(TINY, iterations=1, log_every=1, dropout=dropout, loss_norm=norm)
        torch.manual_seed(0)
        run = store.diffusion.train(get_profile("ci"), tmp_path / norm, torch.device("cpu"), tokens=tokens, cfg=cfg,
                             progress=False)  # fmt: skip
        first[norm] = run.history[0]
    assert first["seed"]["loss"] == pytest.approx(first["per-token"]["loss"] / 6, rel=1e-5)
    assert first["seed"]["elbo"] == pytest.approx(first["per-token"]["elbo"], rel=1e-5)


def test_missing_checkpoint_names_the_chapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-diffusion"):
        store.diffusion.load_denoiser(tmp_path, torch.device("cpu"))


# --- the paper's own tokens --------------------------------------------------------------------------------


def test_split_tokens_holds_out_the_last_grids():
    tokens = Tokens(torch.arange(5).view(5, 1, 1, 1), list("abcde"), (1, 1, 1), 5)
    split = split_tokens(tokens, 2)
    assert split.train.tokens.flatten().tolist() == [0, 1, 2] and split.train.cases == ["a", "b", "c"]
    assert split.heldout.tokens.flatten().tolist() == [3, 4] and split.heldout.cases == ["d", "e"]
    assert split.heldout.grid == (1, 1, 1) and split.heldout.codebook_size == 5
    assert len(split_tokens(tokens, 0).heldout.tokens) == 0
    with pytest.raises(ValueError, match="heldout = 5"):
        split_tokens(tokens, 5)


def test_paper_tokens_split_is_87_for_training_and_the_last_10_held_out(mirror_dir):
    split = store.diffusion.paper_tokens(mirror_dir.parent)
    assert (len(split.train.tokens), len(split.heldout.tokens)) == (87, 10)
    assert split.heldout.cases == [f"paper_{i}" for i in range(87, 97)]
    assert split.train.codebook_size == 1024 and split.train.grid == (16, 13, 16)


def test_cli_trains_on_the_paper_tokens_apart_from_chapter_3s_denoiser(
    mirror_dir, tmp_path, capsys, one_torch_thread
):
    from regdiff_core.cli import main

    argv = ["train-diffusion", "--profile", "ci", "--tokens", "paper-release", "--heldout", "1", "--no-progress",
            "--data-dir", str(mirror_dir.parent), "--work-dir", str(tmp_path),
            "--set", "diffusion.iterations=2", "--set", "diffusion.ckpt_every=2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "96 for training, 1 held out; 72 of 1024 codes used" in out and "cannot be decoded" in out
    assert "held-out (1 grids)" in out
    assert not (tmp_path / "diffusion").exists()  # chapter 4 decodes what is there with our VQ-AE
    denoiser = store.diffusion.load_denoiser(
        tmp_path, torch.device("cpu"), path=tmp_path / store.diffusion.PAPER_TOKENS_DIR / "model.pt"
    )
    assert (denoiser.mask_id, denoiser.n_tokens) == (1024, 3328)
    with pytest.raises(SystemExit, match="needs --tokens paper-release"):
        main(["train-diffusion", "--heldout", "3", "--work-dir", str(tmp_path)])


def test_shift_volumes_moves_content_and_fills_with_zeros():
    x = torch.arange(1, 2 * 3 * 4 + 1, dtype=torch.float32).view(1, 1, 2, 3, 4)
    y = D.shift_volumes(x, (0, 1, 2))
    # voxel (i, j, k) of y is voxel (i, j - 1, k - 2) of x where that exists, else 0
    for i in range(2):
        for j in range(3):
            for k in range(4):
                expected = x[0, 0, i, j - 1, k - 2] if j >= 1 and k >= 2 else 0.0
                assert float(y[0, 0, i, j, k]) == float(expected)
    assert torch.equal(D.shift_volumes(x, (0, -1, 0))[0, 0, :, :2], x[0, 0, :, 1:])
    assert torch.equal(D.shift_volumes(x, (5, 0, 0)), torch.zeros_like(x))


def test_augment_pairs_keeps_the_originals_first_and_moves_both_volumes_together():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3, 2, 8, 6, 8, generator=g) > 0.5).float()
    out = D.augment_pairs(x, downsampling=4, flip=True, shift="axes")
    assert out.shape == (3 * 2 * 4, 2, 8, 6, 8)
    assert torch.equal(out[:3], x)  # the originals, unchanged, in order
    assert torch.equal(out[3:6], D.shift_volumes(x, (2, 0, 0)))  # half a token (4 // 2) along H
    assert torch.equal(out[12:15], x.flip(2))  # mirrored along H, the left-right axis
    assert torch.equal(out[21:24], D.shift_volumes(x.flip(2), (0, 0, 2)))
    assert len(D.augment_pairs(x, 4, flip=False, shift="all")) == 3 * 8
    assert torch.equal(D.augment_pairs(x, 4, flip=False, shift="none"), x)
    with pytest.raises(ValueError, match="augment_shift"):
        D.augment_pairs(x, 4, flip=False, shift="sideways")


def test_train_tracked_is_the_plain_run_plus_a_held_out_curve(tmp_path, capsys):
    """Stopping every 10 steps to score held-out grids leaves the run as an uninterrupted one makes it
    (same history, same weights, EMA included); the curve has one row per stop, and a rerun of the
    finished run shows the same rows, read back, without training or rescoring."""
    grid = (4, 3, 4)
    pattern = torch.arange(48).remainder(6).view(1, *grid)
    tokens = Tokens(pattern.repeat(6, 1, 1, 1), [f"{i:03d}" for i in range(6)], grid, 6)
    cfg = dataclasses.replace(TINY, ema=0.9)
    profile = dataclasses.replace(get_profile("ci"), diffusion=cfg)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    plain = store.diffusion.train(profile, tmp_path / "plain", cpu, tokens=tokens, progress=False)
    held = pattern.view(1, -1).roll(1, -1)
    torch.manual_seed(0)
    tracked = store.diffusion.train_tracked(profile, tmp_path / "tracked", cpu, held, tokens=tokens, every=10)
    assert [r["step"] for r in tracked.run.history] == list(range(1, 41))
    assert [r["loss"] for r in tracked.run.history] == [r["loss"] for r in plain.history]
    for a, b in zip(tracked.run.ema.state_dict().values(), plain.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["steps"] for r in tracked.curve] == [10, 20, 30, 40]
    assert set(tracked.curve[0]) == {"steps", "elbo", "accuracy", "ema_elbo", "ema_accuracy"}
    end = D.evaluate_loss(plain.ema, held, cfg.T, generator=torch.Generator().manual_seed(0))
    assert tracked.curve[-1]["ema_elbo"] == pytest.approx(end["elbo"])
    assert "resuming" not in capsys.readouterr().out  # the stages' own resumes stay quiet
    again = store.diffusion.train_tracked(profile, tmp_path / "tracked", cpu, held, tokens=tokens, every=10)
    assert again.curve == tracked.curve and again.run.history == tracked.run.history
