"""Decode speed: Qwen3KVDecoder (KV cache) vs FullForwardDecoder (full MindFormers forward each token).

Runs ``sample_groups`` (host sampling included) for P prompts x G samples x N new tokens on a randomly
initialised model from a model YAML and prints generated tokens/s, after one warm-up call per decoder
(compilation). Usage::

    python scripts/bench_decode.py [--prompts 16 --group 16 --new-tokens 4]
"""
import argparse
import logging
import statistics
import time

from recast_ms.cli import add_verbose, command, setup_logging

PAD, EOS = 0, 1


@command
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-yaml", default="qwen3_tiny.yaml")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=40, help="longest prompt (lengths vary down to 3/4 of it)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-full", action="store_true", help="only time the KV decoder")
    add_verbose(parser)
    args = parser.parse_args()
    setup_logging(args.verbose)  # before MindSpore is imported below
    logging.disable(logging.INFO)  # MindFormers logs its whole converted config at INFO
    import numpy as np

    from recast_ms.models.qwen3 import build_qwen3
    from recast_ms.models.qwen3_kv import Qwen3KVDecoder
    from recast_ms.rollout.decoder import FullForwardDecoder
    from recast_ms.rollout.engine import sample_groups

    seq_length = args.prompt_len + args.new_tokens  # the full forward's static length: just long enough
    model = build_qwen3(args.model_yaml, vocab_size=args.vocab, seq_length=seq_length, pad_token_id=PAD,
                        eos_token_id=EOS, seed=0)
    rng = np.random.default_rng(0)
    lens = rng.integers(max(1, 3 * args.prompt_len // 4), args.prompt_len + 1, args.prompts)
    prompts = np.full((args.prompts, args.prompt_len), PAD, np.int64)
    for row, length in enumerate(lens):
        prompts[row, :length] = rng.integers(2, args.vocab, length)
    generated = args.prompts * args.group * args.new_tokens

    decoders = {"kv-cache": Qwen3KVDecoder(model, args.prompt_len, args.new_tokens, PAD)}
    if not args.skip_full:
        decoders["full-forward"] = FullForwardDecoder(model, seq_length, PAD)
    print(f"{args.model_yaml}: V={args.vocab}, {args.prompts} prompts x {args.group} samples x {args.new_tokens} "
          f"new tokens, prompt lengths {lens.min()}-{lens.max()}, seq_length {seq_length}")
    for name, decoder in decoders.items():
        def run(seed):
            # eos_id=-1: never stop early, every row generates new_tokens tokens
            return sample_groups(decoder, prompts, lens, group_size=args.group, max_new_tokens=args.new_tokens,
                                 eos_id=-1, pad_id=PAD, rng=np.random.default_rng(seed))
        start = time.perf_counter()
        run(0)
        compile_s = time.perf_counter() - start
        times = []
        for seed in range(1, args.repeats + 1):
            start = time.perf_counter()
            run(seed)
            times.append(time.perf_counter() - start)
        best, median = min(times), statistics.median(times)
        print(f"{name:>12}: {generated / median:8.0f} tokens/s (median {median:.3f} s, best {best:.3f} s "
              f"= {generated / best:.0f} tokens/s; first call incl. compile {compile_s:.1f} s)")


if __name__ == "__main__":
    main()
