#!/usr/bin/env bash
# The CPU demo (README's main job): every stage of the pipeline, offline, on a laptop-class CPU, from a fresh
# clone with nothing but the data shipped in data/ (no ../shared, no network after `uv sync`). Sized for 2 cores
# and ~30 minutes: a 4,096-token tokenizer and a d4 model that measurably learns (val bpb far below the unigram
# baseline), then mid-training, SFT and RL that teach it to spell words and count letters with the calculator
# (SpellingBee), with an evaluation after each stage. Ends with report.md and how to chat with the result.
#
#     bash dev/runcpu.sh
#     DEMO_BASE_STEPS=40 DEMO_MID_STEPS=4 DEMO_SFT_STEPS=4 DEMO_RL_STEPS=2 bash dev/runcpu.sh   # a smoke run
#
# Everything lands in $NANOCHAT_BASE_DIR (default ~/.cache/nanochat); a stage that fails is named.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

STAGE="set-up"
trap 'echo "error: dev/runcpu.sh stopped in stage \"$STAGE\" (exit $?); its output is above" >&2' ERR
stage() { STAGE="$1"; echo; echo "==== $(date +%H:%M:%S) $1"; }

source dev/setup.sh  # uv (installed with pip when missing), `uv sync --frozen` (torch, rustbpe), activates .venv;
                     # no system packages: the demo runs no sandboxed code
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export NANOCHAT_DATA_DIR="${NANOCHAT_DATA_DIR:-$REPO/data/tasks}"  # the task datasets shipped in the repo
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
mkdir -p "$NANOCHAT_BASE_DIR"

# The demo's sizes; the environment may shrink them (the end-to-end test does)
BASE_STEPS="${DEMO_BASE_STEPS:-300}"      # d4 pretraining steps of 8,192 tokens (~2.5M tokens)
MID_STEPS="${DEMO_MID_STEPS:-200}"        # mid-training steps of 8,192 tokens (where spelling is learned)
SFT_STEPS="${DEMO_SFT_STEPS:-100}"        # SFT optimizer steps of 16 conversations
RL_STEPS="${DEMO_RL_STEPS:-20}"           # RL steps of 8 questions x 8 samples
EVAL_PROBLEMS="${DEMO_EVAL_PROBLEMS:-256}"  # problems per task in each chat evaluation (one standard error: ~3 points)
CORE_PER_TASK="${DEMO_CORE_PER_TASK:-8}"   # examples per CORE task
EVAL_TOKENS=$((8192 * 16))

stage "report reset"
python -m nanochat.report reset

