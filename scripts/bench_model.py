#!/usr/bin/env python
"""Model throughput on this machine, graph mode, fp32 (issue 3):

    python scripts/bench_model.py [--configs qwen3_tiny,qwen3_10m] [--batch 16] [--seq 128] [--vocab 1024] [--iters 5]

For each config: training tokens/s (forward + backward + clip + AdamW), log-prob tokens/s (forward,
``TokenLogProbs``) and decode tokens/s (KV-cache sampling, each prompt encoded once: P prompts x G
samples x N new tokens). Medians over ``--iters`` timed calls after a warm-up call that compiles.
Ends with ONE JSON line; its top-level ``train_tokens_per_s`` / ``logprob_tokens_per_s`` /
``decode_tokens_per_s`` are the first config's (tiny).
"""
import argparse
import json
import time

from recast_ms.cli import add_verbose, command, setup_logging


def _median_time(fn, iters):
    import numpy as np

    fn()  # compile / warm up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench(config, args):
    import contextlib
    import io

    import mindspore as ms
    import numpy as np

    from recast_ms.models.policy import TokenLogProbs
    from recast_ms.models.qwen3 import build_qwen3, count_parameters
    from recast_ms.models.qwen3_kv import Qwen3KVDecoder
    from recast_ms.rollout.engine import sample_groups
    from recast_ms.trainer.optim import Optimizer
    from recast_ms.trainer.sft import _sft_loss_cell

    V, S, B = args.vocab, args.seq, args.batch
    with contextlib.redirect_stdout(io.StringIO()):
        model = build_qwen3(f"model_configs/{config}.yaml", vocab_size=V, seq_length=S, pad_token_id=0, eos_token_id=1, seed=0)
    rng = np.random.default_rng(0)
    ids = ms.Tensor(rng.integers(2, V, (B, S)).astype(np.int32))
    # the SFT loss over every position after the first (response = S - 1 tokens): the whole sequence trains
    resp_start = ms.Tensor(np.ones(B, np.int32))
    mask = ms.Tensor(np.ones((B, S - 1), np.float32))
    opt = Optimizer(_sft_loss_cell(model, S - 1), model.trainable_params(), lr=1e-4, name=f"bench_{config}")

    def train_step():
        loss, _ = opt.accumulate(ids, resp_start, mask)
        opt.step(1e-4)
        loss.asnumpy()

    logps = TokenLogProbs(model)
    t_train = _median_time(train_step, args.iters)
    t_lp = _median_time(lambda: logps(ids).asnumpy(), args.iters)
    P, G, N, Tp = args.decode_prompts, args.decode_group, args.decode_new, args.decode_prompt_len
    dec = Qwen3KVDecoder(model, Tp, N, 0)
    p_ids = rng.integers(2, V, (P, Tp)).astype(np.int32)
    p_lens = np.full(P, Tp, np.int32)
    srng = np.random.default_rng(1)
    t_dec = _median_time(lambda: sample_groups(dec, p_ids, p_lens, group_size=G, max_new_tokens=N, eos_id=-1, pad_id=0,
                                               rng=srng), args.iters)
    return {
        "config": config, "params": count_parameters(model), "vocab": V,
        "train_batch": f"{B}x{S}", "train_step_s": t_train, "train_tokens_per_s": B * S / t_train,
        "logprob_tokens_per_s": B * S / t_lp,
        "decode": f"{P} prompts x {G} samples x {N} new tokens (prompt {Tp})", "decode_s": t_dec,
        "decode_tokens_per_s": P * G * N / t_dec,
    }


@command
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="qwen3_tiny,qwen3_10m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--decode-prompts", type=int, default=16)
    p.add_argument("--decode-group", type=int, default=16)
    p.add_argument("--decode-new", type=int, default=4)
    p.add_argument("--decode-prompt-len", type=int, default=44)
    add_verbose(p)
    args = p.parse_args()
    setup_logging(args.verbose)
    from recast_ms.trainer.setup import init_runtime

    init_runtime()
    results = []
    for c in args.configs.split(","):
        r = bench(c.strip(), args)
        results.append(r)
        print(f"{r['config']:>12}: {r['params'] / 1e6:.2f}M params | train {r['train_tokens_per_s']:.0f} tok/s "
              f"({r['train_batch']}, {r['train_step_s']:.3f} s/step) | log-prob {r['logprob_tokens_per_s']:.0f} tok/s | "
              f"decode {r['decode_tokens_per_s']:.0f} tok/s ({r['decode']})", flush=True)
    first = results[0]
    print(json.dumps({"train_tokens_per_s": first["train_tokens_per_s"],
                      "logprob_tokens_per_s": first["logprob_tokens_per_s"],
                      "decode_tokens_per_s": first["decode_tokens_per_s"], "configs": results}))


if __name__ == "__main__":
    main()
