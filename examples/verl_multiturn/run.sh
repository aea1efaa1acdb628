#!/usr/bin/env bash
# mica in a verl 0.9.1 multi-turn run: a tiny instruct model, 3 steps, one GPU.
#
#   bash examples/verl_multiturn/run.sh                                  # mica
#   bash examples/verl_multiturn/run.sh algorithm.adv_estimator=mica_adr # any verl override
#   bash examples/verl_multiturn/run.sh trainer.use_v1=false             # the legacy trainer
#
# Needs: a CUDA GPU, verl 0.9.1 with vLLM (pip install "verl[vllm]==0.9.1"), mica installed in
# the same environment (pip install -e . from the repository root), and network access to
# the Hugging Face Hub for the model (or MODEL=/path/to/a/local/model).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL="${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}"
DATA="${DATA:-$HOME/data/mica_support}"

python examples/verl_multiturn/make_data.py --out "$DATA"

# The agent loop module lives in this folder: put it on the path of every Ray worker.
export PYTHONPATH="$PWD/examples/verl_multiturn${PYTHONPATH:+:$PYTHONPATH}"

python -m verl.trainer.main_ppo \
    --config-path "$PWD/examples/verl_multiturn" --config-name mica_multiturn \
    actor_rollout_ref.model.path="$MODEL" \
    data.train_files="$DATA/train.parquet" data.val_files="$DATA/val.parquet" \
    "+ray_kwargs.ray_init.runtime_env.env_vars.PYTHONPATH=$PYTHONPATH" \
    "$@"
