"""The shared training loop: kill-and-resume continuity, atomic checkpoints, the NaN guard, weight loading."""

from __future__ import annotations

import csv
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from regdiff_core.training import NonFiniteLossError, clean_state_dict, load_weights, train_loop

REPO_ROOT = Path(__file__).resolve().parent.parent

# A tiny regression problem whose every step draws fresh data from torch's global RNG, so a resume
# only continues exactly if weights, Adam moments, the scheduler AND the RNG state all come back.
TOY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = torch.optim.Adam(net.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        w_true = torch.arange(4.0)

        def step_fn(step):
            x = torch.randn(16, 4)
            y = x @ w_true + 0.1 * torch.randn(16)
            opt.zero_grad()
            loss = ((net(x).squeeze(1) - y) ** 2).mean()
            loss.backward()
            opt.step()
            sched.step()
            return {"loss": loss, "lr": opt.param_groups[0]["lr"]}

        return net, {"net": net, "opt": opt, "sched": sched}, step_fn
    """
)


def _toy():
    namespace: dict = {}
    exec(TOY, namespace)
    return namespace["make"]()


def test_kill_and_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    # reference: 8 uninterrupted steps
    net_ref, state_ref, step_ref = _toy()
    ref = train_loop(step_ref, state_ref, 8, progress=False)

    # a separate process checkpoints every 3 steps and is SIGKILLed during step 5
    ckpt = tmp_path / "ckpt.pt"
    script = TOY + textwrap.dedent(
        f"""
        import os, signal
        from regdiff_core.training import train_loop
        net, state, step_fn = make()
        def killed_at_5(step):
            if step == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return step_fn(step)
        train_loop(killed_at_5, state, 8, ckpt_path={str(ckpt)!r}, ckpt_every=3, progress=False)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["step"] == 3

    # resume in fresh objects (a different init, so only the checkpoint can make them agree)
    torch.manual_seed(123)
    net, state, step_fn = _toy()
    torch.manual_seed(999)  # the RNG state must come from the checkpoint, not from here
    res = train_loop(step_fn, state, 8, ckpt_path=ckpt, ckpt_every=3, progress=False)

    assert res.resumed_from == 3
    assert [r["step"] for r in res.history] == list(range(1, 9))
    # the next loss after the resume (step 4) and every later one equal the uninterrupted run's
    assert [r["loss"] for r in res.history] == [r["loss"] for r in ref.history]
    assert [r["lr"] for r in res.history] == [r["lr"] for r in ref.history]
    for p, q in zip(net.parameters(), net_ref.parameters()):
        assert torch.equal(p, q)


def test_history_csv_and_result(tmp_path):
    net, state, step_fn = _toy()
    res = train_loop(step_fn, state, 5, log_every=2, history_csv=tmp_path / "h.csv", progress=False)
    rows = list(csv.DictReader((tmp_path / "h.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in res.history])
    # StepLR(step_size=2, gamma=0.5) after each step: 0.05, 0.025, 0.025, 0.0125, 0.0125 (hand-computed)
    assert [r["lr"] for r in res.history] == pytest.approx([0.05, 0.025, 0.025, 0.0125, 0.0125])
    assert res.steps == 5 and res.resumed_from is None and res.checkpoint is None


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt.pt"
    net, state, step_fn = _toy()
    train_loop(step_fn, state, 2, ckpt_path=ckpt, ckpt_every=2, progress=False)
    before = ckpt.read_bytes()

    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")  # a partial write, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    net, state, step_fn = _toy()
    with pytest.raises(OSError, match="disk full"):
        train_loop(step_fn, state, 4, ckpt_path=ckpt, ckpt_every=2, progress=False)
    monkeypatch.setattr(torch, "save", real_save)

    assert ckpt.read_bytes() == before  # the previous checkpoint is untouched …
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # … and no temporary file is left
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["step"] == 2


def test_truncated_checkpoint_is_named_in_the_error(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"not a checkpoint")
    net, state, step_fn = _toy()
    with pytest.raises(RuntimeError, match="ckpt.pt"):
        train_loop(step_fn, state, 2, ckpt_path=ckpt, progress=False)


def test_tensors_are_read_only_when_the_loop_logs_and_a_nan_among_them_names_its_step(tmp_path, monkeypatch):
    from regdiff_core import distributed

    ckpt = tmp_path / "ckpt.pt"
    seen = []
    reads = []  # how many steps had run when each row was turned into numbers
    real_mean = distributed.mean_over_ranks

    def counting_mean(row, *args, **kwargs):
        reads.append(len(seen))
        return real_mean(row, *args, **kwargs)

    monkeypatch.setattr(distributed, "mean_over_ranks", counting_mean)

    def step_fn(step):
        seen.append(step)
        return {"loss": torch.tensor(math.nan if step == 5 else 1.0 / step)}

    with pytest.raises(NonFiniteLossError, match=r"at step 5 \(found at step 6\)") as err:
        train_loop(step_fn, {}, 10, ckpt_path=ckpt, ckpt_every=100, log_every=3, progress=False)
    assert seen == [1, 2, 3, 4, 5, 6]  # noticed at the next logging step
    assert reads == [3, 3, 3, 6, 6]  # read only at steps 3 and 6 (steps 1–3, then 4–5: the NaN stops it)
    assert str(ckpt) not in str(err.value) and "Nothing was checkpointed" in str(err.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_guard_names_the_step(tmp_path, bad):
    ckpt = tmp_path / "ckpt.pt"
    seen = []

    def step_fn(step):
        seen.append(step)
        return {"loss": bad if step == 5 else 1.0 / step}

    with pytest.raises(NonFiniteLossError, match=r"at step 5\b") as err:
        train_loop(step_fn, {}, 10, ckpt_path=ckpt, ckpt_every=2, progress=False)
    assert seen == [1, 2, 3, 4, 5]  # stops at once
    assert str(ckpt) in str(err.value)  # and points to the last good checkpoint …
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["step"] == 4  # … which is step 4's


def test_nan_guard_also_catches_a_nan_tensor_loss():
    with pytest.raises(NonFiniteLossError, match="step 1"):
        train_loop(lambda step: {"loss": torch.tensor(float("nan"))}, {}, 3, progress=False)


def _net():
    return nn.Sequential(nn.Conv3d(2, 4, 3), nn.InstanceNorm3d(4, affine=True), nn.Conv3d(4, 1, 1))


def test_load_weights_accepts_torch_compile_prefixes():
    torch.manual_seed(0)
    src = _net()
    compiled_sd = torch.compile(src).state_dict()  # what a seed-style checkpoint holds
    assert all(k.startswith("_orig_mod.") for k in compiled_sd)
    dst = _net()
    load_weights(dst, compiled_sd)
    for (k, p), q in zip(dst.state_dict().items(), src.state_dict().values()):
        assert torch.equal(p, q), k
    # DataParallel-style and nested prefixes too
    nested = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    assert list(clean_state_dict(nested)) == list(src.state_dict())


def test_load_weights_casts_fp16_weights_to_the_module_dtype(tmp_path):
    torch.manual_seed(0)
    src = _net()
    half_sd = {k: v.half() for k, v in src.state_dict().items()}
    torch.save(half_sd, tmp_path / "half.pt")
    dst = _net()
    load_weights(dst, tmp_path / "half.pt")
    for k, v in dst.state_dict().items():
        assert v.dtype == torch.float32
        # the fp16 rounding of the original, not the original itself
        assert torch.equal(v, src.state_dict()[k].half().float()), k
    w = src[0].weight
    assert not torch.equal(dst[0].weight, w) and torch.allclose(dst[0].weight, w, atol=1e-3)


def test_load_weights_from_a_train_loop_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = _net()
    opt = torch.optim.Adam(net.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3, T_mult=2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_loop(
        lambda step: {"loss": 0.0},
        {"model": net, "optimizer": opt, "scheduler": sched, "scaler": scaler},
        1,
        ckpt_path=tmp_path / "ckpt.pt",
        progress=False,
    )
    dst = _net()
    load_weights(dst, tmp_path / "ckpt.pt")  # the only module state dict in the checkpoint
    assert all(torch.equal(p, q) for p, q in zip(dst.parameters(), net.parameters()))
    load_weights(dst, tmp_path / "ckpt.pt", key="model")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_weights(dst, tmp_path / "missing.pt")


def test_load_weights_refuses_to_guess_between_two_networks(tmp_path):
    a, b = _net(), _net()
    payload = {"state": {"a": a.state_dict(), "b": b.state_dict()}}
    with pytest.raises(KeyError, match="key="):
        load_weights(_net(), payload)
    load_weights(_net(), payload, key="b")


def test_a_cpu_checkpoint_resumes_with_gradient_scaling_on(tmp_path):
    # A run without amp saves an empty GradScaler state; resuming it where amp is on (a CPU run continued
    # on CUDA) must start the scaler afresh, not fail on the empty state or on a missing entry.
    ckpt = tmp_path / "ckpt.pt"
    for scaler_in_ckpt in (True, False):
        net, state, step_fn = _toy()
        if scaler_in_ckpt:
            state["scaler"] = torch.amp.GradScaler("cpu", enabled=False)
        train_loop(step_fn, state, 2, ckpt_path=ckpt, ckpt_every=1, progress=False)
        assert "scaler" in torch.load(ckpt, weights_only=True)["state"] or not scaler_in_ckpt

        net, state, step_fn = _toy()
        state["scaler"] = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10)
        result = train_loop(step_fn, state, 4, ckpt_path=ckpt, ckpt_every=1, progress=False)
        assert result.resumed_from == 2 and len(result.history) == 4
        assert state["scaler"].get_scale() == 2.0**10
        ckpt.unlink()
