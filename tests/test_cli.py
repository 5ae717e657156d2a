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
