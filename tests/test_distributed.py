"""torchrun and DDP on CPUs: 2 ``gloo`` processes against one process (as MONAI's DistCall tests do).

One pair of processes is started once for the module (:func:`two_ranks`); it runs every scenario and
saves what each rank ended with, and the tests compare that with the same work done in this process:

- one training step of each stage on 2 ranks × half the batch = one step on the whole batch;
- the VQ-AE's codebooks stay identical on both ranks through dead-code restarts, its usage counts the
  whole batch, and a 2-rank run stopped and resumed continues bit for bit;
- a 2-rank ``sample`` writes the same n pairs as 1 process; a 2-rank evaluation gathers every test pair.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from regdiff_core import distributed, vqae
from regdiff_core.config import DiffusionConfig, VQAEConfig, get_profile
from regdiff_core.store import registration as SR
from regdiff_core.training import read_checkpoint

WORLD = 2
B = 4  # the global batch: 2 per rank

VQ = VQAEConfig(
    channels=(4, 8), strides=(2, 2), codebook_size=16, embed_dim=8, patch_size=16, batch_size=B, lr=5e-3,
    iterations=1, amp=False, ckpt_every=1, log_every=100, dead_code_restart=False, affine_sigma=0.0,
)  # fmt: skip
DIFF = DiffusionConfig(n_layers=1, width=16, n_heads=2, ff=32, T=16, warmup=1, lr=3e-3, batch_size=B,
                       iterations=1, amp=False, ckpt_every=1, log_every=1, dropout=0.0, ema=None)  # fmt: skip
REG = {
    "registration.channels": "4,8,8,8,8,8",
    "registration.scale": "1.0",
    "registration.iterations": "1",
    "registration.batch_size": str(B),
    "registration.ckpt_every": "1",
}
#: the VQ-AE run that restarts dead codes, and is stopped after 2 steps and resumed (ckpt every 3 steps)
VQ_RESTARTS = dataclasses.replace(
    VQ, iterations=5, log_every=2, ckpt_every=3, dead_code_restart=True, affine_sigma=0.1
)


# ------------------------------------------------------------------------------------------------
# The data every scenario uses, made alike in every process
# ------------------------------------------------------------------------------------------------


def _volumes(n=4, shape=(16, 16, 16), seed=0) -> torch.Tensor:
    """(n, 2, *shape) uint8 random blobs, moving = fixed shifted by one voxel."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, *(s // 4 for s in shape), generator=g)
    fixed = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear") > 0.55
    return torch.cat([fixed, torch.roll(fixed, 1, dims=-1)], 1).to(torch.uint8)


def _rows(full: torch.Tensor) -> torch.Tensor:
    """The rows of a batch that this process takes: all of them in one process, its share on 2 ranks."""
    ctx = distributed.context()
    if not ctx.active:
        return full
    shares = distributed.batch_shares(len(full), ctx.world_size)
    start = sum(shares[: ctx.rank])
    return full[start : start + shares[ctx.rank]]


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def vqae_step(out_dir: Path, batch_size: int = B) -> dict:
    """One VQ-AE step on the fixed batch ``_volumes()[:batch_size]`` (affine noise 0: the identity)."""
    x = _volumes().float()[:batch_size]
    cfg = dataclasses.replace(VQ, batch_size=batch_size)
    original = vqae.sample_patches
    vqae.sample_patches = lambda volumes, batch, patch: _rows(x)[:batch]
    try:
        torch.manual_seed(0)
        res = vqae.train_vqae(
            vqae.build_vqae(cfg), x, cfg, torch.device("cpu"), out_dir=out_dir, progress=False
        )
    finally:
        vqae.sample_patches = original
    return {"params": _params(res.model), "grads": _grads(res.model), "history": res.history}


def diffusion_step(out_dir: Path) -> dict:
    """One denoiser step on 4 copies of one token grid with fixed times and masks."""
    from regdiff_core import diffusion, store

    g = torch.Generator().manual_seed(1)
    grid = (2, 2, 2)
    tokens = vqae.Tokens(torch.randint(0, 8, (1, *grid), generator=g), ["a"], grid, 8)
    t_full = torch.tensor([0.25, 0.5, 0.75, 1.0])
    u_full = torch.rand(B, math.prod(grid), generator=g)
    originals = diffusion.sample_t, diffusion.q_sample

    def q_sample(x_0, t, mask_id, generator=None):
        mask = _rows(u_full) < t.unsqueeze(-1)
        return diffusion.MaskedTokens(torch.where(mask, torch.full_like(x_0, mask_id), x_0), mask)

    diffusion.sample_t = lambda batch, T, device="cpu", generator=None: _rows(t_full)
    diffusion.q_sample = q_sample
    try:
        torch.manual_seed(0)
        run = store.diffusion.train(
            get_profile("ci"),
            out_dir,
            torch.device("cpu"),
            tokens=tokens,
            cfg=DIFF,
            out_dir=out_dir,
            progress=False,
        )
    finally:
        diffusion.sample_t, diffusion.q_sample = originals
    return {"params": _params(run.denoiser), "grads": _grads(run.denoiser), "history": run.history}


