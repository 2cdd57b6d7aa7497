"""`shardprop train`: run one job directly, on Ray or in this process.

Without a service: a private local Ray by default, an existing cluster with
`--address`, or core's single-process reference trainer with `--reference`.
A large raw source is prepared into the cache first (core/data_source.py),
saying so on stderr. Shows a progress bar and writes the trained model file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from core.data import DataError
from core.spec import SpecError, load_spec, stop_step
from core.trainer import TrainingError, train

RUNS = Path.home() / ".shardprop" / "runs"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="run a job directly on Ray (or in-process with --reference)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", help="job spec, YAML or JSON")
    p.add_argument("--workers", type=int, help="gradient workers (overrides resources.workers)")
    p.add_argument("--address", help="attach to this Ray cluster instead of starting a private one")
    p.add_argument("--out", help="model file to write (default: <job name>.npz)")
    p.add_argument("--checkpoint-dir", help=f"where checkpoints go (default: a new folder under {RUNS})")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run whose checkpoints are in DIR")
    p.add_argument("--reference", action="store_true", help="core's single-process trainer, without Ray")
    p.add_argument("--data-root", action="append", help="confine data paths to these folders")


class Progress:
    """A tqdm bar fed by per-step records."""

    def __init__(self, total: int, initial: int = 0):
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                        disable=None)
        self.last_val = None

    def __call__(self, record: dict) -> None:
        if record.get("val_accuracy") is not None:
            self.last_val = record["val_accuracy"]
        shown = {"loss": f"{record['loss']:.4f}"}
        if record.get("samples_per_s"):
            shown["samples/s"] = f"{record['samples_per_s']:.0f}"
        if self.last_val is not None:
            shown["val_acc"] = f"{self.last_val:.3f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(record["step"] - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _fail(message: str, code: int = 1) -> int:
    print(f"shardprop train: error: {message}", file=sys.stderr)
    return code


def run(args) -> int:
    try:
        spec = load_spec(args.job)
        if args.workers is not None:
            spec = spec.with_workers(args.workers)
    except SpecError as err:
        return _fail(str(err), 2)
    out = Path(args.out or f"{spec.name}.npz")
    history: list[dict] = []
    progress = Progress(stop_step(spec))

    def on_step(record: dict) -> None:
        history.append(record)
        progress(record)

    try:
        prepare_data(spec, args.data_root)
        if args.reference:
            net, _ = train(spec, data_roots=args.data_root, on_step=on_step)
        else:
            net = _run_on_ray(spec, args, on_step, progress)
            if net is None:
                return 130
    except (DataError, TrainingError, ValueError) as err:
        progress.close()
        return _fail(str(err))
    progress.close()
    net.save(out)
    evaluated = [r for r in history if r.get("val_accuracy") is not None]
    summary = f"wrote {out}"
    if history:
        summary += f"; final loss {history[-1]['loss']:.4f}"
    if evaluated:
        summary += f", validation accuracy {evaluated[-1]['val_accuracy']:.4f}"
    print(summary)
    return 0


def prepare_data(spec, data_roots, every_s: float = 2.0) -> None:
    """Prepare a large raw source before training (once: later runs find it
    cached), with a status line on stderr every few seconds."""
    from core.data_source import resolve

    last = [0.0]

    def on_status(text: str) -> None:
        if time.monotonic() - last[0] >= every_s or text.endswith("done"):
            print(text, file=sys.stderr, flush=True)
            last[0] = time.monotonic()

    resolve(spec.data, dtype=spec.training.dtype, data_roots=data_roots, on_status=on_status)


def _run_on_ray(spec, args, on_step, progress):
    from workers.coordinator import Coordinator, JobCancelled
    from workers.checkpoint import list_checkpoints
    from workers.protocol import Event, Recovered, Resumed
    from workers.runtime import connect_ray

    if args.resume:
        directory = Path(args.resume)
        if not list_checkpoints(directory):
            raise ValueError(f"--resume {directory}: no checkpoints there")
    else:
        directory = Path(args.checkpoint_dir) if args.checkpoint_dir else \
            RUNS / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if list_checkpoints(directory):
            raise ValueError(f"--checkpoint-dir {directory} already holds checkpoints: "
                             f"pass --resume {directory} to continue that run, or choose an empty folder")
    import ray

    ours = not ray.is_initialized()  # a caller already connected keeps its connection
    connect_ray(args.address, spec.resources.workers)

    def on_event(event: Event) -> None:
        match event:
            case Resumed(step=step):
                progress.bar.update(step - progress.bar.n)
            case Recovered(step=step, seconds=seconds):
                progress.bar.write(f"recovered at step {step} in {seconds:.1f} s")

    coordinator = Coordinator(spec, directory, data_roots=args.data_root, on_step=on_step, on_event=on_event)
    print(f"checkpoints: {directory}", file=sys.stderr)
    try:
        return coordinator.run(resume=bool(args.resume))
    except (KeyboardInterrupt, JobCancelled):
        progress.close()
        print(f"interrupted; continue with: shardprop train {args.job} --resume {directory}", file=sys.stderr)
        return None
    finally:
        # Stop (or detach from) the Ray this command connected to now, not in
        # the interpreter's finalization, where a driver whose compiled graphs
        # lost actors has crashed (see tests/compiled_runs.py).
        if ours:
            ray.shutdown()
