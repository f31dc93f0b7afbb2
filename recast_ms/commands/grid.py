"""Experiment grid: estimators x seeds x group size x model size (x dataset), from one shared SFT
checkpoint per (model, dataset); resumable; writes ``results.json``, ``report.md`` and PNG figures
into ``--out``.

    recast-grid --preset quick --out runs/grid_quick [key=value ...]
    recast-grid --preset full --out runs/grid_full \\
        [--sft tiny@industrial=runs/sft_industrial --sft tiny@office=runs/sft_office]

Presets (``recast_ms/grid.py``): ``quick`` (the micro test model on the synthetic default: minutes on
2 cores, run by CI), ``full`` (real Amazon data: 5 estimators x 3 seeds on two model sizes, a
group-size sweep, and the held-out Office_Products dataset) and ``decisive`` (issue 14's pre-registered
experiment, ``docs/experiments/decisive/PLAN.md``; it needs ``rl.lr=<tuned value>`` on the command line
and reports through ``recast_ms/decisive.py``: ``verdict.json`` beside ``report.md``). ``--sft KEY=DIR`` reuses a finished SFT
run for that (model@dataset) instead of training one (its newest checkpoint is used as it is).
``key=value`` overrides apply to every RL cell.

Every cell runs in its own process (a crash stays in its cell, peak memory is the cell's own), logs
to ``cells/<name>/stdout.log``, and keeps its ``config.yaml`` beside its ``metrics.jsonl``. A cell that
reached its last step is skipped; a half-run one resumes from its checkpoint. Failed cells are listed
at the end and make the exit status non-zero; the report covers the cells that finished.
"""
import json
import os
import subprocess
import sys
import time

from recast_ms.cli import base_parser, configure_environment, setup_logging

from recast_ms.config import REPO_ROOT as ROOT


def _run(cmd, log_path):
    """Run one stage in its own process, its output appended to ``log_path``; returns (rc, seconds)."""
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return rc, time.time() - t0


def _tail(path, n=15):
    with open(path) as f:
        return "".join(f.readlines()[-n:])


def main():
    configure_environment()  # before MindSpore starts its runtime
    p = base_parser(__doc__)
    from recast_ms.grid import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", required=True)
    p.add_argument("--sft", action="append", default=[], metavar="MODEL@DATA=DIR",
                   help="reuse a finished SFT run for one (model@dataset) of the preset")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the report from the finished cells under --out (runs nothing)")
    args = p.parse_args()
    setup_logging()
    from recast_ms.config import load_config
    from recast_ms.grid import cell_done, grid_report, plan_cells
    from recast_ms.trainer import checkpoint as ckpt

    from recast_ms.grid import pending_keys

    preset = PRESETS[args.preset]
    missing = pending_keys(preset, args.overrides)
    if missing and not args.report_only:  # before any SFT or cell starts
        sys.exit(f"--preset {args.preset} needs " + "; ".join(f"{k}=... ({why})" for k, why in missing.items())
                 + " on the command line")
    reuse = {}
    for item in args.sft:
        key, _, path = item.partition("=")
        if key not in preset["sft"] or not path:
            sys.exit(f"--sft {item!r}: expected KEY=DIR with KEY one of {sorted(preset['sft'])}")
        if ckpt.latest_checkpoint(path) is None:
            sys.exit(f"--sft {item!r}: no checkpoint under {path}/checkpoints")
        reuse[key] = os.path.abspath(path)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "cells"), exist_ok=True)
    t0 = time.time()
    py = sys.executable

    sft_dirs, timings = {}, {}
    saved = os.path.join(out, "preset.json")
    if args.report_only and not reuse and os.path.exists(saved):  # name the SFT runs the grid really used
        with open(saved) as f:
            reuse = {k: v for k, v in json.load(f).get("sft_dirs", {}).items() if k in preset["sft"]}
    for key, spec in preset["sft"].items():
        sdir = reuse.get(key) or os.path.join(out, "sft", key)
        sft_dirs[key] = sdir
        if key in reuse or args.report_only:
            continue
        config = [os.path.join(ROOT, spec["config"])] if spec.get("config") else []
        last = ckpt.latest_checkpoint(sdir)
        # a finished SFT is not restarted: a process start + data load per grid invocation for nothing
        if last and int(os.path.basename(last).split("_")[-1]) >= load_config(*config or [None],
                                                                               spec["overrides"]).sft.steps:
            print(f"[grid] SFT {key}: finished before, not restarted", flush=True)
            continue
        os.makedirs(sdir, exist_ok=True)
        cmd = [py, "-m", "recast_ms.commands.sft", "--run-dir", sdir]
        cmd += ["--config", config[0]] if config else []
        print(f"[grid] SFT {key} -> {sdir}", flush=True)
        rc, secs = _run(cmd + list(spec["overrides"]), os.path.join(sdir, "stdout.log"))
        timings[f"sft/{key}"] = secs
        if rc != 0:
            sys.exit(f"[grid] SFT {key} failed (exit {rc}); last lines of {sdir}/stdout.log:\n"
                     + _tail(os.path.join(sdir, "stdout.log")))

    cells = plan_cells(preset, sft_dirs, out, args.overrides)
    failed = []
    for i, (name, c) in enumerate(cells.items(), 1):
        if args.report_only or cell_done(c["run_dir"], c["steps"]):
            print(f"[grid] {i}/{len(cells)} {name}: done, skipped", flush=True)
            continue
        os.makedirs(c["run_dir"], exist_ok=True)
        cmd = [py, "-m", "recast_ms.commands.rl", "--init", c["sft_dir"], "--run-dir", c["run_dir"]]
        cmd += c["overrides"] + list(args.overrides)
        print(f"[grid] {i}/{len(cells)} {name} ...", end=" ", flush=True)
        rc, secs = _run(cmd, os.path.join(c["run_dir"], "stdout.log"))
        timings[f"cell/{name}"] = secs
        print(f"{'ok' if rc == 0 else f'FAILED (exit {rc})'} in {secs:.0f}s "
              f"(grid {(time.time() - t0) / 60:.1f} min)", flush=True)
        if rc != 0:
            failed.append(name)
            print(_tail(os.path.join(c["run_dir"], "stdout.log")), file=sys.stderr)

    finished = {n: c for n, c in cells.items() if cell_done(c["run_dir"], c["steps"])}
    if not args.report_only:
        with open(os.path.join(out, "timings.json"), "a") as f:  # one line per invocation: resumed grids add up
            f.write(json.dumps({"preset": args.preset, "wall_s": time.time() - t0, **timings}) + "\n")
    if finished:
        if preset.get("report") == "decisive":  # the pre-registered analysis: verdict.json + its report section
            from recast_ms.decisive import decisive_report

            report = decisive_report(finished, out, preset, sft_dirs, planned=len(cells))
        else:
            report = grid_report(finished, out, preset, sft_dirs)
        print(report)
    print(f"\n[grid] {len(finished)}/{len(cells)} cells finished, this invocation {time.time() - t0:.0f}s; "
          f"report: {os.path.join(out, 'report.md')}")
    with open(os.path.join(out, "preset.json"), "w") as f:
        json.dump({"preset": args.preset, "overrides": args.overrides, "sft_dirs": sft_dirs, **preset}, f, indent=1)
    if failed:
        sys.exit(f"[grid] failed cells: {', '.join(failed)} (see cells/<name>/stdout.log); rerun to resume them")


if __name__ == "__main__":
    main()