class _FixedPairs:
    """Registration pairs whose every batch is the same 4 pairs (this rank's half under torchrun)."""

    def __init__(self) -> None:
        v = _volumes(shape=(16, 12, 16), seed=2).float()
        self.fixed, self.moving, self.cases, self.shape = v[:, 0], v[:, 1], list("abcd"), (16, 12, 16)

    def batch(self, index, device="cpu"):
        return _rows(self.fixed).to(device), _rows(self.moving).to(device)


def registration_step(out_dir: Path) -> dict:

    torch.manual_seed(0)
    res = SR.train_regime(
        get_profile("ci", REG), "real_all", out_dir, torch.device("cpu"), progress=False, data=_FixedPairs()
    )
    return {"params": _params(res.model), "grads": _grads(res.model), "history": res.history}


def vqae_restarts(out_dir: Path, stop_after: int | None = None) -> dict:
    """5 VQ-AE steps on random patches with dead-code restarts every 2 steps (the ranks' own streams)."""
    torch.manual_seed(0)
    model = vqae.build_vqae(VQ_RESTARTS)
    res = vqae.train_vqae(
        model,
        _volumes(),
        VQ_RESTARTS,
        torch.device("cpu"),
        out_dir=out_dir,
        stop_after=stop_after,
        progress=False,
    )
    return {"params": _params(res.model), "history": res.history, "resumed_from": res.resumed_from}


def _tiny_sampler():
    from regdiff_core.diffusion import build_denoiser

    profile = get_profile("ci")
    profile = dataclasses.replace(
        profile, sampling=dataclasses.replace(profile.sampling, steps=3, batch_size=2, export_nifti=False)
    )
    torch.manual_seed(0)
    cfg = dataclasses.replace(profile.vqae, channels=(4, 8), strides=(1, 2), embed_dim=8, codebook_size=8)
    model = vqae.build_vqae(cfg).eval()
    denoiser = build_denoiser(
        DiffusionConfig(n_layers=1, width=16, n_heads=2, ff=32, T=4, amp=False), 8, (4, 4, 4)
    )
    return profile, denoiser.eval(), model


def sample(work_dir: Path, n: int = 5) -> None:
    from regdiff_core.store.sampling import sample_to_disk

    profile, denoiser, model = _tiny_sampler()
    sample_to_disk(
        profile, work_dir, torch.device("cpu"), n=n, seed=3, progress=False, denoiser=denoiser, vqae=model
    )


def _test_set():
    """3 random test pairs (16×12×16) with 5 landmarks each, and a tiny registration network."""
    from regdiff_core.data import Landmarks, PairSet
    from regdiff_core.registration import build_registration

    g = torch.Generator().manual_seed(4)
    v = _volumes(n=3, shape=(16, 12, 16), seed=4)
    test = PairSet(["x", "y", "z"], v[:, 0], v[:, 1], torch.ones(3, 3))
    points = [torch.rand(5, 3, generator=g) * 100 for _ in range(3)]
    moved = [p + torch.randn(5, 3, generator=g) for p in points]
    landmarks = Landmarks(["x", "y", "z"], points, moved, points, moved)
    profile = get_profile("ci", {k: v for k, v in REG.items() if "channels" in k or "scale" in k})
    torch.manual_seed(0)
    return profile, build_registration(profile.registration).eval(), test, landmarks


def evaluate() -> list:
    from regdiff_core.metrics import evaluate_model

    profile, model, test, landmarks = _test_set()
    ev = distributed.evaluate_split(
        lambda t, lm: evaluate_model(
            profile, model, t, lm, name="tiny", tta_iterations=1, device=torch.device("cpu")
        ),
        test,
        landmarks,
    )
    return [(c.case, c.initial, c.net.tre, c.tta.tre) for c in ev.cases]


def quantiser_usage() -> dict:
    """Each rank quantises its own random features: the usage must count both ranks' assignments."""
    torch.manual_seed(0)
    q = vqae.VectorQuantizer(8, 4).train()
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(10 + distributed.context().rank))
    out = q(z)
    return {"indices": out.indices, "usage": q.usage.clone()}


# ------------------------------------------------------------------------------------------------
# The two processes
# ------------------------------------------------------------------------------------------------


