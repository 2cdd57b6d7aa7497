"""`shardprop sweep ...`: submit a sweep and follow its leaderboard, list
sweeps, read or cancel one, download its best trial's model.

    shardprop sweep submit SWEEP.yaml [--follow]
    shardprop sweep list | status ID | cancel ID
    shardprop sweep best ID -o model.npz

`--follow` redraws the leaderboard in place on a terminal (a new table only
when it changed otherwise) until the sweep ends; exit 0 when it succeeded.
"""

from __future__ import annotations

import json
import sys

from service.client import Client, JobCancelled, JobFailed, Sweep
from service.client.specs import load_spec_file

CLEAR_LINES = "\x1b[{n}F\x1b[J"  # up n lines, then erase to the end of the screen


def add_parser(subparsers) -> None:
    sweep = subparsers.add_parser("sweep", help="hyperparameter sweeps: grid, random, successive halving")
    sub = sweep.add_subparsers(dest="sweep_command", required=True)
    p = sub.add_parser("submit", help="submit a sweep document (YAML or JSON)")
    p.add_argument("sweep")
    p.add_argument("--follow", action="store_true", help="show the live leaderboard until the sweep ends")
    p.add_argument("--idempotency-key", help="resubmitting with the same key returns the same sweep")
    sub.add_parser("list", help="list sweeps, newest first")
    for name, text in (("status", "a sweep's state and leaderboard (JSON)"),
                       ("cancel", "cancel a sweep and its queued and running trials")):
        sub.add_parser(name, help=text).add_argument("id")
    p = sub.add_parser("best", help="download the best trial's model (the file `shardprop model` writes)")
    p.add_argument("id")
    p.add_argument("-o", "--output", required=True, help="file to write")


def run(client: Client, args) -> int:
    return COMMANDS[args.sweep_command](client, args)


def cmd_submit(client: Client, args) -> int:
    sweep = client.submit_sweep(load_spec_file(args.sweep), idempotency_key=args.idempotency_key)
    print(sweep.id, flush=True)
    return follow(sweep) if args.follow else 0


def follow(sweep: Sweep, interval: float = 1.0) -> int:
    shown = {"text": None, "lines": 0}
    live = sys.stdout.isatty()

    def draw(status: dict) -> None:
        text = "\n".join(leaderboard_lines(status))
        if text == shown["text"]:
            return
        if live and shown["lines"]:
            sys.stdout.write(CLEAR_LINES.format(n=shown["lines"]))
        print(text, flush=True)
        shown.update(text=text, lines=text.count("\n") + 1)

    try:
        final = sweep.wait(on_progress=draw, interval=interval)
    except (JobFailed, JobCancelled) as err:
        final = err.job
    except KeyboardInterrupt:
        print(f"stopped following; sweep {sweep.id} goes on (shardprop sweep status {sweep.id}, "
              f"shardprop sweep cancel {sweep.id})", file=sys.stderr)
        return 130
    best = final.get("best")
    line = f"sweep {sweep.id} {final['state']}"
    if best is not None:
        line += f": best trial {best['trial']} ({final['objective']['metric']} {best['objective']:.6g}, job {best['job_id']})"
    if final.get("error"):
        line += f": {final['error']}"
    print(line)
    return 0 if final["state"] == "succeeded" else 1


def leaderboard_lines(status: dict) -> list[str]:
    """The sweep's header and its leaderboard as a table, best first."""
    counts = ", ".join(f"{n} {state}" for state, n in status["trial_states"].items() if n)
    objective = status["objective"]
    lines = [f"sweep {status['id']} ({status['name']}, {status['method']}): {status['state']}; trials: {counts}",
             f"{'RANK':<5}{'TRIAL':<6}{'STATE':<11}{'STEPS':>7}  {objective['metric'] + ' (' + objective['mode'] + ')':<22}VALUES"]
    for rank, entry in enumerate(status["leaderboard"], 1):
        value = "-" if entry["objective"] is None else f"{entry['objective']:.6g}"
        values = ", ".join(f"{path}={_short(v)}" for path, v in entry["values"].items())
        lines.append(f"{rank:<5}{entry['trial']:<6}{entry['state']:<11}{entry['steps_run']:>7}  {value:<22}{values}")
    return lines


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def cmd_list(client: Client, args) -> int:
    print(f"{'ID':<14}{'NAME':<24}{'STATE':<11}{'TRIALS':>6}  CREATED")
    for s in client.sweeps():
        print(f"{s['id']:<14}{s['name'][:23]:<24}{s['state']:<11}{s['trials']:>6}  {s['created_at']}")
    return 0


def cmd_status(client: Client, args) -> int:
    print(json.dumps(client.sweep_status(args.id), indent=2))
    return 0


def cmd_cancel(client: Client, args) -> int:
    sweep = client.cancel_sweep(args.id)
    print(f"sweep {sweep['id']} {sweep['state']}")
    return 0


def cmd_best(client: Client, args) -> int:
    from service.cli import save_model  # the command's module, which imports this one

    return save_model(client.sweep(args.id).best_model, args.output)


COMMANDS = {"submit": cmd_submit, "list": cmd_list, "status": cmd_status, "cancel": cmd_cancel, "best": cmd_best}
