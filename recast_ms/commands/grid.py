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
at the end and make the exit status non-zero; the report covers the cells that finished. Ctrl-C / SIGTERM
stop the running stage (TERM, then KILL after 5 s) and exit 130 / 143 naming it; a rerun resumes it.

``--report-only`` writes the report (``report.md``, ``results.json``, figures) and nothing else; the cells
are planned with the overrides recorded in ``preset.json`` (written when the grid starts), command-line
ones added. With no finished cell it is an error that writes nothing.

Issue 24's pre-registered pipeline (``docs/experiments/beyond/PLAN.md``; ``docs/experiments/beyond/RUNNING.md``):

* ``--preset beyond`` runs stage 1; once every stage-1 cell has finished it decides stage 2 by PLAN.md section 3
  (``recast_ms.grid.beyond_second_stage`` of the final reserved Pass@1), records it in ``<out>/stage2.json``
  (written once, read back on every rerun: the decision cannot drift) and runs those cells; once all have
  finished it writes ``<out>/selection.json`` (section 5's selected arm, section 3's grpo lr; written once).
  ``--report-only`` writes ``stage2.json`` / ``selection.json`` too when their inputs (every stage-1 cell /
  every cell) have finished: each is a pure function of those finished cells, the decision a running grid
  would record, and never written from part of them.
