"""Compile a run's Ascend graphs on a machine without Ascend (MindSpore DryRun) and report their memory.

MindSpore's DryRun (``MS_SIMULATION_LEVEL=1``; MindSpore tutorials, "Debugging / DryRun") mocks every
device-side call and runs only the host side: each graph is compiled for Ascend exactly as on a cluster, its
kernels are selected and its device memory is planned, while the device outputs are dummies. MindSpore's
Ascend plugin still links against CANN; ``../shared/tools/ascend-dryrun/build.sh`` builds a stand-in for it
(every function returns 0). Nothing here needs an Ascend device.

:func:`dryrun` runs, for each chosen rank and each phase (``sft``: one SFT step and the validation forward;
``rl``: one RL step: KV-decoder rollout, the estimator's selection, reference forward, actor update), one
process with ``RANK_SIZE`` / ``RANK_ID`` set, in a scratch directory (DryRun writes ``execute_order/``,
``rank_0/`` and ``offload/`` into the working directory). Per rank and graph it reports compiled yes/no and the
simulated device peak: per graph from MindSpore's memory pool (``mindspore.runtime.max_memory_allocated``, reset
before each graph's first call), per phase from the lines MindSpore prints when the device is released
(``Used peak memory usage (without fragments)`` / ``Actual peak memory usage (with fragments)``).

That memory is MindSpore's static plan of the device memory (operator workspaces excluded), never checked
against Ascend hardware: a model of the cluster's memory, not a measurement. Compilation, kernel selection and
collectives are MindSpore's own: a graph that does not compile here does not compile on a cluster.

Host memory: the model is built under MindSpore's ``no_init_parameters``, so random initial weights are never
materialised on the host (the device side is mocked, so compiled graphs never need their values).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

PHASES = ("sft", "rl")
NOTE = ("DryRun needs no Ascend device: MindSpore compiles every graph for Ascend against a stand-in of CANN and "
        "mocks the device. peak_mb is MindSpore's simulated device-memory plan (operator workspaces excluded): a "
        "model of the cluster's memory, not a measurement.")
# printed by MindSpore (WARNING) when a process releases its simulated device
USED_PEAK = re.compile(r"Used peak memory usage \(without fragments\):\s*(\d+)M")
ACTUAL_PEAK = re.compile(r"Actual peak memory usage \(with fragments\):\s*(\d+)M")
BUILD_SH = os.path.join("tools", "ascend-dryrun", "build.sh")
RESULT_FILE = "dryrun_result.json"
# communication kernels in DryRun's execute_order/*.csv (one row per kernel launched, every graph of the process)
COLLECTIVE = re.compile(r'"[^"]*/(AllReduce|AllGather|ReduceScatter|Broadcast|AlltoAll|Send|Receive)-op\d+"')


class StubUnavailable(RuntimeError):
    """The CANN stand-in is neither cached nor buildable here; the message says why."""


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_dir() -> str:
    return os.environ.get("RECAST_SHARED", os.path.join(os.path.dirname(repo_root()), "shared"))


def default_stub_dir() -> str:
    return os.environ.get("ASCEND_DRYRUN_HOME", os.path.join(os.path.expanduser("~"), ".cache", "ascend-dryrun"))


def find_stub(stub_dir: Optional[str] = None) -> str:
    """The stand-in's directory (holding ``env.sh``): ``stub_dir`` as given, else the cache, built there with
    ``../shared/tools/ascend-dryrun/build.sh`` when absent. Raises :class:`StubUnavailable` naming the reason."""
    if stub_dir:
        if not os.path.exists(os.path.join(stub_dir, "env.sh")):
            raise StubUnavailable(f"--stub {stub_dir}: no env.sh there (build it with bash {BUILD_SH} {stub_dir})")
        return stub_dir
    out = default_stub_dir()
    if os.path.exists(os.path.join(out, "env.sh")):
        return out
    script = os.path.join(shared_dir(), BUILD_SH)
    if not os.path.exists(script):
        raise StubUnavailable(f"no CANN stand-in in {out} and no {script} to build it (../shared is not beside the repo)")
    if shutil.which("gcc") is None:
        raise StubUnavailable(f"no CANN stand-in in {out} and no gcc to build it with {script}")
    proc = subprocess.run(["bash", script, out], env={**os.environ, "PY": sys.executable}, capture_output=True,
                          text=True, check=False)
    if proc.returncode or not os.path.exists(os.path.join(out, "env.sh")):
        raise StubUnavailable(f"{script} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}")
    return out


def stub_env(stub: str) -> Dict[str, str]:
    """``os.environ`` plus what the stand-in's ``env.sh`` exports (its variables are its own business)."""
    proc = subprocess.run(["bash", "-c", 'source "$0" && env -0', os.path.join(stub, "env.sh")], capture_output=True,
                          check=True)
    env = dict(item.split("=", 1) for item in proc.stdout.decode().split("\0") if "=" in item)
    env["MS_SIMULATION_LEVEL"] = "1"  # level 0 compiles without the memory statistics
    return env


