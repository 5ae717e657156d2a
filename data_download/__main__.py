"""``python -m data_download <dataset> --dest DIR [--cases 032 033 …] [--base-url URL] [--networks]``."""

from __future__ import annotations

import argparse
import sys

from data_download.core import DATASETS, DownloadError, fetch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_download",
        description="Download a dataset (checksums verified) to DIR, keeping the upstream paths.",
    )
    parser.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}")
    parser.add_argument("--dest", required=True, help="folder the files land in")
    parser.add_argument("--cases", nargs="+", metavar="ID", help="case ids (default: all), e.g. 032 033")
    parser.add_argument(
        "--base-url",
        help="mirror URL replacing the upstream one (default: $REGDIFF_DATA_URL / $REGDIFF_LUNG250M_URL)",
    )
    parser.add_argument(
        "--networks", action="store_true", help="also the paper's trained registration networks"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        paths = fetch(
            args.dataset,
            args.dest,
            cases=args.cases,
            base_url=args.base_url,
            networks=args.networks,
            progress=not args.no_progress,
        )
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(paths)} files of {args.dataset} verified under {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
