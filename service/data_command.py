"""`shardprop data prepare SOURCE OUT`: a data set prepared for sharded training;
`shardprop data verify OUT`: every file of one checked against its manifest.

Streams SOURCE (a .csv, .parquet, folder of .parquet files, .npz, or a built-in
name) into the prepared directory OUT (docs/data.md), with a progress bar on
stderr: a live bar on a terminal, a plain line every few seconds otherwise.
A bad source exits 1 with the DataError's message (file, row or column, and
what is wrong).
"""

from __future__ import annotations

import sys
import time

from core.datafiles import DataError


def add_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare data sets for sharded training")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("prepare", help="stream a CSV, Parquet, .npz or built-in set into a prepared directory")
    p.add_argument("source", help="a .csv, .parquet or .npz file, a folder of .parquet files, or a built-in name")
    p.add_argument("out", help="the directory to create (must not exist)")
    p.add_argument("--label-column", help="the label column's name, or its index (default: the last column)")
    p.add_argument("--validation-split", type=float, default=0.2, help="fraction of rows held out (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="the split's seed (data.split_seed; default 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="how the features are stored (default float32)")
    p.add_argument("--block-rows", type=int, help="rows per block file (default: about 16 MiB of features)")
    p = sub.add_parser("verify", help="check every file of a prepared set against its manifest")
    p.add_argument("location", help="the prepared directory, or s3://bucket/prefix")


def _label(text: str | None) -> str | int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return text


class ProgressBar:
    """Reading then writing, shown as tqdm bars on a terminal, else as plain lines."""

    def __init__(self, stream=sys.stderr, every_s: float = 2.0):
        self.stream, self.every_s = stream, every_s
        self.tty = stream.isatty()
        self.started = self.last = time.monotonic()
        self.bar = None
        self.stage = None

    def __call__(self, p) -> None:
        now = time.monotonic()
        rate = p.bytes / max(now - self.started, 1e-9) / 1e6
        if self.tty:
            self._tqdm(p, rate)
        elif p.stage == "done" or p.stage != self.stage or now - self.last >= self.every_s:
            if p.stage == "read":
                line = f"read {p.rows} rows, {p.bytes / 1e6:.1f} of {p.total_bytes / 1e6:.1f} MB ({rate:.1f} MB/s)"
            elif p.stage == "write":
                line = f"wrote {p.blocks} of {p.total_blocks} blocks"
            else:
                line = f"done: {p.rows} rows, {p.total_blocks} blocks in {now - self.started:.1f} s"
            print(line, file=self.stream, flush=True)
            self.last = now
        self.stage = p.stage

    def _tqdm(self, p, rate: float) -> None:
        from tqdm import tqdm

        if p.stage != self.stage:
            self.close()
            if p.stage == "read":
                self.bar = tqdm(total=p.total_bytes, unit="B", unit_scale=True, desc="read", file=self.stream)
            elif p.stage == "write":
                self.bar = tqdm(total=p.total_blocks, unit="block", desc="write", file=self.stream)
        if self.bar is None:
            return
        if p.stage == "read":
            self.bar.update(p.bytes - self.bar.n)
            self.bar.set_postfix_str(f"{p.rows:,} rows", refresh=False)
        elif p.stage == "write":
            self.bar.update(p.blocks - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args) -> int:
    if args.data_command == "verify":
        return verify(args)
    from core.prepared import prepare

    bar = ProgressBar()
    try:
        prepared = prepare(args.source, args.out, label_column=_label(args.label_column),
                           validation_split=args.validation_split, seed=args.seed, dtype=args.dtype,
                           block_rows=args.block_rows, progress=bar)
    except DataError as err:
        bar.close()
        print(f"shardprop data prepare: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a folder it may not write: nothing is left under OUT
        bar.close()
        print(f"shardprop data prepare: error: cannot write {args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        return 130
    bar.close()
    m = prepared.manifest
    kind = f"{m['classes']} classes" if m["task"] == "classification" else f"{m['targets']} targets"
    print(f"prepared {args.out}: {prepared.n_train} training and {prepared.n_val} validation rows, "
          f"{prepared.n_features} features, {kind}, {len(m['files'])} files "
          f"(manifest sha256 {prepared.manifest_sha256[:16]})")
    return 0


def verify(args) -> int:
    from core.prepared import PreparedSet

    try:
        prepared = PreparedSet.open(args.location)
        prepared.verify()
    except DataError as err:
        print(f"shardprop data verify: error: {err}", file=sys.stderr)
        return 1
    print(f"{args.location}: {len(prepared.manifest['files'])} files match the manifest "
          f"(sha256 {prepared.manifest_sha256[:16]})")
    return 0
