"""The `shardprop` command: run the service, and talk to it.

    shardprop serve [--host H] [--port P] [--store PATH] [--data-root DIR ...] [--ray-address ADDR]
                    [--limit NAME=VALUE ...]
                    [--allowed-host NAME ...]
    shardprop submit JOB.yaml [--follow]
    shardprop list | status ID | metrics ID | events ID [--follow] | cancel ID | resize ID N
    shardprop model ID -o FILE | predict ID ROWS.csv
    shardprop sweep submit SWEEP.yaml [--follow] | sweep list | sweep status|cancel ID | sweep best ID -o FILE
    shardprop diff JOB_A JOB_B         (specs, and parameters at every recorded step; exit 0 if identical)
    shardprop train JOB.yaml ...       (without a service)
    shardprop data prepare SOURCE OUT  (a data set prepared for sharded training)
    shardprop plan JOB.yaml --nodes N  (predicted step time, samples/s and efficiency; docs/scaling.md)

`--server URL` picks the service (default $SHARDPROP_SERVER, else
http://127.0.0.1:8470); the token comes from SHARDPROP_TOKEN. Every client
command goes through service.client.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from service import data_command, plan_command, sweep_command, train_command
from service.client import DEFAULT_SERVER, Client, Job, JobEnded, ShardpropError
from service.client.specs import load_spec_file
from service.states import STATES


class CommandError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardprop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=os.environ.get("SHARDPROP_SERVER", DEFAULT_SERVER),
                        help=f"the service's URL (default {DEFAULT_SERVER})")
    sub = parser.add_subparsers(dest="command", required=True)
    train_command.add_parser(sub)
    data_command.add_parser(sub)
    sweep_command.add_parser(sub)
    plan_command.add_parser(sub)

    p = sub.add_parser("serve", help="run the job service (HTTP API, queue, job store)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (non-loopback needs SHARDPROP_TOKEN, 16+ characters)")
    p.add_argument("--allowed-host", action="append", metavar="NAME[:PORT]",
                   help="also answer requests whose Host is this name (e.g. the compose name ray-head)")
    p.add_argument("--port", type=int, default=8470)
    p.add_argument("--store", help="the SQLite job store (default ~/.shardprop/shardprop.db); "
                                   "checkpoints and models go beside it")
    p.add_argument("--data-root", action="append", help="folders data paths are confined to (default: cwd)")
    p.add_argument("--ray-address", help="attach to this Ray cluster instead of a private local one")
    p.add_argument("--max-concurrent-jobs", type=int, default=1, help="jobs run at once (0 pauses execution)")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="an admission limit, e.g. max_parameters=100000000 (docs/service.md lists them; "
                        "also SHARDPROP_MAX_PARAMETERS=...)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug", "trace"))

    p = sub.add_parser("submit", help="submit a job spec (YAML or JSON)")
    p.add_argument("job")
    p.add_argument("--follow", action="store_true", help="show live progress until the job ends")
    p.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")

    p = sub.add_parser("list", help="list jobs, newest first")
    p.add_argument("--state", choices=STATES)
    for name, text in (("status", "a job's state, progress and latest metrics"),
                       ("metrics", "a job's per-step history (CSV), or its curves as a PNG with --plot"),
                       ("cancel", "cancel a queued or running job")):
        sub.add_parser(name, help=text).add_argument("id")
    sub.choices["metrics"].add_argument("--plot", metavar="FILE.png",
                                        help="draw loss, validation accuracy and samples/s into this PNG")
    p = sub.add_parser("resize", help="change the number of workers of a running job")
    p.add_argument("id")
    p.add_argument("workers", type=int)
    p = sub.add_parser("model", help="download the trained model file")
    p.add_argument("id")
    p.add_argument("-o", "--output", required=True, help="file to write")
    p = sub.add_parser("predict", help="predict for the rows of a CSV file (numbers only; a header is skipped)")
    p.add_argument("id")
    p.add_argument("rows")
    p = sub.add_parser("events", help="a job's timeline (state changes, failures, recoveries), one JSON per line")
    p.add_argument("id")
    p.add_argument("--since", type=int, default=0, help="only events numbered after this one")
    p.add_argument("--follow", action="store_true", help="go on until the job has ended")
    p = sub.add_parser("diff", help="compare two jobs: spec differences, then `identical` or the first step "
                                    "whose parameters differ (exit 0 identical, 1 not, 2 error)")
    p.add_argument("job_a")
    p.add_argument("job_b")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return train_command.run(args)
    if args.command == "data":
        return data_command.run(args)
    if args.command == "plan":
        return plan_command.run(args)
    try:
        if args.command == "serve":
            return serve(args)
        with Client(args.server) as client:
            return COMMANDS[args.command](client, args)
    except (ShardpropError, CommandError) as err:
        print(f"shardprop {args.command}: error: {err}", file=sys.stderr)
        return 2 if args.command == "diff" else 1
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------- serve


def serve(args) -> int:
    from pydantic import ValidationError

    from service.settings import LIMITS, Settings, is_loopback, token_weakness

    token = os.environ.get("SHARDPROP_TOKEN") or None
    if not is_loopback(args.host) and not token:
        raise CommandError(f"refusing to bind {args.host} (not loopback) without a token: set SHARDPROP_TOKEN")
    if not is_loopback(args.host) and token_weakness(token):
        raise CommandError(f"refusing to bind {args.host} (not loopback) with a weak SHARDPROP_TOKEN: "
                           f"{token_weakness(token)} (make one with: python -c 'import secrets; "
                           "print(secrets.token_urlsafe(32))')")
    if args.max_concurrent_jobs < 0:
        raise CommandError(f"--max-concurrent-jobs must be >= 0, got {args.max_concurrent_jobs}")
    kw = {"host": args.host, "port": args.port, "token": token, "ray_address": args.ray_address,
          "max_concurrent_jobs": args.max_concurrent_jobs, "allowed_hosts": args.allowed_host or []}
    if args.store:
        kw["store_path"] = Path(args.store).resolve()
    if args.data_root:
        kw["data_roots"] = [Path(r).resolve() for r in args.data_root]
    kw.update(_limits(args.limit, LIMITS))
    try:
        settings = Settings(**kw)
    except ValidationError as err:
        raise CommandError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())) from None
    os.umask(0o077)  # the store, checkpoints, models and logs this process (and a Ray it starts) writes: private
    from service.store_lock import StoreOwned, StoreOwner

    try:  # before anything else is done with the store or Ray: one service per store
        owner = StoreOwner.acquire(settings.store_path, settings.url)
    except StoreOwned as err:
        raise CommandError(str(err)) from None
    if args.ray_address:
        _check_reachable(args.ray_address)

    import uvicorn

    from service.api import create_app
    from service.signals import stacks_on_sigusr1

    app = create_app(settings, owner=owner)
    _log_to_stderr(args.log_level)
    stacks_on_sigusr1()
    print(f"shardprop service on http://{settings.host}:{settings.port} (store {settings.store_path}; "
          f"`kill -USR1 {os.getpid()}` prints every thread's stack here)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def _limits(given: list[str], names: tuple[str, ...]) -> dict[str, str]:
    """`--limit NAME=VALUE` arguments as settings (Settings checks the values)."""
    limits = {}
    for item in given:
        name, _, value = item.partition("=")
        if name not in names or not value:
            raise CommandError(f"--limit takes NAME=VALUE with NAME one of {', '.join(names)}, got {item!r}")
        limits[name] = value
    return limits


def _log_to_stderr(level: str) -> None:
    """shardprop's own messages (the scheduler's, the coordinators', the
    API's) to stderr beside uvicorn's, at the same level."""
    import logging

    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):  # uvicorn's "trace"
        number = logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    for name in ("shardprop", "workers", "core", "service"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(number)
        logger.propagate = False


def _check_reachable(address: str) -> None:
    """Fail fast on a Ray address nothing listens at: ray.init would retry
    for minutes while jobs sat queued."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "ray://...": left to Ray
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        raise CommandError(f"cannot reach Ray at --ray-address {address}: "
                           f"{err.strerror or err}; is `ray start --head` running there?") from None