* ``--preset beyond_confirm`` and ``--preset beyond_10m`` are built from ``--selection`` (default
  ``<out>/../selection.json``); when every cell has finished, ``beyond_confirm`` writes ``verdict.json`` beside
  the selection (``recast_ms.beyond.write_verdict``) and ``beyond_10m`` writes ``<out>/scale.json`` (the 10M
  paired differences beside the tiny model's ``verdict.json``, PLAN.md section 7). ``beyond_10m`` starts its
  cells from the SFT checkpoint with the highest valid Pass@1 (``<out>/sft_choice.json``, written once).
"""
import json
import os
import sys
import time

from recast_ms.cli import base_parser, command, setup_logging
from recast_ms.utils.interrupt import run_child

from recast_ms.config import ConfigError
from recast_ms.config import REPO_ROOT as ROOT

def _run(cmd, log_path, what):
    """Run one stage (``what``: ``SFT <key>`` / ``cell <name>``), its output appended to ``log_path``; returns
    (rc, seconds). A signal stops the stage before the grid exits (``run_child``)."""
    t0 = time.time()
    rc = run_child(cmd, f"[grid] {what}", f"rerun the same command to resume it (finished cells are skipped; "
                   f"{log_path} has its last lines)", log_path=log_path, cwd=ROOT)
    return rc, time.time() - t0


def _recorded(path, preset_name):
    """What the grid recorded in ``preset.json`` when it started ({} when it never did)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            rec = json.load(f)
    except ValueError as e:
        raise ConfigError(f"{path}: not JSON ({e})") from None
    if rec.get("preset") != preset_name:
        raise ConfigError(f"{path}: the grid there ran --preset {rec.get('preset')}, not --preset {preset_name}")
    return rec


def _tail(path, n=15):
    with open(path) as f:
        return "".join(f.readlines()[-n:])


def _load_selection(path, preset_name):
    """The beyond grid's ``selection.json`` a derived preset is built from (one-line errors when unusable)."""
    if not os.path.exists(path):
        raise ConfigError(f"--preset {preset_name} needs the beyond grid's selection: {path} does not exist (run "
                          f"--preset beyond until every cell finished, or pass --selection PATH)")
    try:
        with open(path) as f:
            sel = json.load(f)
    except ValueError as e:
        raise ConfigError(f"--selection {path}: not JSON ({e})") from None
    if not isinstance(sel, dict) or "grpo_lr" not in sel or "selected" not in sel:
        raise ConfigError(f"--selection {path}: not a selection.json of the beyond grid (needs selected, grpo_lr)")
    if not sel["selected"]:
        raise ConfigError(f"--selection {path}: no arm was selected (every variant arm is KL-excluded: "
                          f"{', '.join(sel.get('excluded', []))}); there is nothing to confirm")
    return sel


def _choose_sft(preset, sft_dirs, out, report_only, py):
    """``sft key -> checkpoint dir`` for the preset's ``sft_choice`` keys (PLAN.md section 7): every kept checkpoint of
    the SFT run evaluated on the whole valid split (``<out>/sft_valid_eval/<key>/step_N.json``, each once), the one
    with the highest valid Pass@1 (ties: the earlier step) recorded in ``<out>/sft_choice.json`` (written once)."""
    from recast_ms.beyond import choose_checkpoint, record_once
    from recast_ms.config import load_config
    from recast_ms.trainer import checkpoint as ckpt

    want = preset.get("sft_choice", {})
    path = os.path.join(out, "sft_choice.json")
    if not want:
        return {}
    if report_only or os.path.exists(path):
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            return {k: v["checkpoint"] for k, v in json.load(f).items()}

    def make():
        rec = {}
        for key, metric in want.items():
            sdir = sft_dirs[key]
            scfg = load_config(os.path.join(sdir, ckpt.CONFIG_FILE)).sft
            expect = sorted({s for s in range(scfg.save_every, scfg.steps + 1, scfg.save_every)} | {scfg.steps})
            have = dict(ckpt.checkpoints(sdir))
            missing = [s for s in expect if s not in have]
            if missing:
                raise ConfigError(f"SFT {key} ({sdir}): checkpoints at steps {missing} are gone (pruned: run the SFT "
                                  "with sft.keep_checkpoints=0, as the preset does); the start is chosen among all of "
                                  f"steps {expect}")
            evdir = os.path.join(out, "sft_valid_eval", key)
            os.makedirs(evdir, exist_ok=True)
            valid = {}
            for step in expect:
                res = os.path.join(evdir, f"step_{step}.json")
                if not os.path.exists(res):
                    cmd = [py, "-m", "recast_ms.commands.evaluate", "--run-dir", sdir, "--checkpoint", have[step],
                           "--split", "valid", "--out", res, "eval.beam_width=32", "eval.ks=[1,5,10,32]",
                           "eval.constrained=true"]
                    print(f"[grid] SFT {key}: valid evaluation of step {step} ...", flush=True)
                    rc, _ = _run(cmd, os.path.join(evdir, "stdout.log"), f"valid evaluation {key} step {step}")
                    if rc != 0:
                        sys.exit(f"[grid] valid evaluation of {have[step]} failed (exit {rc}); last lines of "
                                 f"{evdir}/stdout.log:\n" + _tail(os.path.join(evdir, "stdout.log")))
                with open(res) as f:
                    valid[step] = float(json.load(f)["model"][f"model/{metric}"])
            step = choose_checkpoint(valid)
            rec[key] = {"step": step, "checkpoint": have[step], "metric": f"valid {metric}",
                        "valid": {str(s): v for s, v in valid.items()}, "decided": time.strftime("%Y-%m-%d"),
                        "rule": "docs/experiments/beyond/PLAN.md section 7: highest valid Pass@1, ties the "
                                "earlier step"}
        return rec

    rec, written = record_once(path, make)
    for key, r in rec.items():
        print(f"[grid] SFT {key}: start from step {r['step']} ({r['metric']} {r['valid'][str(r['step'])]:.4f})"
              + ("" if written else f", recorded in {path}"), flush=True)
    return {k: v["checkpoint"] for k, v in rec.items()}


@command  # environment first; configuration errors as one line, exit 2
def main():
    p = base_parser(__doc__)
    from recast_ms.grid import DERIVED_PRESETS, PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS) + sorted(DERIVED_PRESETS), default="quick")
    p.add_argument("--out", required=True)
    p.add_argument("--sft", action="append", default=[], metavar="MODEL@DATA=DIR",
                   help="reuse a finished SFT run for one (model@dataset) of the preset")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the report from the finished cells under --out (runs nothing)")
    p.add_argument("--selection", default=None, metavar="FILE",
                   help=f"{' / '.join(sorted(DERIVED_PRESETS))}: the beyond grid's selection.json "
                        "(default <out>/../selection.json)")
    args = p.parse_args()
    setup_logging(args.verbose, None if args.report_only else args.out)  # report-only writes only the report
    from recast_ms.config import load_config
    from recast_ms.grid import cell_done, grid_report, pending_keys, plan_cells
    from recast_ms.trainer import checkpoint as ckpt

    out = os.path.abspath(args.out)
    sel, sel_path = None, None
    if args.preset in DERIVED_PRESETS:  # built from the recorded selection, so a rerun plans the same cells
        sel_path = os.path.abspath(args.selection or os.path.join(out, os.pardir, "selection.json"))
        sel = _load_selection(sel_path, args.preset)
        preset = DERIVED_PRESETS[args.preset](sel["selected"], grpo_lr=sel["grpo_lr"]["lr"])
    elif args.selection:
        raise ConfigError(f"--selection is for --preset {' / '.join(sorted(DERIVED_PRESETS))}, not {args.preset}")
    else:
        preset = PRESETS[args.preset]
    saved = os.path.join(out, "preset.json")
    overrides, recorded = list(args.overrides), {}
    if args.report_only:
        if not os.path.isdir(out):
            raise ConfigError(f"--out {args.out}: no such directory (--report-only reads a grid's finished cells)")
        recorded = _recorded(saved, args.preset)
        # the cells were run with these (the decisive preset's tuned rl.lr among them); later ones win
        overrides = list(recorded.get("overrides", [])) + overrides
    if sel is not None:
        prior = recorded or _recorded(saved, args.preset)
        if prior and prior.get("blocks") != json.loads(json.dumps(preset["blocks"])):
            raise ConfigError(f"{saved}: its cells ran with other blocks than {sel_path} now gives (the selection "
                              "changed after they ran); use another --out, or the selection they ran with")
    missing = pending_keys(preset, overrides)
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
    if args.report_only and not reuse:  # name the SFT runs the grid really used
        reuse = {k: v for k, v in recorded.get("sft_dirs", {}).items() if k in preset["sft"]}
    sft_dirs = {key: reuse.get(key) or os.path.join(out, "sft", key) for key in preset["sft"]}
    t0 = time.time()
    py = sys.executable

    timings = {}
    if not args.report_only:
        try:  # every cell (and an SFT the grid trains) would refuse its run directory: say so once, before any stage
            ckpt.check_run_dir(os.path.join(out, "cells"))
        except ConfigError as e:
            raise ConfigError(f"--out {args.out}: the grid's run directories would be refused ({e})") from None
        os.makedirs(os.path.join(out, "cells"), exist_ok=True)
        # recorded before any stage runs, so that a report-only run of an interrupted grid plans its cells as they ran
        with open(saved, "w") as f:
            json.dump({"preset": args.preset, "overrides": args.overrides, "sft_dirs": sft_dirs, **preset}, f, indent=1)
    for key, spec in preset["sft"].items():
        sdir = sft_dirs[key]
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
        rc, secs = _run(cmd + list(spec["overrides"]), os.path.join(sdir, "stdout.log"), f"SFT {key}")
        timings[f"sft/{key}"] = secs
        if rc != 0:
            sys.exit(f"[grid] SFT {key} failed (exit {rc}); last lines of {sdir}/stdout.log:\n"
                     + _tail(os.path.join(sdir, "stdout.log")))
    inits = _choose_sft(preset, sft_dirs, out, args.report_only, py)  # {} unless the preset chooses its SFT start

    cells = plan_cells(preset, sft_dirs, out, overrides)
    finished = {n: c for n, c in cells.items() if cell_done(c["run_dir"], c["steps"])}
    stage2_path = os.path.join(out, "stage2.json")
    if args.report_only and not finished:
        first = next(iter(cells.values()))
        raise ConfigError(f"--report-only: no finished cell under {out}/cells: none of the {len(cells)} cells of "
                          f"--preset {args.preset} has its final evaluation in metrics.jsonl (e.g. step "
                          f"{first['steps']} in {first['run_dir']}/metrics.jsonl); nothing written")
    if recorded.get("overrides"):
        print(f"[grid] cells planned with the overrides recorded in {saved}: {' '.join(recorded['overrides'])}",
              flush=True)
    failed = []

    def run_cells(todo, first=1, total=None):
        """Run (or, report-only, list) ``todo``'s cells in order; numbered ``first..`` of ``total``."""
        total = total or len(todo)
        for i, (name, c) in enumerate(todo.items(), first):
            if args.report_only or name in finished:
                status = ("not finished, left out of the report" if name not in finished
                          else "finished" if args.report_only else "done, skipped")
                print(f"[grid] {i}/{total} {name}: {status}", flush=True)
                continue
            os.makedirs(c["run_dir"], exist_ok=True)
            cmd = [py, "-m", "recast_ms.commands.rl", "--init", inits.get(c["sft"], c["sft_dir"]),
                   "--run-dir", c["run_dir"]]
            cmd += c["overrides"] + list(args.overrides)
            print(f"[grid] {i}/{total} {name} ...", end=" ", flush=True)
            rc, secs = _run(cmd, os.path.join(c["run_dir"], "stdout.log"), f"cell {name}")
            timings[f"cell/{name}"] = secs
            done = rc == 0 and cell_done(c["run_dir"], c["steps"])  # exit 0 alone does not make a finished cell
            status = ("ok" if done else f"FAILED (exit {rc})" if rc
                      else f"FAILED (exit 0 without its step-{c['steps']} evaluation)")
            print(f"{status} in {secs:.0f}s (grid {(time.time() - t0) / 60:.1f} min)", flush=True)
            if done:
                finished[name] = c
            else:
                failed.append(name)
                print(_tail(os.path.join(c["run_dir"], "stdout.log")), file=sys.stderr)

    stage2 = None
    stage1 = dict(cells)
    if preset.get("report") == "beyond" and os.path.exists(stage2_path):  # decided before: plan stage 2 up front
        from recast_ms.beyond import stage2_record

        stage2 = stage2_record(stage2_path, None)
        cells = plan_cells({**preset, "blocks": preset["blocks"] + stage2["blocks"]}, sft_dirs, out, overrides)
        finished.update({n: c for n, c in cells.items() if n not in finished and cell_done(c["run_dir"], c["steps"])})
    run_cells(cells)
    if preset.get("report") == "beyond" and stage2 is None and all(n in finished for n in stage1):
        # PLAN.md section 3: stage 2 once EVERY stage-1 cell has finished, from their final reserved Pass@1
        from recast_ms.beyond import arm_table, cell_runs, stage2_record

        stage2 = stage2_record(stage2_path, arm_table(*cell_runs(stage1)))
        print(f"[grid] stage 2 decided ({stage2_path}): divergent at weight {stage2['weight']}, beam versions of "
              f"{', '.join(stage2['beam_arms'])}", flush=True)
        cells = plan_cells({**preset, "blocks": preset["blocks"] + stage2["blocks"]}, sft_dirs, out, overrides)
        new = {n: c for n, c in cells.items() if n not in stage1}
        finished.update({n: c for n, c in new.items() if cell_done(c["run_dir"], c["steps"])})
        run_cells(new, len(stage1) + 1, len(cells))

    finished = {n: c for n, c in cells.items() if n in finished}  # the plan's order
    if not args.report_only:
        with open(os.path.join(out, "timings.json"), "a") as f:  # one line per invocation: resumed grids add up
            f.write(json.dumps({"preset": args.preset, "wall_s": time.time() - t0, **timings}) + "\n")
    if finished:
        kind = preset.get("report")
        if kind == "decisive":  # the pre-registered analysis: verdict.json + its report section
            from recast_ms.decisive import decisive_report

            report = decisive_report(finished, out, preset, sft_dirs, planned=len(cells))
        elif kind == "beyond":
            from recast_ms.beyond import arm_specs, arm_table, beyond_report, cell_runs, record_once, selection

            if stage2 is not None and len(finished) == len(cells):  # PLAN.md sections 3 and 5, decided once
                specs = arm_specs(preset["blocks"] + stage2["blocks"], preset["rl"])
                sel = record_once(os.path.join(out, "selection.json"),
                                  lambda: selection(arm_table(*cell_runs(finished)), specs))[0]
            report = beyond_report(kind, finished, len(cells), out, stage2=stage2,
                                   stage1_done=sum(n in finished for n in stage1), stage1_total=len(stage1), sel=sel)
        elif kind in ("beyond_confirm", "beyond_10m"):
            from recast_ms.beyond import beyond_report

            report = beyond_report(kind, finished, len(cells), out, sel=sel, sel_path=sel_path)
        else:
            report = grid_report(finished, out, preset, sft_dirs)
        print(report)
    print(f"\n[grid] {len(finished)}/{len(cells)} cells finished, this invocation {time.time() - t0:.0f}s; "
          + (f"report: {os.path.join(out, 'report.md')}" if finished else "no report written"))
    if failed:
        sys.exit(f"[grid] failed cells: {', '.join(failed)} (see cells/<name>/stdout.log); rerun to resume them")


if __name__ == "__main__":
    main()
