"""What holds a DryRun rank's device memory at its peak: MindSpore's memory tracker, grouped.

    MS_ALLOC_CONF="memory_tracker:True,memory_tracker_path:/tmp/trk" recast-dryrun --config <run yaml> \\
        --world-size W --ranks 0 --phases rl --layers 2 rl.estimator=recast runtime.world_size=0
    python scripts/dryrun_memory_breakdown.py /tmp/trk/rank_0/memory_block.csv --out docs/bench/....json

Every block alive at the pool's peak, summed by kind: the actor's weights, the reference's, the AdamW moments
(``Weight`` blocks by name), and kernel outputs by the operator that produced them (gradients, optimizer and
clip temporaries, activations). The tracker's run keeps blocks a little longer than a plain DryRun, so its peak
is above the one ``recast-dryrun`` reports; read the shares, not the total."""
import argparse
import collections
import csv
import json
import re
import sys


def breakdown(path: str) -> dict:
    csv.field_size_limit(sys.maxsize)
    rows = []
    with open(path, encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rows.append((int(r["start_time_stamp"]), int(r["end_time_stamp"]), int(r["size"]),
                         int(r["actual_used_memory"]), r["type"], r["node_name"], r["graph_name"]))
    peak = max(rows, key=lambda r: r[3])
    t = peak[0]
    alive = [r for r in rows if r[0] <= t < r[1]]
    groups, ops = collections.Counter(), collections.Counter()
    for _, _, size, _, kind, name, _ in alive:
        if kind == "Weight":
            key = ("weights/adam_moments" if ".adam_m." in name or ".adam_v." in name else
                   "weights/reference" if name.startswith("ref.") else
                   "weights/accu_grads" if "accu_grad" in name else "weights/actor")
        else:
            key = f"{kind.lower()}/" + ("optimizer" if "optimizer-" in name else "clip_grad_norm" if "clip_grad" in name
                                        else "gradients" if name.startswith("Gradients/") else
                                        "tensor_move" if "TensorMove" in name else "forward")
        groups[key] += size
        ops[re.sub(r"\d+", "N", name)[:120]] += size
    mb = 2 ** 20
    return {"peak_mb": round(peak[3] / mb, 1), "peak_graph": peak[6], "peak_node": peak[5],
            "alive_mb": {k: round(v / mb, 1) for k, v in groups.most_common()},
            "top_nodes_mb": {k: round(v / mb, 1) for k, v in ops.most_common(15)}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv")
    p.add_argument("--out")
    p.add_argument("--note", default="")
    args = p.parse_args()
    out = breakdown(args.csv)
    if args.note:
        out["note"] = args.note
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
