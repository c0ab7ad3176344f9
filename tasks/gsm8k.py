"""GSM8K: grade-school math word problems whose solutions use the calculator tool, as a generative task.

Hub: openai/gsm8k, subsets main / socratic, splits train / test. Local: gsm8k/<split>.jsonl under NANOCHAT_DATA_DIR
(the "main" rows of openai/grade-school-math). Each `<<expr=result>>` annotation of a solution becomes a python part
(expr) and a python_output part (result) between the text parts, so the model learns to call the calculator.
An answer is correct when the number after its last "####" equals the reference's (commas removed, compared as
numbers). Mid-training, SFT and RL train on train; chat_eval evaluates on test.
"""

import re

from tasks.common import Task, load_dataset_rows, local_path, read_jsonl

SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")
ANSWER_RE = re.compile(r"#### (-?[0-9.,]+)")
CALCULATOR_RE = re.compile(r"<<([^>]*)>>")


def extract_answer(text):
    """The number after the last "#### " in text, commas removed, or None."""
    matches = ANSWER_RE.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").rstrip(".")


def same_number(a, b):
    if a is None or b is None:
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def solution_parts(solution):
    """Assistant content parts of a GSM8K solution: text, then python + python_output per <<expr=result>>."""
    parts = []
    pieces = CALCULATOR_RE.split(solution)  # text, annotation, text, annotation, ..., text
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            if piece:
                parts.append({"type": "text", "text": piece})
            continue
        expr, sep, result = piece.rpartition("=")
        if not sep:  # a malformed annotation stays text, as the dataset wrote it
            parts.append({"type": "text", "text": f"<<{piece}>>"})
            continue
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
    return parts


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"GSM8K subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"GSM8K split must be one of {SPLITS}, got {split!r}")
        self.subset, self.split = subset, split
        # the local copy holds the "main" solutions only, so socratic asks for a file that is not there
        local_name = f"{split}.jsonl" if subset == "main" else f"{split}_socratic.jsonl"
        self.rows = load_dataset_rows("openai/gsm8k", subset, split,
                                      lambda: read_jsonl(local_path("gsm8k", local_name)))

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": solution_parts(row["answer"])},
            ],
        }

    def evaluate(self, conversation, assistant_response):
        reference = conversation["messages"][-1]["content"][-1]["text"]  # the final text part ends with "#### N"
        expected = extract_answer(reference)
        assert expected is not None, f"GSM8K reference without '#### N': {reference[-80:]!r}"
        return same_number(extract_answer(assistant_response), expected)
