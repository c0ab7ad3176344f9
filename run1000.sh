#!/usr/bin/env bash
# The $1000 tier: the same pipeline as speedrun.sh at depth 32 (1.88B parameters, 37.6B tokens) on one 8xH100
# node, ~33 hours of base training plus the rest (~$800-1000 at ~$24/h). Run it in a screen session:
#
#     screen -L -Logfile run1000.log -S run1000 bash run1000.sh
#
# Same environment settings as speedrun.sh: NPROC_PER_NODE (default 8), WANDB_RUN (default "dummy"),
# NANOCHAT_BASE_DIR (default ~/.cache/nanochat), RUN_RL=1 for the optional RL stage. What differs, and why:
#   - data: d32 trains on 20 x 1.88B = 37.6B tokens, ~180B characters at ~4.8 per token, ~722 shards of ~250M
#     characters: 800 leave a margin (~80 GB); 16 shards first (~4B characters) for the tokenizer;
#   - tokenizer on 4B characters (twice the speedrun's: a model this size rewards a better vocab);
#   - device batch 8 for base and mid training: 32 rows of 2048 tokens at d32 (2048 wide) run out of the 80 GB of
#     an H100 (16 as well, just: ~78 of 80 GB used); 8 x 2048 x 8 GPUs = 131,072 tokens a micro-step, so each
#     step of 524,288 tokens accumulates 4 micro-steps. Same math, ~1.6 s a step, 71,680 steps.
set -Eeuo pipefail
cd "$(dirname "$0")"

STAGE="set-up"
trap 'echo "error: run1000.sh stopped in stage \"$STAGE\" (exit $?); its output is above" >&2' ERR
stage() { STAGE="$1"; echo; echo "==== $(date +%H:%M:%S) $1"; }

export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
WANDB_RUN="${WANDB_RUN:-dummy}"
RUN_RL="${RUN_RL:-0}"
TORCHRUN="torchrun --standalone --nproc_per_node=$NPROC_PER_NODE"

stage "set-up: Rust, uv, the virtual environment and rustbpe"
if ! command -v cargo >/dev/null 2>&1 && [ ! -f "$HOME/.cargo/env" ]; then
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
fi
source dev/setup.sh

stage "report reset"
python -m nanochat.report reset

stage "data: the first 16 shards"
python -m nanochat.dataset -n 16
python -m nanochat.dataset -n 800 > "$NANOCHAT_BASE_DIR/dataset_download.log" 2>&1 &
DATASET_PID=$!

stage "tokenizer: train"
python -m scripts.tok_train --max_chars=4000000000 --vocab_size=65536
stage "tokenizer: evaluate"
python -m scripts.tok_eval

stage "data: waiting for the 800 shards (log: $NANOCHAT_BASE_DIR/dataset_download.log)"
wait $DATASET_PID

stage "pretraining: base_train d32"
$TORCHRUN -m scripts.base_train -- --depth=32 --device_batch_size=8 --run="$WANDB_RUN"
stage "pretraining: base_loss"
$TORCHRUN -m scripts.base_loss -- --device_batch_size=8
stage "pretraining: base_eval (CORE)"
$TORCHRUN -m scripts.base_eval

stage "midtraining: mid_train"
$TORCHRUN -m scripts.mid_train -- --device_batch_size=8 --run="$WANDB_RUN"
stage "midtraining: chat_eval -i mid"
$TORCHRUN -m scripts.chat_eval -- -i mid

stage "SFT: chat_sft"  # device batch 4 (the default) fits at d32
$TORCHRUN -m scripts.chat_sft -- --run="$WANDB_RUN"
stage "SFT: chat_eval -i sft"
$TORCHRUN -m scripts.chat_eval -- -i sft

if [ "$RUN_RL" = "1" ]; then
    stage "RL: chat_rl on GSM8K"
    $TORCHRUN -m scripts.chat_rl -- --device_batch_size=4 --run="$WANDB_RUN"
    stage "RL: chat_eval -i rl -a GSM8K"
    $TORCHRUN -m scripts.chat_eval -- -i rl -a GSM8K
fi

stage "report"
python -m nanochat.report generate
cp "$NANOCHAT_BASE_DIR/report/report.md" ./report.md
echo
echo "Done. Report: ./report.md (and $NANOCHAT_BASE_DIR/report/). Chat with the model:"
echo "  source .venv/bin/activate && python -m scripts.chat_cli -p 'Why is the sky blue?'   # or without -p for a conversation"
echo "  source .venv/bin/activate && python -m scripts.chat_web -n $NPROC_PER_NODE   # one model copy per GPU; http://<this machine>:8000 (OpenAI API: /v1)"