def parse_ranks(spec: str, world_size: int) -> List[int]:
    """``"0,N-1"`` (``N`` = the world size), ``"0,7"`` or ``"all"`` -> sorted rank ids in ``[0, world_size)``."""
    if spec == "all":
        return list(range(world_size))
    ranks = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(?:(\d+)|N\s*-\s*(\d+))\s*", part)
        rank = (int(m.group(1)) if m.group(1) else world_size - int(m.group(2))) if m else -1
        if not 0 <= rank < world_size:
            raise ValueError(f"--ranks {spec!r}: {part.strip()!r} is not a rank in [0, {world_size})")
        ranks.add(rank)
    return sorted(ranks)


def parse_peaks(log: str) -> Dict[str, Optional[int]]:
    """MindSpore's simulated peak (MB) of one process, from its log; None where it printed none."""
    used, actual = USED_PEAK.findall(log), ACTUAL_PEAK.findall(log)
    return {"peak_mb": max(map(int, used)) if used else None,
            "peak_with_fragments_mb": max(map(int, actual)) if actual else None}


def snapshot_source(root: str) -> str:
    """A copy of the ``recast_ms`` package under ``root`` (the rest of the repository and ``../shared`` linked, so
    relative paths resolve as before); returns the copy's repository root. MindSpore reads each ``construct``'s
    source text when it compiles the graph, minutes after the import: a file edited meanwhile makes the compile fail
    with a misleading error (seen: "name 'ResponseLogProbs' is not defined")."""
    src = repo_root()
    shutil.rmtree(os.path.join(root, "src"), ignore_errors=True)
    dest = os.path.join(root, "src", os.path.basename(src))
    os.makedirs(dest)
    for name in os.listdir(src):
        if name == "recast_ms":
            shutil.copytree(os.path.join(src, name), os.path.join(dest, name),
                            ignore=shutil.ignore_patterns("__pycache__"))
        elif not name.startswith("."):
            os.symlink(os.path.join(src, name), os.path.join(dest, name))
    if os.path.isdir(shared_dir()):
        os.symlink(shared_dir(), os.path.join(root, "src", "shared"))
    return dest


