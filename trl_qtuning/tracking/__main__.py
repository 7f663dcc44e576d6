"""``python -m trl_qtuning.tracking sync OUTPUT_DIR [--tracking-uri URI]``: send what training could not."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trl_qtuning.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="Upload the metrics and artifacts a training run could not send to MLflow.")
    sync.add_argument("output_dir")
    sync.add_argument("--tracking-uri", default=None)
    args = parser.parse_args(argv)
    from . import sync_pending

    if sync_pending(args.output_dir, tracking_uri=args.tracking_uri):
        print(f"{args.output_dir}: nothing left to send.")
        return 0
    print(f"{args.output_dir}: the tracking server did not answer; try again later.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
