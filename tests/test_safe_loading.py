"""No code runs from a file this project reads: every loader refuses a pickle that would call something,
and says which file it refused; a cut-short pair file is an error naming it, not a traceback."""

from __future__ import annotations

import os

import pytest
import torch

from regdiff_core import store, training
from regdiff_core.config import get_profile
from regdiff_core.data import DataError


class _Payload:
    """Unpickling this creates a file (as os.system would run a command)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _evil(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "config": {}, "payload": _Payload(str(marker))}, path)
    return path


def test_crafted_pickle_runs_nothing_in_any_loader(tmp_path):
    marker = tmp_path / "it-ran"
    profile, cpu = get_profile("ci"), torch.device("cpu")
    loaders = {
        "read_checkpoint": lambda p: training.read_checkpoint(p),
        "denoiser": lambda p: store.diffusion.load_denoiser(tmp_path, cpu, path=p),
        "registration": lambda p: store.registration.load_registration(profile, tmp_path, p, cpu),
        "vqae": lambda p: store.vqae.load_vqae(profile, tmp_path, cpu, path=p),
    }
    for name, load in loaders.items():
        path = _evil(tmp_path / name / "model.pt", marker)
        with pytest.raises(training.CheckpointError, match="refused to read") as err:
            load(path)
        assert str(path) in str(err.value), name
        assert not marker.exists(), f"{name} ran the pickle's code"
    tokens = _evil(tmp_path / "work" / "tokens.pt", marker)
    with pytest.raises(training.CheckpointError, match=str(tokens)):
        store.vqae.load_tokens(tmp_path / "work")
    assert not marker.exists()


def test_evaluate_refuses_a_crafted_checkpoint_with_a_clear_error(prepared_ci, tmp_path, capsys):
    from regdiff_core.cli import main

    marker = tmp_path / "it-ran"
    evil = _evil(tmp_path / "evil.pt", marker)
    rc = main(["evaluate", "--profile", "ci", "--work-dir", str(prepared_ci.work_dir), "--data-dir",
               str(prepared_ci.data_dir), "--checkpoint", str(evil), "--json", str(tmp_path / "out.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and str(evil) in err and "Traceback" not in err
    assert not marker.exists()


def test_checkpoints_of_the_training_loop_load_safely(tmp_path):
    """What train_loop writes (optimizer states, RNG states, history, settings) loads with weights_only."""
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)

    def step(_):
        opt.zero_grad()
        loss = net(torch.randn(4, 2)).pow(2).mean()
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    ckpt = tmp_path / "ckpt.pt"
    training.train_loop(step, {"net": net, "opt": opt}, 3, ckpt_path=ckpt, ckpt_every=1, progress=False,
                        settings={"lr": 0.1, "shape": (1, 2)})  # fmt: skip
    payload = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert payload["step"] == 3 and isinstance(payload["rng"]["numpy"][1], torch.Tensor)
    before = torch.rand(3)
    training._set_rng_state(payload["rng"])  # the restored state draws what the saved one would
    import numpy as np

    np_draw = np.random.rand(2)
    training._set_rng_state(payload["rng"])
    assert np.array_equal(np_draw, np.random.rand(2)) and before.shape == (3,)


def test_a_pair_file_cut_short_names_itself(tmp_path):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 6, 5, 6, generator=g)
    (path,) = store.sampling.export_pair(tmp_path / "synthetic", "synth_0001", p[0], p[1], nifti=False)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="synth_0001.npz"):
        store.sampling.read_synthetic_pair(path)


def test_model_files_have_one_layout_and_another_is_named(tmp_path):
    """save_model writes {"weights", "config", **extra}; load_model refuses another layout (an old
    ``{"state": …}`` VQ-AE file, a denoiser's ``state_dict``) with an error naming the file."""
    net = torch.nn.Linear(2, 1)
    path = training.save_model(tmp_path / "m.pt", {"model": net.state_dict()}, {"width": 2}, steps=3)
    saved = training.load_model(path, "toy model", "Train it again.")
    assert saved["config"] == {"width": 2} and saved["steps"] == 3
    assert torch.equal(saved["weights"]["model"]["weight"], net.weight.detach())
    for old in ({"state": {"model": net.state_dict()}, "config": {}}, {"state_dict": net.state_dict()}, [1]):
        torch.save(old, tmp_path / "old.pt")
        with pytest.raises(training.CheckpointError, match=f"{tmp_path / 'old.pt'} is not a toy model file"):
            training.load_model(tmp_path / "old.pt", "toy model", "Train it again.")
    (tmp_path / "vqae").mkdir()
    torch.save({"state": {"model": net.state_dict()}, "config": {}}, tmp_path / "vqae" / "model.pt")
    with pytest.raises(training.CheckpointError, match="is not a VQ-AE model file"):
        store.vqae.load_vqae(get_profile("ci"), tmp_path, "cpu")
