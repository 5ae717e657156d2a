"""``python -m regdiff_core <stage> --profile P``: every pipeline stage, headless.

The stages call the very functions the notebooks call; this file holds all of them (the chapter modules
hold the method, not its command line). One ``add_<stage>`` per chapter registers the subcommand, and
the function it names runs it.

Common options (every stage): ``--profile``, ``--data-dir``, ``--work-dir``, ``--device``, ``--seed``
and ``--set stage.field=value`` (repeatable) to override one profile value.

A stage that fails for a reason the project knows (a bad setting, file, checkpoint or download, a
diverged run, a missing device) prints ``error: <what and where, and what to do>`` and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from regdiff_core import bench, diffusion, distributed, metrics, registration, store, vqae
from regdiff_core.config import ALL_TEST_CASES, BENCHMARK_TEST_CASES, ConfigError, Profile, get_profile
from regdiff_core.utils import (
    default_data_dir,
    default_work_dir,
    jsonable,
    markdown_table,
    resolve_device,
    seed_everything,
)


def common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--profile", default="ci", help="ci | gpu | colab | paper (default: ci)")
    common.add_argument(
        "--data-dir", type=str, default=None, help="downloads (default $REGDIFF_DATA_DIR or ./data)"
    )
    common.add_argument(
        "--work-dir", type=str, default=None, help="outputs (default $REGDIFF_WORK_DIR or ./work)"
    )
    common.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="STAGE.FIELD=VALUE",
        help="override one profile value, e.g. --set vqae.iterations=50 (repeatable)",
    )  # fmt: skip
    return common


def profile_from_args(args: argparse.Namespace) -> Profile:
    """The profile named by ``--profile`` with the ``--set`` overrides; for every stage after ``prepare``,
    the case lists of a prepared ``--work-dir`` are adopted unless ``--set`` names them
    (:func:`regdiff_core.store.data.adopt_prepared_cases`)."""
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected STAGE.FIELD=VALUE")
        overrides[key.strip()] = value.strip()
    profile = get_profile(args.profile, overrides)
    if getattr(args, "stage", None) not in (None, "prepare", "gpu-check") and getattr(args, "work_dir", None):
        profile = store.data.adopt_prepared_cases(profile, args.work_dir, explicit=tuple(overrides))
    return profile


# --------------------------------------------------------------------------------------------------
# Chapter 1: prepare
# --------------------------------------------------------------------------------------------------


def add_prepare(subparsers, common) -> None:
    p = subparsers.add_parser(
        "prepare", parents=[common], help="download the pairs and landmarks, cache them prepared (chapter 1)"
    )
    p.add_argument(
        "--base-url",
        default=None,
        help="URL prefix of a mirror that replaces the upstream one (default: $REGDIFF_DATA_URL or upstream)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_prepare)


def run_prepare(args, profile: Profile) -> int:
    # DataError, FileNotFoundError and DownloadError become "error: …" and exit status 2 in main
    result = store.data.prepare(
        profile, args.data_dir, args.work_dir, base_url=args.base_url, progress=not args.no_progress
    )
    for split, path, n in (
        ("train", result.train_path, result.n_train),
        ("test", result.test_path, result.n_test),
    ):
        how = "cached" if split in result.cached else "prepared"
        print(f"{split}: {n} pairs at {'×'.join(map(str, result.shape))} {how} in {path}")
    print(f"done in {result.seconds:.1f} s")
    return 0


# --------------------------------------------------------------------------------------------------
# Chapter 2: train-vqae, encode
# --------------------------------------------------------------------------------------------------


def add_vqae(subparsers, common) -> None:
    batch_help = (
        "whole volumes per encoder/decoder call (default: vqae.encode_batch); 1 halves the memory of 2"
    )
    p = subparsers.add_parser("train-vqae", parents=[common], help="chapter 2: train the paired VQ-AE")
    p.add_argument("--batch-size", type=int, default=None, help=f"test reconstruction: {batch_help}")
    p.set_defaults(func=run_train_vqae)
    p = subparsers.add_parser(
        "encode", parents=[common], help="chapter 2: encode the training pairs to tokens"
    )
    p.add_argument("--split", default="train", choices=("train", "test"), help="which prepared pairs (train)")
    p.add_argument("--batch-size", type=int, default=None, help=batch_help)
    p.set_defaults(func=run_encode)


def run_train_vqae(args, profile: Profile) -> int:
    device = resolve_device(args.device)
    result = store.vqae.train(profile, args.work_dir, device, args.seed)
    if not distributed.is_main():  # torchrun: rank 0 alone judges and reports the model
        return 0
    test = store.data.load_pairs(profile, args.work_dir, "test")
    batch = profile.vqae.encode_batch if args.batch_size is None else args.batch_size
    rec = vqae.reconstruct(result.model, test.volumes(dtype=torch.uint8), device, batch, amp=profile.vqae.amp)
    last = [h for h in result.history if "perplexity" in h][-1]
    print(
        f"train-vqae: {len(result.history)} steps, {result.params} AutoEncoder parameters; "
        f"test Dice {float(rec.dice.mean()):.3f}; codes used {int(last['codebook_used'])}/"
        f"{profile.vqae.codebook_size}, perplexity {last['perplexity']:.1f}; "
        f"model → {store.vqae.model_path(args.work_dir)}"
    )
    return 0


def run_encode(args, profile: Profile) -> int:
    tokens = store.vqae.encode_pairs(
        profile, args.work_dir, args.device, split=args.split, batch_size=args.batch_size
    )
    print(
        f"encode: {len(tokens.cases)} pairs → tokens {tuple(tokens.tokens.shape)}, grid {tokens.grid}, "
        f"{int(tokens.tokens.unique().numel())} distinct codes → {store.vqae.tokens_path(args.work_dir)}"
    )
    return 0


# --------------------------------------------------------------------------------------------------
# Chapter 3: train-diffusion
# --------------------------------------------------------------------------------------------------


def add_diffusion(subparsers, common) -> None:
    p = subparsers.add_parser(
        "train-diffusion",
        parents=[common],
        help="chapter 3: train the absorbing-diffusion denoiser on tokens.pt (or the paper's own tokens)",
        description=(
            "Train the denoiser. --tokens work (default) uses chapter 2's work_dir/tokens.pt and writes "
            "work_dir/diffusion/. --tokens paper-release uses the paper's own 97 token grids "
            f"(data_dir/unleashing-registration/{store.vqae.PAPER_TOKENS_FILE}, codebook 1024, 16x13x16), "
            f"so no VQ-AE is trained first, and writes work_dir/{store.diffusion.PAPER_TOKENS_DIR}/. That gives the "
            "paper's diffusion model and token samples from it; it cannot give volumes, synthetic pairs "
            "or registration: the paper's VQ-AE that decodes the tokens is not released."
        ),
    )
    p.add_argument(
        "--tokens", choices=("work", "paper-release"), default="work",
        help="which token grids to train on (default: work = chapter 2's tokens.pt)",
    )  # fmt: skip
    p.add_argument(
        "--heldout", type=int, default=0,
        help="with --tokens paper-release: keep the last N grids aside and report their loss (default 0)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train_diffusion)


def run_train_diffusion(args, profile: Profile) -> int:
    device = resolve_device(args.device)
    seed_everything(args.seed)
    tokens, out_dir, heldout = None, None, None
    if args.tokens == "paper-release":
        split = store.diffusion.paper_tokens(args.data_dir, heldout=args.heldout)
        tokens, heldout = split.train, split.heldout
        out_dir = Path(args.work_dir) / store.diffusion.PAPER_TOKENS_DIR
        use = vqae.codebook_usage(tokens, "paper")
        print(
            f"[train-diffusion] the paper's token grids: {len(tokens.tokens)} for training, "
            f"{len(heldout.tokens)} held out; {use['codes used']} of {use['codebook K']} codes used, "
            f"perplexity {use['perplexity']:.1f}. The paper's VQ-AE is not released: these tokens train "
            "and sample a denoiser, but cannot be decoded to volumes."
        )
    elif args.heldout:
        raise SystemExit("train-diffusion: --heldout needs --tokens paper-release")
    run = store.diffusion.train(
        profile, Path(args.work_dir), device, tokens=tokens, out_dir=out_dir, progress=not args.no_progress
    )
    last = run.history[-1] if run.history else {}
    print(
        f"[train-diffusion] profile={profile.name} params={run.params:,} steps={len(run.history)} "
        f"final loss={last.get('loss', float('nan')):.4f} bits/token → {run.model_path}"
    )
    if heldout is not None and len(heldout.tokens):
        x = heldout.tokens.reshape(len(heldout.tokens), -1)
        ev = diffusion.evaluate_loss(
            run.denoiser, x, profile.diffusion.T, generator=torch.Generator().manual_seed(args.seed)
        )
        print(
            f"[train-diffusion] held-out ({len(x)} grids): loss {ev['loss']:.4f}, ELBO {ev['elbo']:.4f} "
            f"bits/token, accuracy {ev['accuracy']:.3f}"
        )
    return 0


# --------------------------------------------------------------------------------------------------
# Chapter 4: sample
# --------------------------------------------------------------------------------------------------


def add_sample(subparsers, common) -> None:
    p = subparsers.add_parser(
        "sample", parents=[common], help="chapter 4: sample synthetic pairs and export npz + nii.gz"
    )
    p.add_argument(  # --n-pairs too: under torchrun, --n is taken for an abbreviation of its --nnodes
        "--n",
        "--n-pairs",
        dest="n",
        type=int,
        default=None,
        help="number of pairs (default: sampling.n_pairs)",
    )
    p.add_argument("--out", type=str, default=None, help="output folder (default: <work-dir>/synthetic)")
    p.add_argument("--no-nifti", action="store_true", help="write only the npz files")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_sample)


def run_sample(args, profile: Profile) -> int:
    device = resolve_device(args.device)
    seed_everything(args.seed)
    report = store.sampling.sample_to_disk(
        profile, Path(args.work_dir), device, n=args.n, out_dir=args.out, seed=args.seed,
        nifti=False if args.no_nifti else None, progress=not args.no_progress,
    )  # fmt: skip
    print(
        f"[sample] {report.n} pairs → {report.out_dir} ({report.seconds_per_pair:.2f} s per pair sampling + "
        f"decoding, {report.network_calls} denoiser calls, export {report.seconds_export:.1f} s)"
    )
    if args.out is None:  # the reference set of the `reconstructions` regime, beside the synthetic pairs
        recon = store.sampling.write_reconstructions(profile, Path(args.work_dir), device)
        print(f"[sample] {len(recon)} VQ-AE reconstructions of the training pairs → {recon[0].parent}")
    return 0


# --------------------------------------------------------------------------------------------------
# Chapter 5: train-registration
# --------------------------------------------------------------------------------------------------


def add_registration(subparsers, common) -> None:
    p = subparsers.add_parser(
        "train-registration", parents=[common], help="chapter 5: train the two-step registration network"
    )
    p.add_argument(
        "--regime", default=None, choices=sorted(registration.REGIMES),
        help="which training pairs (default: every regime)",
    )  # fmt: skip
    p.add_argument(
        "--runs", type=int, default=None,
        help="training runs (seeds --seed, --seed + 1, …) per regime (default: registration.seeds for the "
        "regimes in registration.seed_regimes, else 1); run k > 0 writes registration/<regime>-run<k>/",
    )  # fmt: skip
    p.set_defaults(func=run_train_registration)


def run_train_registration(args, profile: Profile) -> int:
    device = resolve_device(args.device)
    if args.runs is not None and args.runs < 1:
        raise SystemExit(f"train-registration: --runs must be >= 1, got {args.runs}")
    trained = store.registration.train_regimes(
        profile, Path(args.work_dir), device, args.seed, regimes=[args.regime] if args.regime else None,
        runs=args.runs,
    )  # fmt: skip
    for (regime, run), result in trained.items():
        last = result.history[-1]["loss"] if result.history else float("nan")
        print(
            f"{store.registration.run_name(regime, run)}: {result.n_pairs} pairs, final loss {last:.4f}, "
            f"{result.seconds:.1f} s → {result.path}"
        )
    return 0


# --------------------------------------------------------------------------------------------------
# Chapter 6: evaluate
# --------------------------------------------------------------------------------------------------


def add_evaluate(subparsers, common) -> None:
    p = subparsers.add_parser(
        "evaluate", parents=[common], help="chapter 6: TRE, Dice, folding and IC error on the test pairs"
    )
    p.add_argument(
        "--checkpoint",
        default="real_all",
        help="(default real_all) a regime name (work_dir/registration/<regime>/model.pt), a model file, a released "
        "regnets_state_*.pth, or 'identity'",
    )
    p.add_argument("--tta", type=int, default=None, help="TTA iterations (default: the profile's)")
    p.add_argument("--json", type=str, default=None, help="write per-case results and the summary here")
    p.add_argument(
        "--csv", type=str, default=None,
        help="write the per-landmark TRE here, in the shape of the paper's result CSVs (initial, network, TTA)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args, profile: Profile) -> int:
    seed_everything(args.seed)
    device = resolve_device(args.device)
    test = store.data.load_pairs(profile, args.work_dir, "test")
    landmarks = store.data.load_landmarks(profile, args.data_dir, test.cases)
    model = None
    if args.checkpoint != "identity":
        model = store.registration.load_registration(profile, args.work_dir, args.checkpoint, device)
    label, regime = store.metrics.checkpoint_label(model, args.checkpoint)
    tta = profile.evaluation.tta_iterations if args.tta is None else args.tta
    # torchrun: each rank evaluates its share of the test pairs; rank 0 gets them all back and reports
    evaluation = distributed.evaluate_split(lambda t, lm: metrics.evaluate_model(
        profile, model, t, lm, name=label, tta_iterations=tta, device=device, progress=not args.no_progress,
    ), test, landmarks)  # fmt: skip
    if not distributed.is_main():
        return 0
    try:  # the paper's numbers on the same pairs, from its result CSVs
        counts = [
            len(f) for f in store.data.load_landmarks(profile, args.data_dir, ALL_TEST_CASES).canonical_fixed
        ]
        paper = store.metrics.paper_results(args.data_dir, counts)
    except (FileNotFoundError, ValueError) as err:
        print(f"(the paper's numbers are not shown: {err})")
        paper = None
    split = [c for c in BENCHMARK_TEST_CASES if c in test.cases]
    tables = {"all": metrics.comparison_rows({regime or label: evaluation}, paper, test.cases)}
    if split:
        tables["104_113"] = metrics.comparison_rows({regime or label: evaluation}, paper, split)
    result = {
        "checkpoint": args.checkpoint,
        "label": label,
        "regime": regime,
        "profile": profile.name,
        "test_cases": list(test.cases),
        "tta_iterations": evaluation.tta_iterations,
        "summary": evaluation.summary(),
        "summary_104_113": evaluation.summary(BENCHMARK_TEST_CASES),
        "comparison": tables["all"],
        "comparison_104_113": tables.get("104_113"),
        "per_case": evaluation.per_case_rows(),
        "seconds": evaluation.seconds,
    }
    print(markdown_table(evaluation.per_case_rows(), digits=2))
    n_all = evaluation.summary()["n_landmarks"]
    print(
        f"\n{label}, mean TRE over {len(test)} test pairs ({n_all} landmarks); paper: the same pairs in its CSVs"
    )
    print(markdown_table(tables["all"], digits=2))
    if split:
        n_split = evaluation.summary(split)["n_landmarks"]
        print(f"\nbenchmark test split 104–113: {len(split)} of its 10 pairs here ({n_split} landmarks)")
        print(markdown_table(tables["104_113"], digits=2))
    s = result["summary"]
    print(f"\nmean TRE: initial {s['tre_initial']:.2f} mm, network {s['tre_net']:.2f} mm", end="")
    print(f", after {tta} TTA iterations {s['tre_tta']:.2f} mm" if s.get("tre_tta") is not None else "")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(jsonable(result), indent=2) + "\n")
    if args.csv:
        print(f"per-landmark TRE → {store.metrics.write_per_landmark_csv(evaluation, args.csv)}")
    return 0


# --------------------------------------------------------------------------------------------------
# make gpu-check
# --------------------------------------------------------------------------------------------------


def add_gpu_check(subparsers, common) -> None:
    p = subparsers.add_parser("gpu-check", parents=[common], help="paper-size timings on the GPU")
    p.add_argument("--small", action="store_true")
    p.add_argument("--out", type=Path, default=Path("_build/gpu_check.json"))
    p.set_defaults(
        func=lambda args, profile: bench.main(
            ["--device", args.device, "--out", str(args.out)] + (["--small"] if args.small else [])
        )
    )


#: Every stage, in pipeline order.
STAGES = (add_prepare, add_vqae, add_diffusion, add_sample, add_registration, add_evaluate, add_gpu_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m regdiff_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", metavar="<stage>")
    sub.required = True
    common = common_parser()
    for add in STAGES:
        add(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "data_dir", None) is None and hasattr(args, "data_dir"):
        args.data_dir = str(default_data_dir())
    if getattr(args, "work_dir", None) is None and hasattr(args, "work_dir"):
        args.work_dir = str(default_work_dir())
    try:
        profile = profile_from_args(args)
    except ConfigError as err:
        parser.error(str(err))
    try:
        # under torchrun: join the process group; this rank's device (regdiff_core.distributed)
        if hasattr(args, "device"):
            args.device = distributed.init_from_env(args.device, args.stage)
        result = args.func(args, profile)
    except project_errors() as err:  # a message that names the file or setting, not a traceback
        rank = distributed.context()
        print(f"error{f' (rank {rank.rank})' if rank.active else ''}: {err}", file=sys.stderr)
        return 2
    distributed.shutdown()
    return int(result or 0)


def project_errors() -> tuple[type[BaseException], ...]:
    """The exceptions whose message says what is wrong and what to do; the CLI prints them as ``error:``."""
    from data_download import DownloadError
    from regdiff_core.data import DataError
    from regdiff_core.training import CheckpointError, NonFiniteLossError
    from regdiff_core.utils import DeviceError

    return (
        ConfigError, DataError, DownloadError, CheckpointError, NonFiniteLossError, DeviceError,
        FileNotFoundError,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
