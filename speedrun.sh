#!/usr/bin/env bash
# The $100 tier: the whole pipeline on one 8xH100 node in about 4 hours (~$100 at ~$24/h), from raw web text
# to a d20 chat model (561M parameters, 1.4B with its value embeddings) and its report card. Run it in a screen
# session, it takes a while:
#
#     screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
#     WANDB_RUN=speedrun bash speedrun.sh            # also log to Weights & Biases (after `wandb login`)
#     NPROC_PER_NODE=4 bash speedrun.sh              # fewer GPUs: same result, gradient accumulation makes up
#     RUN_RL=1 bash speedrun.sh                      # add the optional RL stage on GSM8K
#     bash speedrun.sh --device_type=cpu             # no GPU, on purpose (without it, a missing GPU is an error)
#
# Settings come from the environment (the examples above, NANOCHAT_BASE_DIR, and the tier's numbers below, which
# run1000.sh sets for d32 before it runs this file). Right after set-up it checks that CUDA works with
# NPROC_PER_NODE GPUs (installing the torch build for an older driver) and stops with one `error:` line if not.
# Needs the network (uv, PyPI, FineWeb-Edu, the task datasets). A failed stage stops the run with a line naming it.
# The CPU-sized version of this pipeline, offline: dev/runcpu.sh. A lent GPU checks it in miniature: dev/gpu_check.sh.
set -Eeuo pipefail
cd "$(dirname "$0")"

PIPELINE="${PIPELINE:-speedrun.sh}"  # the name errors give (run1000.sh sets its own)
DEVICE_TYPE=cuda
for arg in "$@"; do
    case "$arg" in
        --device_type=cuda | --device_type=cpu) DEVICE_TYPE="${arg#*=}" ;;
        *) echo "error: $PIPELINE: unknown argument '$arg'; the one argument is --device_type=cpu (to run without" \
                "a GPU); settings come from the environment (see the top of speedrun.sh)" >&2; exit 1 ;;
    esac
done

# -----------------------------------------------------------------------------
# The tier: the numbers that differ between speedrun.sh (these defaults) and run1000.sh
#
# The model: depth 20 = 1280 wide, 10 heads of 128, 561M parameters in its matrices and token embedding, plus 839M
# in the value-embedding tables of the default architecture (v2: lookups, no FLOPs, not counted for the horizon).
# It trains on 20 tokens per parameter (Chinchilla): 11.2B tokens, 21,400 steps of 524,288. (The original fit ~12
# tokens per parameter without the token embedding for its v2: 5.7B tokens here. That horizon was fit at d12-d24 on
# 8xH100s; a CPU cannot measure it, so the tier keeps 20.)
DEPTH="${DEPTH:-20}"
# Data: 11.2B tokens at ~4.8 characters per token is ~54B characters, and a FineWeb-Edu shard holds ~250M
# characters (~100 MB): 54e9 / 250e6 = ~216 shards; 240 leave a margin (~24 GB).
SHARDS="${SHARDS:-240}"
# The tokenizer: a 65,536-token (2^16) vocab trained on 2B characters, the first 8 shards (~250M characters each),
# which download first; the rest download in the background while it trains.
TOKENIZER_SHARDS="${TOKENIZER_SHARDS:-8}"
TOKENIZER_CHARS="${TOKENIZER_CHARS:-2000000000}"
# Rows of 2048 tokens per GPU per micro-step in base_train, base_loss and mid_train: 32 x 2048 x 8 GPUs = 524,288
# tokens, so a step is one micro-step (fewer GPUs accumulate more; the math does not change). 32 rows of d20 ran in
# 80 GB in the original; dev/gpu_check.sh measures this code's peak at 32.
DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-32}"
RL_DEVICE_BATCH_SIZE="${RL_DEVICE_BATCH_SIZE:-8}"  # chat_rl's rows per forward/backward (its default)
# chat_sft runs its own default of 4 conversations per micro-step in both tiers.

# -----------------------------------------------------------------------------
STAGE="set-up"
trap 'echo "error: $PIPELINE stopped in stage \"$STAGE\" (exit $?); its output is above" >&2' ERR
stage() { STAGE="$1"; echo; echo "==== $(date +%H:%M:%S) $1"; }

export OMP_NUM_THREADS=1  # the GPUs do the work; many threads per process only contend
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
WANDB_RUN="${WANDB_RUN:-dummy}"
RUN_RL="${RUN_RL:-0}"
TORCHRUN="torchrun --standalone --nproc_per_node=$NPROC_PER_NODE"

