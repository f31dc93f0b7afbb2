"""A semi-auto-parallel RL run started from a Hugging Face checkpoint, compiled under DryRun, one rank: the
micro-width model from a tiny random checkpoint this script writes, each parameter of the actor update and
reference graphs given only this rank's slice (``recast_ms.trainer.engines.load_sliced_start``), every slice
compared with the project's own slicing of the same tensor before the step runs (``recast_ms.dryrun``).

    python scripts/dryrun_sliced_start.py --layout tp   # DP 2 x TP 2 on 4 ranks, rank 0
    python scripts/dryrun_sliced_start.py --layout tp_op  # the same with optimizer parallel (DP-split weights)
    python scripts/dryrun_sliced_start.py --layout pp   # DP 1 x TP 2 x PP 2 on 4 ranks, rank 0 (stage 0)

Writes ``docs/bench/sliced_start/<layout>_r<rank>.json``. CI runs the pipeline case
(``tests/test_dryrun.py::test_pipeline_step_compiles_on_each_stage``)."""
import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

# optimizer parallel splits only parameters over parallel_optimizer_threshold (64 KB by default): tp_op's checkpoint
# is wide enough that the q/k/v, o and MLP weights are split over DP, the embedding and norms are not
WIDTH = {"tp_op": {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}}
LAYOUTS = {"tp": ["runtime.model_parallel=2"],
           "tp_op": ["runtime.model_parallel=2", "runtime.optimizer_parallel=true"],  # as the 8B / 14B configs
           "pp": ["runtime.model_parallel=2", "runtime.pipeline_stage=2", "runtime.micro_batch_num=2"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="tp")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "bench", "sliced_start"))
    p.add_argument("--summary", action="store_true", help="only print the finished JSONs' results, one line")
    args = p.parse_args()
    if args.summary:
        import glob

        found = {os.path.basename(f)[:-5]: json.load(open(f, encoding="utf-8"))  # pylint: disable=consider-using-with
                 for f in sorted(glob.glob(os.path.join(args.out, "*.json")))}
        print(json.dumps({k: {"error": v["error"], **(v["sliced_start"] or {})} for k, v in found.items()}))
        return 0
    from qwen3_numpy_ref import write_hf_model_dir

    from recast_ms import dryrun as dr

    with tempfile.TemporaryDirectory() as tmp:
        hf = write_hf_model_dir(os.path.join(tmp, "hf"), **WIDTH.get(args.layout, {}))
        overrides = [f"hf_checkpoint={hf}", "seq_length=32", "rl.prompts_per_step=4", "rl.group_size=4",
                     "rl.micro_batch_size=8", "rl.log_entropy=false", *LAYOUTS[args.layout]]
        report = dr.dryrun(None, overrides, world_size=4, ranks=[args.rank], phases=["rl"], stub=dr.find_stub(),
                           scratch=os.path.join(tmp, "scratch"), timeout=1800)
    rank = report["ranks"].get(str(args.rank), {})
    out = {"layout": args.layout, "world_size": 4, "rank": args.rank, "overrides": overrides[1:],
           "hf_config": WIDTH.get(args.layout, {}), "error": report["error"], "graphs": sorted(rank.get("graphs", {})),
           "sliced_start": rank.get("phases", {}).get("rl", {}).get("sliced_start"),
           "command": f"python scripts/dryrun_sliced_start.py --layout {args.layout} --rank {args.rank}"}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.layout}_r{args.rank}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out["sliced_start"]), "->", path)
    return 0 if out["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
