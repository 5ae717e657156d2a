"""What the project promises when things go wrong: every failure says what and where, and loses nothing.

One section per case of issue 11. Each test provokes the fault the way a user would (a damaged file, a
bad setting, a killed run, an unreachable or stalling server) and checks three things: the message names
the file or the setting (and what to do), a command-line stage exits with status 2 instead of a
traceback, and no file is lost or left half-written. Everything runs on tiny networks in seconds.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

import nibabel as nib
import numpy as np
import pytest
import torch

import data_download
from data_download import core
from data_download.mirror import serve
from regdiff_core import cli, data, diffusion, store, vqae
from regdiff_core.config import RANGES, STAGES, ConfigError, get_profile
from regdiff_core.store import registration as SR
from regdiff_core.store import sampling as stored_sampling
from regdiff_core.training import NonFiniteLossError, NonFiniteStateError, train_loop

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``python -m regdiff_core ARGV`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors (bad --set values) exit with 2 too
        code = exc.code
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder``: relative path → sha256 (to show that nothing changed or was lost)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


TINY_VQAE = sets(
    "vqae.channels=4,8", "vqae.strides=2,2", "vqae.embed_dim=8", "vqae.codebook_size=16",
    "vqae.iterations=3", "vqae.patch_size=16", "vqae.batch_size=2", "vqae.log_every=1", "vqae.ckpt_every=1",
)  # fmt: skip
TINY_DIFFUSION = sets(
    "diffusion.n_layers=1", "diffusion.width=16", "diffusion.n_heads=2", "diffusion.ff=32", "diffusion.T=4",
    "diffusion.warmup=1", "diffusion.batch_size=2", "diffusion.iterations=2", "diffusion.ckpt_every=1",
    "diffusion.log_every=1", "diffusion.ablation_iterations=0", "diffusion.augment_flip=false",
    "diffusion.augment_shift=none",
)  # fmt: skip


def tube_pairs(profile, work_dir, split):
    """A stand-in for chapter 1's prepared pairs: random 16³ masks (the VQ-AE tests' size)."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = 3 if split == "train" else 2
    v = (torch.rand(n, 2, 16, 16, 16, generator=g) > 0.8).to(torch.uint8)
    cases = ["032", "033", "034"][:n] if split == "train" else ["104", "108"]
    return data.PairSet(cases=cases, fixed=v[:, 0], moving=v[:, 1], spacing=torch.ones(n, 3))


def vqae_cli(tmp_path, capsys, *extra: str, stage: str = "train-vqae") -> tuple[int, str]:
    common = ["--profile", "ci", "--work-dir", str(tmp_path), "--device", "cpu"]
    return run_cli([stage, *common, *TINY_VQAE, *extra], capsys)