stage "set-up: Rust, uv, the virtual environment and rustbpe"
if ! command -v cargo >/dev/null 2>&1 && [ ! -f "$HOME/.cargo/env" ]; then
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y  # rustbpe is compiled by `uv sync`
fi
# a training node's set-up: bubblewrap isolates HumanEval's code in chat_eval; no test packages, no browser
source dev/setup.sh --no-dev bubblewrap

stage "CUDA check: $NPROC_PER_NODE process(es) on $DEVICE_TYPE"
if ! python -m nanochat.common --device_type="$DEVICE_TYPE" --nproc_per_node="$NPROC_PER_NODE" --install_torch; then
    exit 1  # its one `error:` line says why, before any money is spent on data or training
fi

stage "report reset"
python -m nanochat.report reset

# -----------------------------------------------------------------------------
stage "data: the first $TOKENIZER_SHARDS shards"
python -m nanochat.dataset -n "$TOKENIZER_SHARDS"
python -m nanochat.dataset -n "$SHARDS" > "$NANOCHAT_BASE_DIR/dataset_download.log" 2>&1 &
DATASET_PID=$!

stage "tokenizer: train"
python -m scripts.tok_train --max_chars="$TOKENIZER_CHARS" --vocab_size=65536
stage "tokenizer: evaluate"
python -m scripts.tok_eval

stage "data: waiting for the $SHARDS shards (log: $NANOCHAT_BASE_DIR/dataset_download.log)"
wait $DATASET_PID

# -----------------------------------------------------------------------------
# Pretraining: depth sets everything else (width, heads, the horizon of 20 tokens per parameter). Every training and
# evaluation stage is told the device type, so that none can fall back to the CPU quietly.
stage "pretraining: base_train d$DEPTH"
$TORCHRUN -m scripts.base_train -- --depth="$DEPTH" --device_batch_size="$DEVICE_BATCH_SIZE" --run="$WANDB_RUN" \
    --device_type="$DEVICE_TYPE"
stage "pretraining: base_loss (train/val bpb, samples)"
$TORCHRUN -m scripts.base_loss -- --device_batch_size="$DEVICE_BATCH_SIZE" --device_type="$DEVICE_TYPE"
stage "pretraining: base_eval (CORE)"
$TORCHRUN -m scripts.base_eval -- --device_type="$DEVICE_TYPE"

# -----------------------------------------------------------------------------
# Midtraining: one epoch of the conversation mixture (SmolTalk, MMLU auxiliary train, GSM8K, the identity
# conversations in data/identity/, spelling tasks), teaching the chat format, multiple choice and the calculator.
stage "midtraining: mid_train"
$TORCHRUN -m scripts.mid_train -- --device_batch_size="$DEVICE_BATCH_SIZE" --run="$WANDB_RUN" \
    --device_type="$DEVICE_TYPE"
stage "midtraining: chat_eval -i mid"
$TORCHRUN -m scripts.chat_eval -- -i mid --device_type="$DEVICE_TYPE"

# SFT: one epoch over ~22K conversations (ARC, GSM8K, 10K of SmolTalk, identity, spelling), 32 a step,
# loss on the assistant's tokens only.
stage "SFT: chat_sft"
$TORCHRUN -m scripts.chat_sft -- --run="$WANDB_RUN" --device_type="$DEVICE_TYPE"
stage "SFT: chat_eval -i sft"
$TORCHRUN -m scripts.chat_eval -- -i sft --device_type="$DEVICE_TYPE"

# RL (optional, RUN_RL=1): on-policy REINFORCE on GSM8K, 16 questions x 16 samples a step, one epoch.
if [ "$RUN_RL" = "1" ]; then
    stage "RL: chat_rl on GSM8K"
    $TORCHRUN -m scripts.chat_rl -- --device_batch_size="$RL_DEVICE_BATCH_SIZE" --run="$WANDB_RUN" \
        --device_type="$DEVICE_TYPE"
    stage "RL: chat_eval -i rl -a GSM8K"
    $TORCHRUN -m scripts.chat_eval -- -i rl -a GSM8K --device_type="$DEVICE_TYPE"
fi

# -----------------------------------------------------------------------------
stage "report"
python -m nanochat.report generate
cp "$NANOCHAT_BASE_DIR/report/report.md" ./report.md
echo
echo "Done. Report: ./report.md (and $NANOCHAT_BASE_DIR/report/). Chat with the model:"
echo "  source .venv/bin/activate && python -m scripts.chat_cli -p 'Why is the sky blue?'   # no -p: a conversation"
WORKERS=$([ "$DEVICE_TYPE" = cuda ] && echo " -n $NPROC_PER_NODE   # one model copy per GPU;" || echo "   #")
echo "  source .venv/bin/activate && python -m scripts.chat_web$WORKERS http://<this machine>:8000 (OpenAI API: /v1)"
