"""``python -m regdiff_core <stage> --profile P``: every pipeline stage, headless.

The stages call the very functions the notebooks call. Each chapter module contributes its stages
through a ``register_cli(subparsers, common)`` function; this file only collects them.

Common options (every stage): ``--profile``, ``--data-dir``, ``--work-dir``, ``--device``, ``--seed``
and ``--set stage.field=value`` (repeatable) to override one profile value.

A stage that fails for a reason the project knows (a bad setting, file, checkpoint or download, a
diverged run, a missing device) prints ``error: <what and where, and what to do>`` and exits with 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from regdiff_core.config import ConfigError, Profile, get_profile
from regdiff_core.utils import default_data_dir, default_work_dir

#: Modules that contribute stages, in pipeline order.
STAGE_MODULES = (
    "regdiff_core.data",
    "regdiff_core.vqae",
    "regdiff_core.diffusion",
    "regdiff_core.sampling",
    "regdiff_core.registration",
    "regdiff_core.metrics",
    "regdiff_core.gpu_check",
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
    (:func:`regdiff_core.data.adopt_prepared_cases`)."""
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected STAGE.FIELD=VALUE")
        overrides[key.strip()] = value.strip()
    profile = get_profile(args.profile, overrides)
    if getattr(args, "stage", None) not in (None, "prepare", "gpu-check") and getattr(args, "work_dir", None):
        from regdiff_core.data import adopt_prepared_cases

        profile = adopt_prepared_cases(profile, args.work_dir, explicit=tuple(overrides))
    return profile


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m regdiff_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", metavar="<stage>")
    sub.required = True
    common = common_parser()
    for name in STAGE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # a chapter not written yet
                continue
            raise
        register = getattr(module, "register_cli", None)
        if register is not None:
            register(sub, common)
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
    from regdiff_core import distributed

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