# The training loop's toy problem (as in test_training): Adam + StepLR, fresh data from the global RNG.
def toy(lr: float = 0.05):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def step_fn(step):
        x = torch.randn(16, 4)
        y = x @ torch.arange(4.0)
        opt.zero_grad()
        loss = ((net(x).squeeze(1) - y) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": loss, "lr": opt.param_groups[0]["lr"]}

    return net, {"net": net, "opt": opt, "sched": sched}, step_fn


def write_label_map(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(array, np.eye(4)).to_filename(path)
    return path


# --------------------------------------------------------------------------------------------------
# 1. Damaged or foreign files: a clear error naming the file, exit status 2, nothing else touched
# --------------------------------------------------------------------------------------------------


def _wrong_structure(ckpt: Path) -> None:
    torch.save([1, 2, 3], ckpt)


def _without_rng(ckpt: Path) -> None:
    payload = torch.load(ckpt, weights_only=True)
    del payload["rng"]
    torch.save(payload, ckpt)


def _truncated(ckpt: Path) -> None:
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, extra, message",
    [
        (_wrong_structure, [], "is not a training checkpoint"),
        (
            _without_rng,
            [],
            r"is not a training checkpoint .*found \['fingerprint', 'history', 'settings', 'state', 'step'\]",
        ),
        (_truncated, [], "cannot read vqae checkpoint"),
    ],
    ids=["wrong-structure", "no-rng", "truncated"],
)
def test_a_bad_checkpoint_is_named_and_kept(tmp_path, monkeypatch, capsys, damage, extra, message):
    monkeypatch.setattr(store.data, "load_pairs", tube_pairs)
    assert vqae_cli(tmp_path, capsys)[0] == 0
    ckpt = tmp_path / "vqae" / "checkpoint.pt"
    if damage is not None:
        damage(ckpt)
    before = snapshot(tmp_path)
    code, err = vqae_cli(tmp_path, capsys, *extra)
    assert code == 2
    assert err.startswith("error: ") and str(ckpt) in err and "Traceback" not in err
    assert re.search(message, err), err
    assert "from scratch" in err  # … and says what to do
    assert snapshot(tmp_path) == before  # the checkpoint, model.pt and history.csv are untouched


def test_a_checkpoint_of_other_settings_or_tokens_is_set_aside_not_resumed(tmp_path, monkeypatch, capsys):
    # the VQ-AE with another architecture: its checkpoint is kept under another name, training starts afresh
    monkeypatch.setattr(store.data, "load_pairs", tube_pairs)
    assert vqae_cli(tmp_path, capsys)[0] == 0
    ckpt = tmp_path / "vqae" / "checkpoint.pt"
    old = torch.load(ckpt, weights_only=True)
    assert vqae_cli(tmp_path, capsys, *sets("vqae.channels=8,16", "vqae.embed_dim=16"))[0] == 0
    aside = tmp_path / "vqae" / f"checkpoint.stale-{old['fingerprint'][:12]}.pt"
    assert torch.load(aside, weights_only=True)["fingerprint"] == old["fingerprint"]  # nothing lost
    assert torch.load(ckpt, weights_only=True)["fingerprint"] != old["fingerprint"]
    # the denoiser on other tokens (a retrained VQ-AE): the same rule
    grids = torch.randint(0, 8, (3, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    argv = [
        "train-diffusion",
        "--work-dir",
        str(tmp_path),
        "--device",
        "cpu",
        "--no-progress",
        *TINY_DIFFUSION,
    ]
    store.vqae.save_tokens(vqae.Tokens(grids, ["032", "033", "034"], (4, 4, 4), 8), tmp_path)
    assert run_cli(argv, capsys)[0] == 0
    assert run_cli(argv, capsys)[0] == 0  # the same tokens: resumed (nothing set aside)
    assert not list((tmp_path / "diffusion").glob("checkpoint.stale-*"))
    store.vqae.save_tokens(vqae.Tokens((grids + 1) % 8, ["032", "033", "034"], (4, 4, 4), 8), tmp_path)
    assert run_cli(argv, capsys)[0] == 0
    assert len(list((tmp_path / "diffusion").glob("checkpoint.stale-*"))) == 1


def test_truncated_prepared_pairs_are_named_with_the_command_that_rebuilds_them(tmp_path, capsys):
    train = tmp_path / "prepared" / "train.pt"
    train.parent.mkdir()
    torch.save({"cases": ["032"], "fixed": torch.zeros(1, 8, 8, 8)}, train)
    _truncated(train)
    before = snapshot(tmp_path)
    code, err = vqae_cli(tmp_path, capsys)
    assert code == 2 and f"error: {train}: cannot read the prepared pairs" in err
    assert "python -m regdiff_core prepare --profile ci" in err
    assert snapshot(tmp_path) == before


def test_truncated_model_files_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(store.data, "load_pairs", tube_pairs)
    assert vqae_cli(tmp_path, capsys)[0] == 0
    model = tmp_path / "vqae" / "model.pt"
    _truncated(model)
    before = snapshot(tmp_path)
    code, err = vqae_cli(tmp_path, capsys, stage="encode")
    assert code == 2 and f"error: cannot read VQ-AE model {model}" in err and "Move it away" in err
    assert snapshot(tmp_path) == before
    # the denoiser's model.pt, read first by `sample`
    denoiser = tmp_path / "diffusion" / "model.pt"
    denoiser.parent.mkdir()
    denoiser.write_bytes(b"PK\x03\x04 not a whole zip")
    code, err = run_cli(["sample", "--work-dir", str(tmp_path), "--device", "cpu", "--no-progress"], capsys)
    assert code == 2 and f"error: cannot read denoiser {denoiser}" in err


@pytest.mark.parametrize("fault", ["truncated", "not-gzip"])
def test_a_broken_nifti_in_a_local_data_folder_is_named(tmp_path, monkeypatch, capsys, fault):
    folder = tmp_path / "data" / "unleashing-registration" / "dilated_vessels_10"
    good = write_label_map(folder / "case_032_2.nii.gz", np.zeros((8, 8, 8), np.uint8))
    bad = folder / "case_032_1.nii.gz"
    if fault == "truncated":
        bad.write_bytes(good.read_bytes()[:40])
    else:
        bad.write_bytes(b"<html>sign in</html>")  # what a login page saved under the file's name looks like
    monkeypatch.setattr(store.data, "download_pairs", lambda ds, d, cases, **kw: [("032", bad, good)])
    before = snapshot(tmp_path)
    code, err = run_cli(
        ["prepare", "--data-dir", str(tmp_path / "data"), "--work-dir", str(tmp_path / "work"),
         "--no-progress", *sets("data.train_cases=032", "data.test_cases=104")],
        capsys,
    )  # fmt: skip
    assert code == 2 and f"error: {bad}: not a readable NIfTI file" in err and "prepare" in err
    assert snapshot(tmp_path) == before  # nothing deleted, no half-written cache


# --------------------------------------------------------------------------------------------------
# 2. Resuming with changed settings: a new learning rate is applied, and said so
# --------------------------------------------------------------------------------------------------


def test_resume_applies_a_new_learning_rate_to_the_schedule(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    _, state, step_fn = toy(lr=0.05)
    train_loop(step_fn, state, 3, ckpt_path=ckpt, ckpt_every=3, progress=False)
    _, state, step_fn = toy(lr=0.01)
    result = train_loop(step_fn, state, 6, ckpt_path=ckpt, ckpt_every=3, progress=False, desc="toy")
    assert "[toy] resuming" in capsys.readouterr().out
    # StepLR(step 2, γ ½) after each step: lr_k = base · ½^⌊k/2⌋ — the old base for steps 1–3, the new after
    assert [r["lr"] for r in result.history] == pytest.approx(
        [0.05 * 0.5 ** (k // 2) for k in (1, 2, 3)] + [0.01 * 0.5 ** (k // 2) for k in (4, 5, 6)]
    )
    assert state["sched"].base_lrs == [0.01]


def test_resume_with_a_new_registration_lr_trains_at_that_lr(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    fixed = (torch.rand(4, 16, 12, 16, generator=g) > 0.6).float()
    regime = SR.RegimeData("real_all", ["a", "b", "c", "d"], fixed, torch.roll(fixed, 1, dims=1), 4, 0)
    tiny = {"registration.channels": "4,8,8,8,8,8", "registration.scale": "1.0", "registration.batch_size": "2",
            "registration.ckpt_every": "1"}  # fmt: skip
    first = get_profile("ci", {**tiny, "registration.iterations": "2"})
    assert first.registration.lr == 0.015
    SR.train_regime(first, "real_all", tmp_path, torch.device("cpu"), progress=False, data=regime)
    capsys.readouterr()
    again = get_profile("ci", {**tiny, "registration.iterations": "3", "registration.lr": "0.001"})
    SR.train_regime(again, "real_all", tmp_path, torch.device("cpu"), progress=False, data=regime)
    out = capsys.readouterr().out
    assert (
        "optimizer_step1 lr 0.015 → 0.001" in out
        and "optimizer_step2 lr 0.015 → 0.001" in out
        and "iterations 2 → 3" in out
    )
    saved = torch.load(tmp_path / "registration/real_all/checkpoint.pt", weights_only=True)
    assert saved["step"] == 3
    assert [saved["state"][o]["param_groups"][0]["lr"] for o in ("optimizer_step1", "optimizer_step2")] == [
        0.001,
        0.001,
    ]


# --------------------------------------------------------------------------------------------------
# 3. The NaN guard saves only finite state, and its advice works as written
# --------------------------------------------------------------------------------------------------


def test_state_that_overflows_is_never_checkpointed(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    w = torch.nn.Parameter(torch.ones(()))
    opt = torch.optim.Adam([w], lr=1e-3)
    scale = {"value": 1.0}

    def step_fn(step):  # loss = scale · w, so the gradient is `scale`
        opt.zero_grad()
        loss = scale["value"] * w
        loss.backward()
        opt.step()
        return {"loss": loss}

    train_loop(step_fn, {"w": torch.nn.ParameterList([w]), "opt": opt}, 2, ckpt_path=ckpt, ckpt_every=1,
               progress=False)  # fmt: skip
    before = ckpt.read_bytes()
    # a gradient of 1e30: the loss (1e30) is finite, and so is w after Adam's step, but Adam's second moment
    # v = (1 − β₂) g² overflows float32 — a checkpoint of it would poison every resumed run
    scale["value"] = 1e30
    with pytest.raises(
        NonFiniteStateError, match=r"after step 3 .*opt\.state\.0\.exp_avg_sq holds NaN or inf.*not saved"
    ):
        train_loop(step_fn, {"w": torch.nn.ParameterList([w]), "opt": opt}, 5, ckpt_path=ckpt, ckpt_every=1,
                   progress=False)  # fmt: skip
    assert torch.isfinite(w).all()
    assert ckpt.read_bytes() == before  # the step-2 checkpoint, finite, is what remains
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_divergence_advice_works_as_written(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    _, state, step_fn = toy(lr=1e30)  # the weights jump to ~1e30 in step 1; the loss of step 2 overflows
    with pytest.raises(NonFiniteLossError) as err:
        train_loop(step_fn, state, 6, ckpt_path=ckpt, ckpt_every=1, progress=False, stage="toy")
    message = str(err.value)
    assert "loss is inf at step 2" in message or "loss is nan at step 2" in message
    assert f"delete (or move) {ckpt} and rerun with --set toy.lr=<a value below 1e+30>" in message
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 1 and all(torch.isfinite(v).all() for v in saved["state"]["net"].values())
    # as written: delete the checkpoint, rerun with a lower learning rate → trains to the end, finite
    ckpt.unlink()
    _, state, step_fn = toy(lr=0.05)
    result = train_loop(step_fn, state, 6, ckpt_path=ckpt, ckpt_every=1, progress=False, stage="toy")
    assert len(result.history) == 6 and all(np.isfinite(r["loss"]) for r in result.history)


def test_divergence_on_the_command_line_names_the_checkpoint_and_the_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(store.data, "load_pairs", tube_pairs)
    real_ce = vqae.paired_cross_entropy
    calls = []

    def diverges_at_step_2(*args):  # what a too-high learning rate does, made certain
        calls.append(1)
        return real_ce(*args) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(vqae, "paired_cross_entropy", diverges_at_step_2)
    code, err = vqae_cli(tmp_path, capsys)
    ckpt = tmp_path / "vqae" / "checkpoint.pt"
    assert code == 2 and "error: vqae: loss is nan at step 2" in err
    assert f"delete (or move) {ckpt} and rerun with --set vqae.lr=<a value below 0.002>" in err
    assert not (tmp_path / "vqae" / "model.pt").exists()  # no model from a diverged run
    monkeypatch.setattr(vqae, "paired_cross_entropy", real_ce)
    ckpt.unlink()
    assert vqae_cli(tmp_path, capsys, *sets("vqae.lr=0.001"))[0] == 0


# --------------------------------------------------------------------------------------------------
# 4. Every setting is range-checked when the profile is built, before anything is written
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage, item, message",
    [
        ("train-vqae", "vqae.iterations=0", "vqae.iterations = 0 in profile 'ci' is out of range: allowed is an integer >= 1"),
        ("train-registration", "registration.iterations=0", "registration.iterations = 0 .* integer >= 1"),
        ("train-vqae", "vqae.batch_size=0", r"vqae.batch_size = 0 .* integer >= 1"),
        ("train-diffusion", "diffusion.ckpt_every=0", r"diffusion.ckpt_every = 0 .* integer >= 1"),
        ("train-vqae", "vqae.lr=1e30", r"vqae.lr = 1e\+30 .* a number in \(0, 1\]"),
        ("sample", "sampling.temperature=-1", r"sampling.temperature = -1.0 .* \(0, inf\)"),
        ("train-vqae", "vqae.channels=4,8,16", r"vqae.strides = \(2, 2\) .* one stride per channel entry"),
    ],
)  # fmt: skip
def test_out_of_range_settings_are_refused_before_anything_is_written(tmp_path, capsys, stage, item, message):
    code, err = run_cli([stage, "--work-dir", str(tmp_path), "--device", "cpu", "--set", item], capsys)
    assert code == 2 and re.search(f"error: {message}", err), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    for stage in ("train-vqae", "train-registration", "sample", "evaluate"):
        code, err = run_cli([stage, "--work-dir", str(tmp_path), "--device", "cuda"], capsys)
        assert code == 2 and "error: --device cuda: this machine has no usable CUDA GPU" in err, (stage, err)
    assert list(tmp_path.iterdir()) == []


def test_every_field_of_every_stage_has_an_allowed_range():
    import dataclasses

    profile = get_profile("paper")
    for stage in STAGES:
        fields = {f.name for f in dataclasses.fields(getattr(profile, stage))}
        assert fields == set(RANGES[stage]), stage
        for name in fields:  # every default lies inside its range
            assert RANGES[stage][name].ok(getattr(getattr(profile, stage), name)), (stage, name)


@pytest.mark.parametrize(
    "key, bad, good",
    [
        ("vqae.lr", "0", "1"), ("vqae.iterations", "0", "1"), ("diffusion.dropout", "1", "0.99"),
        ("diffusion.ema", "1", "none"), ("diffusion.warmup", "-1", "0"), ("sampling.threshold", "1", "0"),
        ("sampling.steps", "0", "1"), ("registration.scale", "0", "1"), ("evaluation.tta_iterations", "-1", "0"),
        ("registration.regimes", "real_all,nope", "real_all"), ("data.shape", "64,52", "64,52,64"),
        ("vqae.spatial_dims", "1", "2"), ("diffusion.n_heads", "3", "4"),
    ],
)  # fmt: skip
def test_ranges_at_their_edges(key, bad, good):
    with pytest.raises(ConfigError, match=f"^{key.split('.')[0]}"):
        get_profile("ci", {key: bad})
    get_profile("ci", {key: good})


# --------------------------------------------------------------------------------------------------
# 5. A rejected or failed `sample` keeps the previous samples
# --------------------------------------------------------------------------------------------------


def _old_samples(work_dir: Path) -> Path:
    folder = work_dir / "synthetic"
    folder.mkdir(parents=True)
    for i in (1, 2, 3):
        np.savez_compressed(folder / f"synth_{i:04d}.npz", fix=np.full((4, 4, 4), 0.25, np.float16),
                            mov=np.full((4, 4, 4), 0.75, np.float16))  # fmt: skip
    (folder / "manifest.json").write_text('{"n": 3}\n')
    return folder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "sampling.steps=0"], "sampling.steps = 0"),
        (["--set", "sampling.temperature=0"], "sampling.temperature = 0.0"),
        (["--set", "sampling.batch_size=0"], "sampling.batch_size = 0"),
        (["--n", "0"], r"the number of pairs \(--n\) must be >= 1, got 0"),
    ],
)
def test_a_rejected_sample_keeps_the_previous_pairs(tmp_path, capsys, argv, message):
    folder = _old_samples(tmp_path)
    before = snapshot(tmp_path)
    code, err = run_cli(["sample", "--work-dir", str(tmp_path), "--device", "cpu", *argv], capsys)
    assert code == 2 and re.search(f"error: .*{message}", err), err
    assert snapshot(tmp_path) == before and folder.is_dir()


def _tiny_models():
    from regdiff_core.config import DiffusionConfig

    torch.manual_seed(0)
    cfg = get_profile("ci").vqae
    vq = vqae.build_vqae(cfg.__class__(**{**cfg.__dict__, "channels": (4, 8), "strides": (1, 2),
                                          "embed_dim": 8, "codebook_size": 8})).eval()  # fmt: skip
    den = diffusion.build_denoiser(
        DiffusionConfig(n_layers=1, width=16, n_heads=2, ff=32, T=4, amp=False), 8, (4, 4, 4)
    )
    return den.eval(), vq


def test_a_sample_that_fails_half_way_keeps_the_previous_pairs(tmp_path, monkeypatch):
    folder = _old_samples(tmp_path)
    before = snapshot(tmp_path)
    profile = get_profile(
        "ci", {"sampling.steps": "2", "sampling.batch_size": "1", "sampling.export_nifti": "false"}
    )
    den, vq = _tiny_models()
    real_export, written = stored_sampling.export_pair, []

    def dies_on_the_second(*args, **kwargs):
        if written:
            raise OSError("disk full")
        written.append(real_export(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(stored_sampling, "export_pair", dies_on_the_second)
    with pytest.raises(OSError, match="disk full"):
        stored_sampling.sample_to_disk(
            profile, tmp_path, torch.device("cpu"), n=2, progress=False, denoiser=den, vqae=vq
        )
    assert written and snapshot(tmp_path) == before  # the new first pair never replaced the old ones
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        *(f"synth_{i:04d}.npz" for i in (1, 2, 3)),
    ]
    # a complete run replaces them all (and removes the old third pair)
    monkeypatch.setattr(stored_sampling, "export_pair", real_export)
    stored_sampling.sample_to_disk(
        profile, tmp_path, torch.device("cpu"), n=2, progress=False, denoiser=den, vqae=vq
    )
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "synth_0001.npz", "synth_0002.npz"]
    assert stored_sampling.load_synthetic(tmp_path).fixed.shape == (2, 8, 8, 8)


# --------------------------------------------------------------------------------------------------
# 6. Lung250M-4B: a local file is kept until a verified replacement exists; one download at a time
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_retries(monkeypatch):
    monkeypatch.setattr(core, "RETRIES", 0)
    monkeypatch.delenv("REGDIFF_LUNG250M_URL", raising=False)


def closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _pair(root: Path, case: str, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    return [
        write_label_map(root / f"segTr/case_{case}_{i}.nii.gz", rng.integers(0, 3, (4, 4, 3), dtype=np.uint8))
        for i in (1, 2)
    ]


def test_unrecorded_local_files_survive_an_unreachable_server(tmp_path, no_retries):
    dest = tmp_path / "lung250m-4b"
    fixed, moving = _pair(dest, "010")
    before = snapshot(dest)
    # both files here, no record: checked by content and recorded, the server is never needed
    paths = data_download.fetch(
        "lung250m-4b", dest, cases=["010"], base_url=closed_port_url(), progress=False
    )
    assert paths == [fixed, moving]
    record = (dest / "lung250m-4b.sha256").read_text()
    assert "segTr/case_010_1.nii.gz" in record and "segTr/case_010_2.nii.gz" in record
    # only one file of a pair here: the partner cannot be fetched, and the local file stays
    dest2 = tmp_path / "other"
    (dest2 / "segTr").mkdir(parents=True)
    only = dest2 / "segTr/case_010_1.nii.gz"
    only.write_bytes(fixed.read_bytes())
    with pytest.raises(data_download.DownloadError, match="cannot reach 127.0.0.1.*case_010_2"):
        data_download.fetch("lung250m-4b", dest2, cases=["010"], base_url=closed_port_url(), progress=False)
    assert only.read_bytes() == fixed.read_bytes()
    assert snapshot(dest) == {**before, "lung250m-4b.sha256": snapshot(dest)["lung250m-4b.sha256"]}


@contextmanager
def slow_server(directory: Path, delay: float):
    """Serve ``directory``, waiting ``delay`` s before each file; yields (url, list of requested paths)."""
    seen: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(urlsplit(self.path).path.lstrip("/"))
            time.sleep(delay)
            return super().do_GET()

    with serve(directory, Handler) as url:
        yield url, seen


def test_two_concurrent_downloads_into_one_folder_take_turns(tmp_path):
    share = tmp_path / "share"
    for case in ("000", "001"):
        _pair(share, case, seed=int(case))
    dest = tmp_path / "data" / "lung250m-4b"
    script = textwrap.dedent(
        """
        import sys
        from data_download import core, fetch
        core.RETRIES = 0
        fetch("lung250m-4b", sys.argv[1], cases=["000", "001"], base_url=sys.argv[2], progress=False)
        """
    )
    with slow_server(share, delay=0.3) as (url, seen):
        procs = [
            subprocess.Popen([sys.executable, "-c", script, str(dest), url], cwd=REPO_ROOT, stderr=subprocess.PIPE,
                             text=True)
            for _ in range(2)
        ]  # fmt: skip
        errs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sorted(seen) == sorted(f"segTr/case_{c}_{i}.nii.gz" for c in ("000", "001") for i in (1, 2))
    assert any("waiting for another download" in e for e in errs)  # the second waited, then found them
    assert snapshot(dest).keys() == {"lung250m-4b.sha256", *(f"segTr/case_{c}_{i}.nii.gz" for c in ("000", "001") for i in (1, 2))}  # fmt: skip
    for p in (share / "segTr").iterdir():
        assert (dest / "segTr" / p.name).read_bytes() == p.read_bytes()


# --------------------------------------------------------------------------------------------------
# 7. Leftovers of a kill are cleaned; the cache notices replaced inputs; a stall is not "offline"
# --------------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_files_of_a_killed_writer_are_removed(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    orphan = tmp_path / f".ckpt.pt.tmp-{_dead_pid()}"
    orphan.write_bytes(b"half a checkpoint")
    alive = tmp_path / f".ckpt.pt.tmp-{os.getppid()}"  # another process still writing: left alone
    alive.write_bytes(b"in progress")
    _, state, step_fn = toy()
    train_loop(step_fn, state, 1, ckpt_path=ckpt, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt.pt", alive.name])


def test_a_sigkill_while_saving_leaves_nothing_behind_after_the_next_run(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        real = torch.save
        def killed(obj, f, *a, **k):
            open(f, "wb").write(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = killed
        from regdiff_core.utils import atomic_torch_save
        atomic_torch_save({{"x": 1}}, {str(ckpt)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT)
    assert proc.wait() == -9
    assert [p.name for p in tmp_path.iterdir()] == [f".ckpt.pt.tmp-{proc.pid}"]  # what a kill leaves
    _, state, step_fn = toy()
    train_loop(step_fn, state, 1, ckpt_path=ckpt, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_stale_pooch_temporaries_are_removed_from_the_dataset_folder(tmp_path, no_retries):
    dest = tmp_path / "lung250m-4b"
    _pair(dest, "010")
    leftover = dest / "segTr" / "tmpab3_x9qz"
    leftover.write_bytes(b"part of a download")
    data_download.fetch("lung250m-4b", dest, cases=["010"], base_url=closed_port_url(), progress=False)
    assert not leftover.exists()
    assert sorted(p.name for p in (dest / "segTr").iterdir()) == ["case_010_1.nii.gz", "case_010_2.nii.gz"]


def test_replaced_input_files_rebuild_the_prepared_cache(tmp_path, monkeypatch):
    root = tmp_path / "data"

    def local_pairs(dataset, data_dir, cases, **kwargs):  # a local data folder instead of a download
        folder = "dilated_vessels_10" if dataset == "unleashing-registration" and cases[0] < "100" else "ts"
        out = []
        for c in cases:
            paths = [root / dataset / folder / f"case_{c}_{i}.nii.gz" for i in (1, 2)]
            for p in paths:
                if not p.exists():
                    write_label_map(p, np.zeros((16, 16, 16), np.uint8))
            out.append((c, *paths))
        return out

    monkeypatch.setattr(store.data, "download_pairs", local_pairs)
    profile = get_profile("ci", {"data.train_cases": "032", "data.test_cases": "104"})
    first = store.data.prepare(profile, root, tmp_path / "work", progress=False)
    assert (
        first.cached == ()
        and int(store.data.load_pairs(profile, tmp_path / "work", "train").fixed.sum()) == 0
    )
    assert store.data.prepare(profile, root, tmp_path / "work", progress=False).cached == ("train", "test")
    # the input is replaced by a different scan: the cache must not serve the old one
    vessels = np.zeros((16, 16, 16), np.uint8)
    vessels[8, 8, 8] = 1
    write_label_map(root / "unleashing-registration/dilated_vessels_10/case_032_1.nii.gz", vessels)
    again = store.data.prepare(profile, root, tmp_path / "work", progress=False)
    assert again.cached == ("test",)
    assert int(store.data.load_pairs(profile, tmp_path / "work", "train").fixed.sum()) == 1


def test_a_stalled_transfer_is_not_reported_as_offline(tmp_path, monkeypatch, no_retries, capsys):
    monkeypatch.setattr(core, "TIMEOUT", 0.5)
    release = threading.Event()

    class Stalls(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b" + b"\0" * 8)
            self.wfile.flush()
            release.wait(5)  # then nothing more for longer than the timeout

    with serve(tmp_path, Stalls) as url:
        try:
            with pytest.raises(data_download.DownloadError) as err:
                data_download.fetch(
                    "lung250m-4b", tmp_path / "dest", cases=["010"], base_url=url, progress=False
                )
        finally:
            release.set()
    message = str(err.value)
    assert "segTr/case_010_1.nii.gz" in message and "stalled" in message and "answered" in message
    assert "cannot reach" not in message and "offline" not in message
    assert not any(p.is_file() for p in (tmp_path / "dest").rglob("*"))  # nothing kept
