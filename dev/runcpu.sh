#!/usr/bin/env bash
# The CPU demo (README): the whole pipeline, offline, on a laptop-class CPU, on the corpus shipped in
# data/embedded/. Sized for 2 cores: a small tokenizer and a d4 model that measurably learns in minutes.
# Everything lands in $NANOCHAT_BASE_DIR (default ~/.cache/nanochat); the report is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
source dev/setup.sh
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
mkdir -p "$NANOCHAT_BASE_DIR"
# GPT-2/GPT-4 rank files for tok_eval's comparison, offline (tiktoken downloads them when this is unset)
if [ -z "${NANOCHAT_TIKTOKEN_DIR:-}" ] && [ -d ../shared/data/tiktoken ]; then
    export NANOCHAT_TIKTOKEN_DIR="$(cd ../shared/data/tiktoken && pwd)"
fi

python -m nanochat.report reset

# Data: the embedded corpus unless shards are already there (e.g. from `python -m nanochat.dataset -n 8`)
if ! ls "$NANOCHAT_BASE_DIR"/base_data/*.parquet >/dev/null 2>&1; then
    python -m nanochat.dataset --embedded
fi

# Tokenizer: a 4,096-token vocab; at this model size a big vocab would be mostly embedding parameters
python -m scripts.tok_train --max_chars=100000000 --vocab_size=4096
python -m scripts.tok_eval

# Pretraining: d4 (256 wide, 2 heads), 512-token context, 8K tokens a step, 400 steps (~3.3M tokens).
# Compiled: ~30 s of compilation buys ~1.5x faster steps on CPU (dev/BENCHMARKS.md).
python -m scripts.base_train --depth=4 --max_seq_len=512 --device_batch_size=8 --total_batch_size=8192 \
    --num_iterations=400 --eval_every=100 --eval_tokens=262144 --sample_every=200 --core_metric_every=-1 \
    --save_every=100 --compile=true
python -m scripts.base_loss --device_batch_size=8 --split_tokens=262144

python -m nanochat.report generate
echo "Report: $NANOCHAT_BASE_DIR/report/report.md"
grep -E "val bpb|Validation bpb|val_bpb" "$NANOCHAT_BASE_DIR/report/report.md" | head -5 || true