def count_collectives(workdir: str) -> Dict[str, int]:
    """Collective kernels the process's graphs launch (the data-parallel gradient AllReduce shows here). DryRun
    writes ``execute_order/`` on one device, ``rank_<id>/execute_order/`` once communication is initialised."""
    counts: Dict[str, int] = {}
    for path in sorted(glob.glob(os.path.join(workdir, "execute_order", "execute_order.csv"))
                       + glob.glob(os.path.join(workdir, "rank_*", "execute_order", "execute_order.csv"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            for op in COLLECTIVE.findall(f.read()):
                counts[op] = counts.get(op, 0) + 1
    return counts


def run_phase(config: Optional[str], overrides: Sequence[str], world_size: int, rank: int, phase: str, env: Dict[str, str],
              workdir: str, timeout: float, source: Optional[str] = None, layers: int = 0,
              init: Optional[str] = None) -> dict:
    """One (rank, phase) worker process in ``workdir``, importing ``recast_ms`` from ``source`` (default: this
    repository): its graphs, MindSpore's peak, wall time, host peak RSS."""
    os.makedirs(workdir, exist_ok=True)
    spec = {"config": os.path.abspath(config) if config else None, "overrides": list(overrides), "phase": phase,
            "world_size": world_size, "rank": rank, "layers": int(layers),
            "init": os.path.abspath(init) if init else None}
    with open(os.path.join(workdir, "spec.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)
    penv = dict(env, RANK_SIZE=str(world_size), RANK_ID=str(rank), GLOG_v=env.get("RECAST_DRYRUN_GLOG", "2"),
                PYTHONPATH=os.pathsep.join(p for p in (source or repo_root(), env.get("PYTHONPATH")) if p))
    log_path = os.path.join(workdir, "worker.log")
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "recast_ms.dryrun", "--worker", workdir], cwd=workdir, env=penv,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        status, usage = 0, None
        spin = _SpinDemoter(proc.pid)
        while True:  # wait4: this child's own peak RSS (getrusage(RUSAGE_CHILDREN) would mix ranks)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            spin.poll()
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    with open(log_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    result = {"graphs": {}, "error": None}
    res_path = os.path.join(workdir, RESULT_FILE)
    if os.path.exists(res_path):
        with open(res_path, encoding="utf-8") as f:
            result.update(json.load(f))
    if proc.returncode and not result["error"]:
        tail = " | ".join(text.strip().splitlines()[-3:])[-600:]
        why = f"timed out after {timeout:.0f} s" if wall >= timeout else f"exit code {proc.returncode}"
        result["error"] = f"rank {rank} {phase}: worker {why}; log {log_path}: {tail}"
    result.update(parse_peaks(text), collectives=count_collectives(workdir), wall_s=round(wall, 1),
                  host_peak_rss_mb=round(usage.ru_maxrss / 1024), log=log_path)
    result["compiled"] = result["error"] is None and bool(result["graphs"]) and \
        all(g["compiled"] for g in result["graphs"].values())
    return result


def dryrun(config: Optional[str], overrides: Sequence[str] = (), world_size: int = 1, ranks: Sequence[int] = (0,),
           phases: Sequence[str] = PHASES, stub: Optional[str] = None, scratch: Optional[str] = None,
           timeout: float = 3600.0, keep: bool = False, echo=None, layers: int = 0, init: Optional[str] = None) -> dict:
    """The report of :mod:`recast_ms.dryrun` (module docstring) for ``ranks`` of a ``world_size`` launch.

    One process per (rank, phase), one after the other (a big model's compile takes most of this machine's
    memory). ``layers`` (> 0) compiles the model YAML at that depth, its width unchanged (a model too big for this
    host's memory is compiled at 2 and 4 layers and its peak extrapolated per layer). ``init``: the RL phase's
    ``--init`` checkpoint (a sharded step of the same layout loads slice by slice, ``engines.load_sliced_init``).
    ``scratch`` (default: a new temporary directory, removed unless ``keep``) holds their working
    directories and logs."""
    report = {"config": config, "world_size": world_size, "overrides": list(overrides), "layers": int(layers) or None,
              "note": NOTE,
              "ranks": {}, "error": None}
    try:
        env = stub_env(find_stub(stub))
    except StubUnavailable as err:
        report["error"] = str(err)
        return report
    root = scratch or tempfile.mkdtemp(prefix="recast_dryrun_")
    try:
        source = snapshot_source(root)
        for rank in ranks:
            entry = {"compiled": True, "peak_mb": None, "peak_with_fragments_mb": None, "graphs": {}, "phases": {}}
            for phase in phases:
                res = run_phase(config, overrides, world_size, rank, phase, env,
                                os.path.join(root, f"rank{rank}_{phase}"), timeout, source, layers, init)
                entry["graphs"].update(res.pop("graphs"))
                entry["compiled"] = entry["compiled"] and res["compiled"]
                for key in ("peak_mb", "peak_with_fragments_mb"):
                    if res[key] is not None:
                        entry[key] = max(entry[key] or 0, res[key])
                if res["error"] and not report["error"]:
                    report["error"] = res["error"]
                if not keep:
                    res.pop("log")
                entry["phases"][phase] = res
                if echo:
                    echo(f"rank {rank} {phase}: compiled {res['compiled']}, simulated peak {res['peak_mb']} MB "
                         f"({res['peak_with_fragments_mb']} MB with fragments), {res['wall_s']} s, host peak RSS "
                         f"{res['host_peak_rss_mb']} MB" + (f"; error: {res['error']}" if res["error"] else ""))
            report["ranks"][str(rank)] = entry
    finally:
        if scratch is None and not keep:
            shutil.rmtree(root, ignore_errors=True)
    return report


# ----------------------------------------------------------------------------- the worker (one rank, one phase)


class _Probe:
    """Stands in for a graph callable: on its first call, resets MindSpore's peak-memory counter, runs it (compile +
    simulated run) and records compiled yes/no and the pool's peak under ``graphs[name]``."""

    def __init__(self, name: str, fn, graphs: dict, by_rows: bool = False):
        self.base, self.fn, self.graphs, self.by_rows = name, fn, graphs, by_rows
        self.name = name

    def __call__(self, *args, **kwargs):
        if self.by_rows:  # a new batch size is a new graph
            self.name = f"{self.base}_{args[0].shape[0]}rows"
        if self.name in self.graphs:
            return self.fn(*args, **kwargs)
        import mindspore as ms  # pylint: disable=import-outside-toplevel

        ms.runtime.reset_peak_memory_stats()
        self.graphs[self.name] = {"compiled": False, "peak_mb": None}
        t0 = time.time()
        print(f"[dryrun] {self.name}: compiling", flush=True)
        out = self.fn(*args, **kwargs)
        print(f"[dryrun] {self.name}: compiled and ran in {time.time() - t0:.1f} s", flush=True)
        self.graphs[self.name] = {"compiled": True, "peak_mb": round(ms.runtime.max_memory_allocated() / 2**20)}
        return out

    def __getattr__(self, item):
        return getattr(self.fn, item)


def _dryrun_config(spec: dict):
    """The run config of one phase: the user's, on Ascend, one step; the model YAML's vocabulary when neither
    ``vocab_size`` nor ``hf_checkpoint`` sets one (a launch passes the checkpoint, whose vocabulary that is)."""
    from recast_ms.config import load_config
    from recast_ms.runtime import read_model_yaml

    forced = ["runtime.device_target=Ascend", "sft.steps=1", "rl.steps=1"]
    cfg = load_config(spec["config"], list(spec["overrides"]) + forced)
    if spec.get("layers"):  # the real width at a reduced depth (per-layer extrapolation of the peak)
        import yaml

        raw = read_model_yaml(cfg.model_config_path)
        raw["model"]["model_config"]["num_hidden_layers"] = int(spec["layers"])
        path = os.path.abspath(f"model_{spec['layers']}layers.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(raw, f, sort_keys=False)
        cfg.model_config = path
    if not cfg.vocab_size and not cfg.hf_checkpoint:
        cfg.vocab_size = int(read_model_yaml(cfg.model_config_path)["model"]["model_config"].get("vocab_size") or 0)
    return cfg


def _sft_phase(cfg, rank: int, world: int, graphs: dict):
    """The graphs of ``recast_ms.trainer.sft.run_sft``'s step and validation forward on this rank, through the engine
    the plan picks (``engines.build_sft_engine``: this rank's rows on the data-parallel path, the global batch under
    semi-auto parallel). No checkpoint: at model scale it would write the weights and moments."""
    import numpy as np

    from recast_ms.models.policy import set_dropout
    from recast_ms.trainer.engines import build_sft_engine
    from recast_ms.trainer.setup import build_model, deferred_parameters, get_tokenizer, hf_start_sources, init_runtime, \
        load_splits, response_len
    from recast_ms.trainer.sft import encode_split

    splits = load_splits(cfg.data)
    tok = get_tokenizer(splits, os.path.abspath("tokenizer"), cfg)
    plan = init_runtime(cfg, world, stage="sft")
    with deferred_parameters():
        model = build_model(cfg, tok, seed=cfg.seed, dropout=cfg.sft.dropout, load_weights=not plan.use_parallel)
    R = response_len(splits)
    engine = build_sft_engine(plan, model, cfg.sft, response_len=R, rows=cfg.sft.batch_size, world_size=world)
    rows = cfg.sft.batch_size // engine.host_world  # sft.batch_size is global
    ids, start, mask = encode_split(splits.train[:rows], splits, tok, cfg)
    set_dropout(model, True)
    sliced = None
    if plan.use_parallel and cfg.hf_checkpoint:  # run_sft's sliced start, checked before the step runs
        engine.compile_update(cfg.seq_length)
        n = engine.load_slices(hf_start_sources(cfg, model, cfg.seed), rank)
        sliced = _check_slices(cfg, [(engine.train_cell, model, "")], rank, {"model": n})
    _Probe("sft/train_step", engine.train_step, graphs)(ids, start, mask, float(mask.sum()), cfg.sft.lr)
    set_dropout(model, False)
    _Probe("sft/val_forward", engine.logps, graphs)(ids, start)
    if engine.kind != "sharded":
        return {}
    out = {"checkpoint": {"slice_shapes": _slice_shapes(engine.train_cell)}}
    if sliced is not None:
        out["sliced_start"] = sliced
    return out


def _slice_shapes(cell) -> dict:
    """Each parameter's full and per-rank slice shape as ``cell`` compiled (MindSpore's parameter_layout_dict:
    [dev_matrix, tensor_map, slice_shape, ...])."""
    shapes = {}
    for name, lay in sorted(cell.parameter_layout_dict.items()):
        dev, tmap, piece = list(lay[0]), list(lay[1]), [int(n) for n in lay[2]]
        full = [n * (dev[len(dev) - 1 - m] if m >= 0 else 1) for n, m in zip(piece, tmap)]
        shapes[name] = {"full": full, "slice": piece, "dev_matrix": dev, "tensor_map": tmap}
    return shapes


def _rl_phase(cfg, rank: int, world: int, graphs: dict, init: Optional[str] = None):
    from mindspore.nn.utils import no_init_parameters

    from recast_ms.trainer.rl import RLTrainer

    with no_init_parameters():
        trainer = RLTrainer(cfg, os.path.abspath("rl"), init, os.path.abspath("tokenizer"), progress=False, rank=rank,
                            world_size=world)
    dec = trainer.decoder
    for attr, name in (("_prefill", "rl/rollout_prefill"), ("_step", "rl/rollout_decode"),
                       ("_step_gather", "rl/rollout_decode_gather")):
        if hasattr(dec, attr):
            setattr(dec, attr, _Probe(name, getattr(dec, attr), graphs))
    if hasattr(dec, "_logits_at"):  # the sharded rollout: one graph per row count (P prompts, then P*G samples)
        dec._logits_at = _Probe("rl/rollout_forward", dec._logits_at, graphs, by_rows=True)
    if trainer.select_cell is not None:
        trainer.select_cell = _Probe(f"rl/select_{trainer.estimator}", trainer.select_cell, graphs)
    if trainer.reference is not None:
        trainer.reference.logps_fn = _Probe("rl/reference_forward", trainer.reference.logps_fn, graphs)
    if not trainer.on_policy:
        trainer.policy.logps_fn = _Probe("rl/old_logps", trainer.policy.logps_fn, graphs)
    update = f"rl/actor_update_{trainer.estimator}"
    if trainer.policy.kind == "sharded":
        trainer.policy.train_step = _Probe(update, trainer.policy.train_step, graphs)
    else:
        trainer.policy.opt.train_step = _Probe(update, trainer.policy.opt.train_step, graphs)
    sliced = None
    if trainer.sliced_from == "hf_checkpoint":
        sliced = _check_sliced_start(trainer, rank)
    elif trainer.sliced_from == "init":  # what each parameter holds, for a caller that knows the saved tensors
        sliced = {"loaded": dict(trainer.sliced_start), "sums": _param_sums(trainer)}
    trainer.step()
    if trainer.policy.kind != "sharded":
        return {}
    # the layout this rank's checkpoint slices follow: the actor update graph's strategy file, and each parameter's
    # slice shape as compiled (MindSpore's parameter_layout_dict: [dev_matrix, tensor_map, slice_shape, ...]). The
    # slices themselves are not written here: under DryRun the parameters hold no values
    from recast_ms.trainer import sharded_checkpoint as sc

    shapes = _slice_shapes(trainer.policy.train_cell)
    strategy = sc.strategy_file(trainer.run_dir, rank)
    out = {"checkpoint": {"strategy": strategy, "strategy_written": os.path.exists(strategy), "slice_shapes": shapes}}
    if sliced is not None:
        out["sliced_start"] = sliced
    return out


def _check_sliced_start(trainer, rank: int) -> dict:
    """A run from ``hf_checkpoint`` under semi-auto parallel (``engines.load_sliced_start``), checked before its
    step runs (:func:`_check_slices`) on the actor update graph and the reference forward."""
    engines = [(trainer.policy.train_cell, trainer.model, "")]
    if trainer.reference is not None:
        engines.append((trainer.reference.logps_fn, trainer.reference.model, "ref."))
    return _check_slices(trainer.cfg, engines, rank, trainer.sliced_start)


def _param_sums(trainer) -> dict:
    """``{"actor": {name: sum}, "reference": {name: sum}}`` of the parameters each compiled graph holds on this
    rank (float64 sums of the slices): enough to compare with slices a test cut itself."""
    out = {}
    engines = [("actor", trainer.policy.train_cell, trainer.model)]
    if trainer.reference is not None:
        engines.append(("reference", trainer.reference.logps_fn, trainer.reference.model))
    for role, cell, model in engines:
        held = cell.parameter_layout_dict
        out[role] = {p.name: float(p.asnumpy().astype("float64").sum()) for p in model.get_parameters()
                     if p.name in held}
    return out


def _check_slices(cfg, engines, rank: int, loaded) -> dict:
    """Every parameter each ``(compiled cell, model, name prefix)`` holds equals this rank's slice of the converted
    checkpoint tensor, cut here by the project's own rule (``sharded_checkpoint.slice_for_rank``, not MindSpore's
    slicer the load used), split once more along its first axis where optimizer parallel shards it
    (``opt_sharded`` counts those)."""
    from recast_ms.trainer import sharded_checkpoint as sc
    from recast_ms.trainer.setup import hf_start_sources

    import numpy as np

    sources = hf_start_sources(cfg, engines[0][1], cfg.seed)
    report = {"loaded": loaded, "checked": 0, "equal": 0, "opt_sharded": 0, "max_abs_diff": 0.0}
    for cell, model, strip in engines:
        layouts = cell.parameter_layout_dict
        for param in model.get_parameters():
            lay = layouts.get(param.name)
            if lay is None:
                continue
            full = sources[param.name[len(strip):]][0]()
            want = sc.slice_for_rank(full, list(lay[0]), list(lay[1]), rank)
            if lay[5]:  # optimizer parallel: the slice is split once more, over the ranks of its group
                from mindspore.communication import get_group_size, get_rank

                report["opt_sharded"] += 1
                want = np.split(want, get_group_size(lay[5]), axis=0)[get_rank(lay[5])]
            got = param.asnumpy()
            report["checked"] += 1
            if got.shape == want.shape:
                diff = float(np.max(np.abs(got - want))) if want.size else 0.0
                report["max_abs_diff"] = max(report["max_abs_diff"], diff)
                report["equal"] += int(diff == 0.0)
    return report


class _SpinDemoter:
    """MindSpore's simulated ACL runtime answers ``aclrtProcessReport`` at once, so each stream's callback thread
    (an unnamed thread of the Ascend resource manager) busy-waits for the whole DryRun: five of them took ~1.6 of
    the 2 cores while the worker's main thread compiled (seen 2026-12-07 with gdb: ``SimuFuncIaclrtProcessReport``).
    Polled by the parent while it waits (the worker's own Python threads cannot run while a compile holds the GIL):
    every unnamed thread of the worker but its main one that ran more than a fifth of the time since the last poll
    moves to ``SCHED_IDLE``, so it runs only on a core nothing else wants. Nothing else computes off the main thread
    (the device is mocked), and a scheduling class changes no result."""

    def __init__(self, pid: int):
        self.pid, self.ticks, self.demoted = pid, {}, set()
        self.last, self.hz = time.time(), os.sysconf("SC_CLK_TCK")

    def poll(self) -> None:
        if not hasattr(os, "SCHED_IDLE"):  # Linux only
            return
        now = time.time()
        window, self.last = now - self.last, now
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{self.pid}/task")]
            with open(f"/proc/{self.pid}/comm") as f:
                unnamed = f.read().strip()  # a thread nobody named keeps the process's name ("python", "python3")
        except OSError:
            return
        for tid in tids:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            name, fields = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            used = int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
            before, self.ticks[tid] = self.ticks.get(tid), used
            if tid == self.pid or tid in self.demoted or name != unnamed or before is None:
                continue
            if used - before > self.hz * window / 5:
                try:
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                except OSError:
                    pass
                self.demoted.add(tid)


def worker(workdir: str) -> int:
    """Run one (rank, phase) in ``workdir`` (its cwd); writes :data:`RESULT_FILE` even when a graph fails."""
    from recast_ms.cli import configure_environment, setup_logging

    configure_environment()
    setup_logging()
    print(f"[dryrun] recast_ms from {os.path.dirname(os.path.abspath(__file__))}", flush=True)
    with open(os.path.join(workdir, "spec.json"), encoding="utf-8") as f:
        spec = json.load(f)
    graphs: dict = {}
    result = {"graphs": graphs, "error": None}
    rank, world = spec["rank"], spec["world_size"]
    try:
        cfg = _dryrun_config(spec)
        if world > 1:
            from recast_ms.trainer.distributed import init_data_parallel

            rank, world = init_data_parallel("Ascend")
        if spec["phase"] == "rl":
            extra = _rl_phase(cfg, rank, world, graphs, init=spec.get("init"))
        else:
            extra = _sft_phase(cfg, rank, world, graphs)
        result.update(extra or {})
    except Exception as err:  # pylint: disable=broad-except  # reported per graph; the parent decides
        failed = [name for name, g in graphs.items() if not g["compiled"]]
        where = f" in graph {failed[0]}" if failed else ""
        result["error"] = f"rank {spec['rank']} {spec['phase']}{where}: {type(err).__name__}: {err}"[:2000]
        import traceback

        traceback.print_exc()
    with open(os.path.join(workdir, RESULT_FILE), "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2]))
    sys.exit("usage: recast-dryrun (recast_ms.commands.dryrun); python -m recast_ms.dryrun --worker DIR is internal")
