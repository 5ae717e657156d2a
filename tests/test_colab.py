"""The Colab branch of the notebooks' setup, with a fake ``google.colab`` module: Google Drive folders that
survive a runtime reset (and a rerun that resumes training there), and the loud message on a CPU runtime."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from regdiff_core import utils
from regdiff_core.training import train_loop


@pytest.fixture
def fake_colab(monkeypatch, tmp_path):
    """A ``google.colab`` whose ``drive.mount(path)`` records the call and creates ``path/MyDrive``."""
    mounts: list[str] = []

    def mount(path: str) -> None:
        mounts.append(path)
        (Path(path) / "MyDrive").mkdir(parents=True, exist_ok=True)

    google = types.ModuleType("google")
    colab = types.ModuleType("google.colab")
    drive = types.ModuleType("google.colab.drive")
    drive.mount = mount
    colab.drive = drive
    google.colab = colab
    for name, module in (("google", google), ("google.colab", colab), ("google.colab.drive", drive)):
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(mounts=mounts, mount_point=tmp_path / "content" / "drive")


def test_not_on_colab_without_the_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", None)  # None in sys.modules: import fails
    assert not utils.on_colab()


def test_default_folders_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REGDIFF_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.delenv("REGDIFF_WORK_DIR", raising=False)
    assert utils.run_folders(None, None) == (tmp_path / "d", Path("work"))
    assert utils.run_folders("x", tmp_path / "w") == (Path("x"), tmp_path / "w")


def test_drive_outside_colab_says_where_it_works(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", None)
    with pytest.raises(ValueError, match="only on Colab"):
        utils.run_folders(None, "drive")


def test_work_dir_drive_mounts_drive_and_keeps_data_and_work_there(fake_colab, capsys):
    assert utils.on_colab()
    folders = utils.run_folders(None, "drive", mount_point=fake_colab.mount_point)
    root = fake_colab.mount_point / "MyDrive" / "regdiff"
    assert folders == utils.RunFolders(data=root / "data", work=root / "work")
    assert fake_colab.mounts == [str(fake_colab.mount_point)]
    out = capsys.readouterr().out
    assert "downloads and work kept in My Drive/regdiff/" in out and "resumes" in out
    assert str(fake_colab.mount_point) not in out  # no path of the machine on the page
    # a data folder given by the user stays where it is
    folders = utils.run_folders("/content/data", "drive", mount_point=fake_colab.mount_point)
    assert folders == (Path("/content/data"), root / "work")
    assert "work kept in" in capsys.readouterr().out


def test_a_rerun_after_a_reset_resumes_from_the_checkpoint_on_drive(fake_colab):
    """A reset loses the runtime (its memory, its disk) but not Drive: the rerun continues after the last
    checkpoint instead of starting again."""

    def session(n_steps: int):
        torch.manual_seed(0)
        net = nn.Linear(3, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)

        def step_fn(step):
            x = torch.randn(8, 3)
            loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return {"loss": loss}

        work = utils.run_folders(None, "drive", mount_point=fake_colab.mount_point).work
        return train_loop(
            step_fn, {"net": net, "opt": opt}, n_steps, ckpt_path=work / "toy" / "ckpt.pt",
            ckpt_every=5, progress=False,
        )  # fmt: skip

    first = session(12)  # checkpoints at 5, 10 and 12: a reset after step 12 ...
    again = session(20)  # ... and the same notebook run again, with more steps to go
    assert first.resumed_from is None and again.resumed_from == 12
    assert [r["step"] for r in again.history] == list(range(1, 21))
    assert again.history[:12] == first.history


def test_auto_on_a_colab_cpu_runtime_says_how_to_pick_a_gpu(fake_colab, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert utils.resolve_device("auto").type == "cpu"
    out = capsys.readouterr().out
    assert "NO GPU" in out and "Runtime → Change runtime type" in out and "GPU" in out
    # an explicit CPU is the user's choice: no message; and off Colab none either
    assert utils.resolve_device("cpu").type == "cpu"
    monkeypatch.setitem(sys.modules, "google.colab", None)
    assert utils.resolve_device("auto").type == "cpu"
    assert capsys.readouterr().out == ""
