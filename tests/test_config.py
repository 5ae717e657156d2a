"""Profiles: the paper profile matches PAPER.md; overrides are typed and typos are refused."""

import dataclasses

import pytest

from regdiff_core.config import CANONICAL_SHAPE, PROFILES, STAGES, ConfigError, get_profile


def test_paper_profile_is_the_paper():
    p = get_profile("paper")
    assert p.data.shape == CANONICAL_SHAPE == (256, 208, 256)
    assert p.vqae.channels == (48, 48, 64, 64, 128, 192, 256, 384)
    assert p.vqae.strides == (1, 2, 1, 2, 1, 2, 1, 2)
    assert (p.vqae.codebook_size, p.vqae.embed_dim, p.vqae.beta) == (1024, 384, 0.25)
    assert (p.vqae.patch_size, p.vqae.batch_size, p.vqae.lr) == (128, 8, 5e-4)
    assert p.vqae.iterations == 336000 // 8
    assert (p.diffusion.n_layers, p.diffusion.width, p.diffusion.n_heads, p.diffusion.ff) == (
        12,
        512,
        16,
        1024,
    )
    assert (p.diffusion.T, p.diffusion.lr, p.diffusion.warmup, p.diffusion.iterations) == (
        256,
        1e-4,
        500,
        15000,
    )
    assert (p.sampling.n_pairs, p.sampling.steps, p.sampling.temperature) == (256, 256, 0.9)
    assert p.registration.channels == (8, 16, 32, 64, 64, 64)
    assert p.registration.strides == (2, 2, 1, 2, 1)
    assert (p.registration.tanh_scale, p.registration.ss_steps, p.registration.smooth_weight) == (
        0.35,
        12,
        0.5,
    )
    assert (p.registration.lr, p.registration.scale, p.registration.n_few) == (0.015, 0.5, 10)
    assert (p.evaluation.tta_iterations, p.evaluation.tta_lr) == (50, 0.005)


def test_every_profile_has_every_stage_and_token_grid_divides():
    for name, p in PROFILES.items():
        assert p.name == name
        for stage in STAGES:
            assert dataclasses.is_dataclass(getattr(p, stage))
        down = 1
        for s in p.vqae.strides:
            down *= s
        assert all(n % down == 0 for n in p.data.shape), (name, p.data.shape, down)


def test_ci_is_smaller_than_paper():
    ci, paper = get_profile("ci"), get_profile("paper")
    assert all(c < p for c, p in zip(ci.data.shape, paper.data.shape))
    assert ci.vqae.iterations < paper.vqae.iterations
    assert ci.registration.n_few < len(ci.data.train_cases)


def test_overrides_are_typed():
    overrides = {"vqae.iterations": "7", "vqae.amp": "true", "registration.channels": "4,8"}
    p = get_profile("ci", {**overrides, "registration.strides": "2"})
    assert p.vqae.iterations == 7 and p.vqae.amp is True and p.registration.channels == (4, 8)
    assert p.registration.strides == (2,)
    assert get_profile("ci").vqae.iterations != 7  # the named profile itself is untouched


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("nope", None, "unknown profile 'nope'"),
        ("ci", {"vqae.iteratoins": 3}, "has no field 'iteratoins'"),
        ("ci", {"vq.iterations": 3}, "stage one of"),
        ("ci", {"vqae.iterations": "many"}, "cannot read 'many' as int"),
    ],
)
def test_bad_names_raise(name, overrides, match):
    with pytest.raises(ConfigError, match=match):
        get_profile(name, overrides)


def test_case_lists_from_the_command_line():
    # None defaults (paper, colab) read as case lists; ids normalised to three digits; "all" / "none" → None
    p = get_profile("paper", {"data.train_cases": "032,033", "data.test_cases": "all"})
    assert p.data.train_cases == ("032", "033") and p.data.test_cases is None
    p = get_profile("colab", {"data.test_cases": "2, 8,104", "data.train_cases": "none"})
    assert p.data.test_cases == ("002", "008", "104") and p.data.train_cases is None
    assert get_profile("ci", {"data.test_cases": "All"}).data.test_cases is None
    # other None-able fields keep their own type; "none" resets them
    p = get_profile("ci", {"diffusion.ema": "0.99"})
    assert p.diffusion.ema == 0.99 and get_profile("ci", {"diffusion.ema": "none"}).diffusion.ema is None
    with pytest.raises(ConfigError, match="cannot read 'fast' as float"):
        get_profile("ci", {"diffusion.ema": "fast"})
    # a field that is not None-able does not take "none"
    with pytest.raises(ConfigError, match="cannot read 'none' as int"):
        get_profile("ci", {"vqae.iterations": "none"})
