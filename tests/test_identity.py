"""The identity conversations shipped in data/identity/: what dev/gen_identity.py writes, byte for byte, and that
they load through CustomJSON and render as chat conversations that teach the model its name."""

import subprocess
import sys
from pathlib import Path

from nanochat.tokenizer import SPLIT_PATTERN, RustBPETokenizer
from tasks.customjson import CustomJSON

REPO_ROOT = Path(__file__).resolve().parents[1]
IDENTITY_FILE = REPO_ROOT / "data" / "identity" / "identity_conversations.jsonl"


def test_the_shipped_file_is_what_the_generator_writes(tmp_path):
    output = tmp_path / "identity.jsonl"
    subprocess.run([sys.executable, "-m", "dev.gen_identity", f"--output={output}"], cwd=REPO_ROOT, check=True,
                   stdout=subprocess.PIPE)
    assert output.read_bytes() == IDENTITY_FILE.read_bytes()


def test_identity_conversations_load_render_and_say_the_name():
    task = CustomJSON(str(IDENTITY_FILE))
    assert len(task) == 400
    tokenizer = RustBPETokenizer(SPLIT_PATTERN, {bytes([i]): i for i in range(256)})  # byte-level: no training
    named = 0
    for i in range(len(task)):
        conversation = task[i]
        ids, mask = tokenizer.render_conversation(conversation)
        assert sum(mask) > 0
        replies = " ".join(m["content"] for m in conversation["messages"] if m["role"] == "assistant")
        named += "nanochat" in replies
    assert named / len(task) > 0.6  # most conversations say the name; the rest are about training, limits, ...
