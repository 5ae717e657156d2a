"""The CLI offers every pipeline stage with the common options."""

import pytest

from regdiff_core.cli import build_parser, main

STAGES = [
    "prepare",
    "train-vqae",
    "encode",
    "train-diffusion",
    "sample",
    "train-registration",
    "evaluate",
    "gpu-check",
]


def test_every_stage_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "stage")
    assert set(STAGES) <= set(sub.choices), set(STAGES) - set(sub.choices)


@pytest.mark.parametrize("stage", STAGES)
def test_common_options(stage):
    args = build_parser().parse_args([stage, "--profile", "paper", "--device", "cpu", "--seed", "3"])
    assert (args.profile, args.device, args.seed) == ("paper", "cpu", 3)


def test_unknown_override_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["gpu-check", "--set", "vqae.nope=1"])
    assert exc.value.code == 2
    assert "vqae has no field 'nope'" in capsys.readouterr().err


def test_later_stages_adopt_the_prepared_cases_and_print_errors(tmp_path, mirror_url, capsys):
    """prepare with --set case lists (ids as `2`), then evaluate without repeating them; a missing stage
    is an `error:` line, not a traceback."""
    data_dir, work_dir = tmp_path / "data", tmp_path / "work"
    common = ["--profile", "ci", "--data-dir", str(data_dir), "--work-dir", str(work_dir), "--device", "cpu"]
    sets = ["--set", "data.train_cases=32", "--set", "data.test_cases=2,104"]
    assert main(["prepare", *common, *sets, "--base-url", mirror_url, "--no-progress"]) == 0
    assert "test: 2 pairs" in capsys.readouterr().out
    # evaluate: no --set, the cache's cases are used
    assert main(["evaluate", *common, "--checkpoint", "identity", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| 002 |" in out.replace("`", "") and "| 104 |" in out.replace("`", "")
    # an explicit --set that the cache does not hold is a clear error naming both lists
    assert main(["evaluate", *common, "--set", "data.test_cases=054", "--checkpoint", "identity"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "054" in err and "Traceback" not in err
    # a regime that was never trained: error line naming the command to run
    assert main(["evaluate", *common, "--checkpoint", "real_all"]) == 2
    assert "error:" in capsys.readouterr().err