# ---------------------------------------------------------------- client commands


def cmd_submit(client: Client, args) -> int:
    job = client.submit(load_spec_file(args.job), idempotency_key=args.idempotency_key)
    print(job.id)
    if not args.follow:
        return 0
    return follow(job, job.info.get("steps") or 0)


def follow(job: Job, total: int, interval: float = 0.25) -> int:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr, desc=job.id)
    seen = {"step": 0, "val": None, "waiting": None}

    def progress(status: dict) -> None:
        if status.get("waiting_for") != seen["waiting"]:
            seen["waiting"] = status.get("waiting_for")
            if seen["waiting"]:
                bar.write(f"queued: {seen['waiting']}", file=sys.stderr)
        bar.set_description(f"{job.id} {status['phase']}" if status.get("phase") else job.id, refresh=False)
        for m in job.metrics(since=seen["step"]):
            seen["step"] = max(seen["step"], m["step"])
            if m.get("val_accuracy") is not None:
                seen["val"] = m["val_accuracy"]
            shown = {"loss": f"{m['loss']:.4f}" if m.get("loss") is not None else "nan"}
            if m.get("samples_per_s"):
                shown["samples/s"] = f"{m['samples_per_s']:.0f}"
            if seen["val"] is not None:
                shown["val_acc"] = f"{seen['val']:.3f}"
            bar.set_postfix(shown, refresh=False)
        bar.update(seen["step"] - bar.n)

    try:
        final = job.wait(on_progress=progress, interval=interval)
    except JobEnded as err:
        final = err.job
    except KeyboardInterrupt:
        bar.close()
        print(f"stopped following; job {job.id} goes on (shardprop status {job.id}, "
              f"shardprop cancel {job.id})", file=sys.stderr)
        return 130
    finally:
        bar.close()
    line = f"job {job.id} {final['state']} at step {final['step']}/{final['steps']}"
    if final.get("error"):
        line += f": {final['error']}"
    print(line)
    return 0 if final["state"] == "succeeded" else 1


