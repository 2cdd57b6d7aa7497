"""The `shardprop` command."""

from __future__ import annotations

import argparse
import sys

from service import train_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardprop", description="distributed data-parallel training")
    sub = parser.add_subparsers(dest="command", required=True)
    train_command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return train_command.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