def _worker(rank: int, root: str) -> None:
    root_path = Path(root)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{root_path / 'rendezvous'}", rank=rank, world_size=WORLD
    )
    try:
        out = {
            "vqae": vqae_step(root_path / "vqae"),
            "vqae_uneven": vqae_step(root_path / "vqae_uneven", batch_size=3),  # ranks take 2 and 1
            "diffusion": diffusion_step(root_path / "diffusion"),
            "registration": registration_step(root_path / "registration"),
            "restarts_full": vqae_restarts(root_path / "restarts_full"),
            "restarts_part": vqae_restarts(root_path / "restarts_resumed", stop_after=2),
            "restarts_resumed": vqae_restarts(root_path / "restarts_resumed"),
            "usage": quantiser_usage(),
            "evaluate": evaluate(),
        }
        sample(root_path / "sample")
        torch.save(out, root_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run every scenario on 2 gloo processes once; ``.root`` (their files) and ``.ranks`` (what each held)."""
    root = tmp_path_factory.mktemp("two_ranks")
    mp.start_processes(_worker, args=(str(root),), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return SimpleNamespace(root=root, ranks=ranks)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

#: DDP's mean of two half-batch gradients vs the full batch's gradient: the same sums in another order.
GRAD_ATOL = 1e-6
#: Parameters after one Adam step, where the gradient is well above Adam's ε = 1e-8. (Adam's first step is
#: lr·g/(|g| + ε): where |g| is of the order of ε, rounding noise in g of 1e-9 moves a weight by up to lr/4.)
PARAM_ATOL, WELL_ABOVE_EPS = 1e-6, 1e-6


def _worst(a: dict, b: dict, where: dict | None = None) -> float:
    """The largest |a − b| over all tensors (only where ``where``'s mask is True, when given)."""
    assert a.keys() == b.keys()
    out = 0.0
    for k in a:
        d = (a[k] - b[k]).abs()
        if where is not None:
            d = d[where[k]]
        out = max(out, float(d.max()) if d.numel() else 0.0)
    return out


@pytest.mark.parametrize("stage", ["vqae", "diffusion", "registration"])
def test_one_ddp_step_on_two_half_batches_is_one_step_on_the_whole_batch(
    stage, two_ranks, tmp_path, one_thread
):
    single = {"vqae": vqae_step, "diffusion": diffusion_step, "registration": registration_step}[stage](
        tmp_path
    )
    rank0, rank1 = (r[stage] for r in two_ranks.ranks)
    assert single["grads"], "the step left no gradients to compare"
    # both ranks hold the same parameters and gradients, and the gradient is the whole batch's
    assert _worst(rank0["params"], rank1["params"]) == 0.0 and _worst(rank0["grads"], rank1["grads"]) == 0.0
    grad_diff = _worst(rank0["grads"], single["grads"])
    scale = max(float(g.abs().max()) for g in single["grads"].values())
    well = {k: g.abs() > WELL_ABOVE_EPS for k, g in single["grads"].items()}
    param_diff = _worst({k: rank0["params"][k] for k in well}, {k: single["params"][k] for k in well}, well)
    print(f"\n{stage}: |Δgrad| ≤ {grad_diff:.2g} (largest |grad| {scale:.2g}), |Δparam| ≤ {param_diff:.2g}")
    assert grad_diff <= GRAD_ATOL
    assert param_diff <= PARAM_ATOL
    assert rank0["history"][0]["loss"] == pytest.approx(single["history"][0]["loss"], rel=1e-5)
    # rank 0 alone wrote the checkpoint, with both ranks' random streams
    ckpt = {"vqae": "vqae/checkpoint.pt", "diffusion": "diffusion/checkpoint.pt"}.get(
        stage, "registration/registration/real_all/checkpoint.pt"
    )
    saved = read_checkpoint(two_ranks.root / ckpt)  # the project's loader (it holds NumPy RNG states)
    assert len(saved["rng_ranks"]) == 2
    assert not torch.equal(saved["rng_ranks"][0]["torch"], saved["rng_ranks"][1]["torch"])


def test_a_batch_that_does_not_divide_is_still_the_whole_batchs_step(two_ranks, tmp_path, one_thread):
    # 3 samples over 2 ranks take 2 and 1: their gradients are weighted 2/3 and 1/3, not ½ and ½ (and the
    # class-weighted CE's denominator is the whole batch's), so the step is the 3-sample batch's
    single = vqae_step(tmp_path, batch_size=3)
    rank0, rank1 = (r["vqae_uneven"] for r in two_ranks.ranks)
    assert _worst(rank0["grads"], rank1["grads"]) == 0.0
    assert _worst(rank0["grads"], single["grads"]) <= GRAD_ATOL


def test_half_batches_differ_so_the_equivalence_is_not_trivial(two_ranks, tmp_path, one_thread):
    x = _volumes().float()
    assert not torch.equal(x[:2], x[2:])
    # and a step on the first half alone gives another gradient than the whole batch
    original = vqae.sample_patches
    vqae.sample_patches = lambda volumes, batch, patch: x[:2]
    try:
        torch.manual_seed(0)
        cfg = dataclasses.replace(VQ, batch_size=2)
        half = vqae.train_vqae(vqae.build_vqae(cfg), x, cfg, torch.device("cpu"), progress=False)
    finally:
        vqae.sample_patches = original
    diff = max(
        float((g - two_ranks.ranks[0]["vqae"]["grads"][n]).abs().max()) for n, g in _grads(half.model).items()
    )
    assert diff > 1e-4


def test_codebooks_stay_identical_through_dead_code_restarts(two_ranks):
    rank0, rank1 = (r["restarts_full"] for r in two_ranks.ranks)
    assert sum(h["restarted"] for h in rank0["history"] if "restarted" in h) > 0  # restarts did happen
    for name in rank0["params"]:
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
    assert rank0["history"] == rank1["history"]  # the logged numbers are the ranks' averages


def test_usage_counts_the_whole_batch_on_every_rank(two_ranks):
    u0, u1 = (r["usage"] for r in two_ranks.ranks)
    both = torch.cat([u0["indices"].flatten(), u1["indices"].flatten()])
    expected = torch.bincount(both, minlength=8).double()
    assert torch.equal(u0["usage"], expected) and torch.equal(u1["usage"], expected)
    assert not torch.equal(u0["indices"], u1["indices"])  # the ranks did see different features


def test_two_rank_run_resumes_bit_for_bit(two_ranks):
    for r in two_ranks.ranks:
        part, resumed, full = r["restarts_part"], r["restarts_resumed"], r["restarts_full"]
        assert len(part["history"]) == 2 and resumed["resumed_from"] == 2
        assert resumed["history"] == full["history"]
        for name in full["params"]:
            assert torch.equal(resumed["params"][name], full["params"][name]), name


def test_two_rank_sample_is_the_one_process_sample(two_ranks, tmp_path, one_thread):
    from regdiff_core.store.sampling import load_synthetic, load_synthetic_tokens

    sample(tmp_path)
    two = two_ranks.root / "sample"
    files = sorted(p.name for p in (two / "synthetic").iterdir())
    assert files == ["manifest.json"] + [f"synth_{i:04d}.npz" for i in range(1, 6)]
    assert not list((two / "synthetic").glob(".staging*"))
    tokens = load_synthetic_tokens(two)
    assert len({tuple(t.flatten().tolist()) for t in tokens}) == 5  # 5 distinct pairs
    assert torch.equal(tokens, load_synthetic_tokens(tmp_path))
    assert torch.equal(load_synthetic(two).fixed, load_synthetic(tmp_path).fixed)


def test_two_rank_evaluation_gathers_every_test_pair(two_ranks, one_thread):
    from regdiff_core.metrics import evaluate_model

    profile, model, test, landmarks = _test_set()
    single = evaluate_model(
        profile, model, test, landmarks, name="tiny", tta_iterations=1, device=torch.device("cpu")
    )
    rows = two_ranks.ranks[0]["evaluate"]
    assert [r[0] for r in rows] == [r[0] for r in two_ranks.ranks[1]["evaluate"]] == ["x", "y", "z"]
    for (case, initial, net, tta), ref in zip(rows, single.cases):
        assert case == ref.case
        assert torch.equal(initial, ref.initial) and torch.allclose(net, ref.net.tre, atol=1e-5)
        assert torch.allclose(tta, ref.tta.tre, atol=1e-5)


def test_batch_shares_and_the_note_when_the_batch_does_not_divide():
    assert distributed.batch_shares(8, 2) == [4, 4]
    assert distributed.batch_shares(8, 3) == [3, 3, 2]
    assert distributed.batch_shares(2, 4) == [1, 1, 0, 0]


def test_without_torchrun_every_helper_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.context() == distributed.Context(0, 1, 0) and distributed.is_main()
    assert distributed.init_from_env("cpu", "prepare") == "cpu"
    assert distributed.rank_batch(8) == 8 and distributed.shard([1, 2, 3]) == [1, 2, 3]
    net = torch.nn.Linear(2, 2)
    assert distributed.wrap(net) is net
    t = torch.ones(3)
    assert distributed.all_reduce_sum_(t) is t and torch.equal(t, torch.ones(3))


def test_stages_that_run_on_one_process_refuse_torchrun(monkeypatch):
    from regdiff_core.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="prepare.*without torchrun"):
        distributed.init_from_env("cpu", "prepare")
