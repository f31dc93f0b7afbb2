"""PLAN.md §4: the lr criterion from the six runs' metrics.jsonl."""
import json, os, sys
import numpy as np
root = sys.argv[1]
res = {}
for lr in ("1e-4", "2e-4", "5e-4"):
    per = {}
    ok = True
    for est in ("grpo", "recast"):
        path = os.path.join(root, f"{est}_lr{lr}", "metrics.jsonl")
        rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
        steps = {r["step"]: r for r in rows if "reward/mean" in r}
        if 40 not in steps:
            ok = False
            per[est] = {"finished": False, "last_step": max(steps) if steps else 0}
            continue
        rew = float(np.mean([steps[s]["reward/mean"] for s in range(21, 41)]))
        kl = float(np.mean([steps[s]["actor/kl"] for s in range(31, 41)]))
        finite = all(np.isfinite(steps[s]["actor/loss"]) for s in steps)
        per[est] = {"finished": True, "reward_mean_21_40": rew, "kl_mean_31_40": kl, "finite": finite}
        ok &= finite and kl <= 0.1
    crit = float(np.mean([per[e]["reward_mean_21_40"] for e in per if per[e].get("finished")])) if all(per[e].get("finished") for e in per) else None
    res[lr] = {"runs": per, "criterion": crit, "eligible": bool(ok)}
elig = {lr: r["criterion"] for lr, r in res.items() if r["eligible"] and r["criterion"] is not None}
best = max(elig.values()) if elig else None
chosen = None
if elig:
    # a candidate within 0.002 of the best loses to a smaller one
    for lr in sorted(elig, key=float):
        if elig[lr] >= best - 0.002:
            chosen = lr
            break
res["_chosen"] = chosen
print(json.dumps(res, indent=1))