def cmd_list(client: Client, args) -> int:
    jobs = client.list(args.state)
    print(f"{'ID':<14}{'NAME':<24}{'STATE':<11}{'STEP':>13}  CREATED")
    for j in jobs:
        print(f"{j['id']:<14}{j['name'][:23]:<24}{j['state']:<11}{j['step']:>6}/{j['steps']:<6}  {j['created_at']}")
    return 0


def cmd_status(client: Client, args) -> int:
    job = client.status(args.id)
    print(json.dumps(job, indent=2))
    return 0


def cmd_metrics(client: Client, args) -> int:
    rows = client.metrics(args.id)
    if args.plot:
        from service.plot import plot_history

        plot_history(rows, args.plot, title=f"job {args.id}")
        print(f"wrote {args.plot}")
        return 0
    print("step,loss,val_loss,val_accuracy,samples_per_s,workers,lr")
    for m in rows:
        print(",".join("" if m.get(k) is None else str(m[k])
                       for k in ("step", "loss", "val_loss", "val_accuracy", "samples_per_s", "workers", "lr")))
    return 0


def cmd_cancel(client: Client, args) -> int:
    job = client.cancel(args.id)
    print(f"job {job['id']} {job['state']}")
    return 0


def cmd_resize(client: Client, args) -> int:
    job = client.resize(args.id, args.workers)
    print(f"job {job['id']} resizing to {job['workers']} workers")
    return 0


def cmd_model(client: Client, args) -> int:
    return save_model(Job(client, args.id).model, args.output)


def save_model(write, output: str) -> int:
    """`write(output)` (a Job's or a Sweep's model download), and say what was written."""
    try:
        out = write(output)
    except OSError as err:
        raise CommandError(f"cannot write {output}: {err.strerror}") from None
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


def _read_rows(path: str) -> list[list[float]]:
    import csv

    try:
        with open(path, newline="") as fh:
            lines = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except OSError as err:
        raise CommandError(f"cannot read {path}: {err.strerror}") from None
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append([float(c) for c in line])
        except ValueError:
            if i == 0:
                continue  # a header
            raise CommandError(f"{path} line {i + 1}: not all numbers: {','.join(line)[:80]}") from None
    if not rows:
        raise CommandError(f"{path} holds no rows")
    return rows


def cmd_predict(client: Client, args) -> int:
    result = client.predict(args.id, _read_rows(args.rows))
    if result.get("labels") is not None:
        for label in result["labels"]:
            print(label)
    else:
        for row in result["outputs"]:
            print(",".join(repr(v) for v in row))
    return 0


def cmd_events(client: Client, args) -> int:
    for event in Job(client, args.id).events(since=args.since, follow=args.follow):
        print(json.dumps(event), flush=True)
    return 0


def cmd_diff(client: Client, args) -> int:
    diff = client.diff(args.job_a, args.job_b)
    print("\n".join(diff.lines()))
    return 0 if diff.identical else 1


COMMANDS = {"submit": cmd_submit, "list": cmd_list, "status": cmd_status, "metrics": cmd_metrics,
            "events": cmd_events, "cancel": cmd_cancel, "resize": cmd_resize, "model": cmd_model,
            "predict": cmd_predict, "diff": cmd_diff, "sweep": sweep_command.run}


if __name__ == "__main__":
    sys.exit(main())
