"""`make gpu-check` must work wherever it is run: its script is smoke-tested here at toy sizes on the CPU."""

import json

import torch

from regdiff_core import bench


def test_small_run_covers_every_stage_without_errors(tmp_path):
    out = tmp_path / "gpu.json"
    code = bench.main(["--device", "cpu", "--small", "--out", str(out)])
    report = json.loads(out.read_text())
    errors = {k: v["error"] for k, v in report["stages"].items() if "error" in v}
    assert not errors, errors
    assert code == 0
    assert set(report["stages"]) == set(bench.BENCHMARKS)
    for name, result in report["stages"].items():
        assert "skipped" not in result, f"{name} was skipped"
        assert result["wall_seconds"] > 0
    # sampling in large batches: one batch timed, scaled to the pairs chapter 4 samples
    big = report["stages"]["diffusion"]["sample_large_batches"]
    assert (
        big["estimated_n_pairs_seconds"] == round(big["seconds_per_pair"] * big["n_pairs"], 1)
        or abs(big["estimated_n_pairs_seconds"] - big["seconds_per_pair"] * big["n_pairs"])
        < 0.05 * big["n_pairs"]
    )


def test_refuses_paper_size_on_cpu(tmp_path, capsys):
    if torch.cuda.is_available():
        return
    assert bench.main(["--device", "cpu", "--out", str(tmp_path / "x.json")]) == 2
    assert "no GPU found" in capsys.readouterr().out
