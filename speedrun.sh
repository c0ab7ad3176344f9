#!/usr/bin/env bash
# The $100 tier: the whole pipeline on one 8xH100 node in about 4 hours (~$100 at ~$24/h), from raw web text
# to a d20 chat model (561M parameters) and its report card. Run it in a screen session, it takes a while:
#
#     screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
#     WANDB_RUN=speedrun bash speedrun.sh            # also log to Weights & Biases (after `wandb login`)
#     NPROC_PER_NODE=4 bash speedrun.sh              # fewer GPUs: same result, gradient accumulation makes up
#     RUN_RL=1 bash speedrun.sh                      # add the optional RL stage on GSM8K
#
# Settings come from the environment: NPROC_PER_NODE (GPUs, default 8), WANDB_RUN (default "dummy" = no wandb),
# NANOCHAT_BASE_DIR (where data, tokenizer, checkpoints and the report go; default ~/.cache/nanochat), RUN_RL.
# Needs the network (uv, PyPI, FineWeb-Edu shards and the task datasets from Hugging Face). A stage that fails
# stops the run with a line naming it; the stages before it need not be repeated (comment them out).
# The CPU-sized version of this pipeline, offline: dev/runcpu.sh.
set -Eeuo pipefail
cd "$(dirname "$0")"

STAGE="set-up"
trap 'echo "error: speedrun.sh stopped in stage \"$STAGE\" (exit $?); its output is above" >&2' ERR
stage() { STAGE="$1"; echo; echo "==== $(date +%H:%M:%S) $1"; }

export OMP_NUM_THREADS=1  # the GPUs do the work; many threads per process only contend
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
WANDB_RUN="${WANDB_RUN:-dummy}"
RUN_RL="${RUN_RL:-0}"
TORCHRUN="torchrun --standalone --nproc_per_node=$NPROC_PER_NODE"

# -----------------------------------------------------------------------------
stage "set-up: Rust, uv, the virtual environment and rustbpe"
if ! command -v cargo >/dev/null 2>&1 && [ ! -f "$HOME/.cargo/env" ]; then
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y  # rustbpe is compiled by `uv sync`
fi
source dev/setup.sh  # uv (installed with pip when missing), `uv sync --frozen` (torch, rustbpe), activates .venv

stage "report reset"
python -m nanochat.report reset

# -----------------------------------------------------------------------------
# Data. d20 has 561M parameters and trains on 20 tokens per parameter (Chinchilla): 11.2B tokens. At ~4.8
# characters per token that is ~54B characters, and a FineWeb-Edu shard holds ~250M characters (~100 MB):
# 54e9 / 250e6 = ~216 shards; 240 leaves a margin (~24 GB). The first 8 (~2B characters) are enough for the
# tokenizer, so the rest downloads in the background while it trains.
stage "data: the first 8 shards"
python -m nanochat.dataset -n 8
python -m nanochat.dataset -n 240 > "$NANOCHAT_BASE_DIR/dataset_download.log" 2>&1 &
DATASET_PID=$!

# Tokenizer: a 65,536-token (2^16) vocab trained on 2B characters of the first shards (~1-2 min).
stage "tokenizer: train"
python -m scripts.tok_train --max_chars=2000000000 --vocab_size=65536
stage "tokenizer: evaluate"
python -m scripts.tok_eval

stage "data: waiting for the 240 shards (log: $NANOCHAT_BASE_DIR/dataset_download.log)"
wait $DATASET_PID

# -----------------------------------------------------------------------------
# Pretraining: depth 20 sets everything else (1280 wide, 10 heads of 128, 21,400 steps of 524,288 tokens =
# 11.2B tokens). Device batch 32 x 2048 tokens x 8 GPUs = 524,288: one micro-step per step (fewer GPUs
# accumulate more). ~3 hours on 8xH100.
stage "pretraining: base_train d20"
$TORCHRUN -m scripts.base_train -- --depth=20 --device_batch_size=32 --run="$WANDB_RUN"
stage "pretraining: base_loss (train/val bpb, samples)"
$TORCHRUN -m scripts.base_loss
stage "pretraining: base_eval (CORE)"
$TORCHRUN -m scripts.base_eval

# -----------------------------------------------------------------------------
# Midtraining: one epoch of the conversation mixture (SmolTalk, MMLU auxiliary train, GSM8K, the identity
# conversations in data/identity/, spelling tasks), teaching the chat format, multiple choice and the calculator.
stage "midtraining: mid_train"
$TORCHRUN -m scripts.mid_train -- --device_batch_size=32 --run="$WANDB_RUN"
stage "midtraining: chat_eval -i mid"
$TORCHRUN -m scripts.chat_eval -- -i mid

# SFT: one epoch over ~22K conversations (ARC, GSM8K, 10K of SmolTalk, identity, spelling), 32 a step,
# loss on the assistant's tokens only.
stage "SFT: chat_sft"
$TORCHRUN -m scripts.chat_sft -- --run="$WANDB_RUN"
stage "SFT: chat_eval -i sft"
$TORCHRUN -m scripts.chat_eval -- -i sft

# RL (optional, RUN_RL=1): on-policy REINFORCE on GSM8K, 16 questions x 16 samples a step, one epoch.
if [ "$RUN_RL" = "1" ]; then
    stage "RL: chat_rl on GSM8K"
    $TORCHRUN -m scripts.chat_rl -- --run="$WANDB_RUN"
    stage "RL: chat_eval -i rl -a GSM8K"
    $TORCHRUN -m scripts.chat_eval -- -i rl -a GSM8K
fi

# -----------------------------------------------------------------------------
stage "report"
python -m nanochat.report generate
cp "$NANOCHAT_BASE_DIR/report/report.md" ./report.md
echo
echo "Done. Report: ./report.md (and $NANOCHAT_BASE_DIR/report/). Chat with the model:"
echo "  source .venv/bin/activate && python -m scripts.chat_cli -p 'Why is the sky blue?'   # or without -p for a conversation"
echo "  source .venv/bin/activate && python -m scripts.chat_web   # then open http://<this machine>:8000 (OpenAI API: http://<this machine>:8000/v1)"