# -----------------------------------------------------------------------------
stage "data: the embedded corpus"
if ! ls "$NANOCHAT_BASE_DIR"/base_data/*.parquet >/dev/null 2>&1; then
    python -m nanochat.dataset --embedded
fi

# A 4,096-token vocab: at this model size a big vocab would be mostly embedding parameters
stage "tokenizer: train"
python -m scripts.tok_train --max_chars=100000000 --vocab_size=4096
stage "tokenizer: evaluate (vs GPT-2/GPT-4 from the rank files in data/tiktoken)"
python -m scripts.tok_eval

# -----------------------------------------------------------------------------
# d4: 4 layers, 256 wide, 2 heads of 128; 512-token context; 8,192 tokens a step. Compiled: ~30 s of
# compilation buys ~1.5x faster steps on CPU (dev/BENCHMARKS.md).
stage "pretraining: base_train d4"
python -m scripts.base_train --depth=4 --max_seq_len=512 --device_batch_size=8 --total_batch_size=8192 \
    --num_iterations="$BASE_STEPS" --eval_every=100 --eval_tokens="$EVAL_TOKENS" --sample_every=-1 \
    --core_metric_every=-1 --save_every=100 --compile=true
stage "pretraining: base_loss (train/val bpb vs the unigram baseline, samples)"
python -m scripts.base_loss --device_batch_size=8 --split_tokens="$EVAL_TOKENS"
stage "pretraining: base_eval (CORE on the bundle subset in data/core_eval)"
python -m scripts.base_eval --bundle_dir="$REPO/data/core_eval" --max_per_task="$CORE_PER_TASK"

# -----------------------------------------------------------------------------
# Mid-training on what ships offline: chatterbot dialogs standing in for SmolTalk, the identity conversations,
# SimpleSpelling and SpellingBee (settings tuned on the validation split: dev/BENCHMARKS.md)
CHAT="$NANOCHAT_DATA_DIR/chat/chatterbot_corpus_english.jsonl"
stage "midtraining: mid_train"
python -m scripts.mid_train --max_seq_len=512 --device_batch_size=8 --total_batch_size=8192 \
    --num_iterations="$MID_STEPS" --skip=mmlu_aux,gsm8k --smoltalk_file="$CHAT" --simple_spelling_size=14000 \
    --spelling_bee_size=12000 --eval_every=-1 --eval_tokens=65536 --compile=true
# SpellingBee twice after each stage: with the calculator, and without it (the model must count on its own: a
# copy of the word into the calculator call is not enough). Always answering "#### 1" scores ~59%: the baseline
# printed beside each score
stage "midtraining: chat_eval -i mid"
python -m scripts.chat_eval -i mid -a "SpellingBee|SimpleSpelling" -x "$EVAL_PROBLEMS" -m 128
stage "midtraining: chat_eval -i mid --calculator=off"
python -m scripts.chat_eval -i mid -a SpellingBee -x "$EVAL_PROBLEMS" -m 128 --calculator=off

stage "SFT: chat_sft"
python -m scripts.chat_sft --skip=arc_easy,arc_challenge,gsm8k --smoltalk_file="$CHAT" --max_seq_len=512 \
    --device_batch_size=8 --target_examples_per_step=16 --num_iterations="$SFT_STEPS" --init_lr_frac=0.1 \
    --spelling_bee_size=2000 --simple_spelling_size=2000 --eval_every=-1 --eval_steps=8 --eval_metrics_every=-1
stage "SFT: chat_eval -i sft"
python -m scripts.chat_eval -i sft -a "SpellingBee|SimpleSpelling" -x "$EVAL_PROBLEMS" -m 128
stage "SFT: chat_eval -i sft --calculator=off"
python -m scripts.chat_eval -i sft -a SpellingBee -x "$EVAL_PROBLEMS" -m 128 --calculator=off

# RL on SpellingBee with the calculator: the reward is 1 when the letter count after #### is right. Its report
# section gives the change in pass@1 (sampled) on EVAL_PROBLEMS validation questions, paired, with its standard error
stage "RL: chat_rl on SpellingBee"
python -m scripts.chat_rl --task=SpellingBee --examples_per_step=8 --num_samples=8 --device_batch_size=8 \
    --max_new_tokens=128 --num_iterations="$RL_STEPS" --init_lr_frac=0.05 --spelling_bee_size=5000 \
    --eval_every=-1 --eval_examples="$EVAL_PROBLEMS" --eval_num_samples=1
stage "RL: chat_eval -i rl"
python -m scripts.chat_eval -i rl -a "SpellingBee|SimpleSpelling" -x "$EVAL_PROBLEMS" -m 128
stage "RL: chat_eval -i rl --calculator=off"
python -m scripts.chat_eval -i rl -a SpellingBee -x "$EVAL_PROBLEMS" -m 128 --calculator=off

# -----------------------------------------------------------------------------
stage "report"
python -m nanochat.report generate
REPORT="$NANOCHAT_BASE_DIR/report/report.md"
echo
sed -n '/^## Summary/,$p' "$REPORT"
echo
echo "Report: $REPORT"
echo "Chat with the model:"
echo "  python -m scripts.chat_cli -i rl -p \"How many r are in strawberry?\""
echo "  python -m scripts.chat_web -i rl    # then open http://localhost:8000"
echo "  curl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\"
echo "       -d '{\"model\": \"nanochat\", \"messages\": [{\"role\": \"user\", \"content\": \"Spell the word: cat\"}]}'"
echo "(activate the environment first: source .venv/bin/activate)"
