#!/bin/bash
# PLAN.md section 7: one short run of each kind on the 10M model, to estimate the beyond_10m CPU time
cd /work/main
O=/work/tmp/est10m
rm -rf $O/sft $O/rl_recast $O/rl_grpo
/usr/bin/time -v python scripts/sft.py --config model_configs/runs/sft_industrial.yaml --run-dir $O/sft \
  model_config=model_configs/qwen3_10m.yaml sft.dropout=0.2 sft.weight_decay=0.2 sft.steps=40 sft.warmup_steps=10 sft.save_every=40 \
  sft.eval_every=40 sft.log_every=10 > $O/sft.log 2>&1
for est in recast grpo; do
/usr/bin/time -v python scripts/train_rl.py --init $O/sft/checkpoints/step_40 --run-dir $O/rl_$est \
  model_config=model_configs/qwen3_10m.yaml rl.estimator=$est rl.lr=1e-4 rl.steps=6 rl.prompts_per_step=16 rl.group_size=16 \
  rl.save_every=40 rl.micro_batch_size=128 rl.kl_coef=0.001 data.reserved_valid_rows=1000 data.reserved_valid_seed=24 \
  rl.eval_every=6 data.max_eval_prompts=200 > $O/rl_$est.log 2>&1
done
echo done > $O/DONE
