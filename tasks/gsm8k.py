"""GSM8K: grade-school math word problems whose solutions use the calculator tool, as a generative task.

Hub: openai/gsm8k, subsets main / socratic, splits train / test. Local: gsm8k/<split>.jsonl under NANOCHAT_DATA_DIR
(the "main" rows of openai/grade-school-math). Each `<<expr=result>>` annotation of a solution becomes a python part
(expr) and a python_output part (result) between the text parts, so the model learns to call the calculator.

The scoring rule, a choice: a reply's answer is the number after its FIRST "#### " (commas removed), and it is right
when it equals the reference's answer AS A NUMBER ("18", "18.0", "18." and "18.00" are all eighteen). First, as the
official scorer and the original nanochat: "#### N" ends a solution, so the first one is the answer the model
committed to. As a number, where the official scorer compares strings: "#### 18." (a full stop) names the right
quantity. So ours passes every reply the official rule passes, and more; `rule_disagreements` counts those.
"""

import re
from decimal import Decimal, InvalidOperation

from tasks.common import Task, load_dataset_rows, local_path, read_jsonl, train_or_val

SUBSETS = ("main", "socratic")
SPLITS = ("train", "val", "test")
ANSWER_RE = re.compile(r"#### (-?[0-9.,]+)")
CALCULATOR_RE = re.compile(r"<<([^>]*)>>")


def extract_answer(text):
    """The number after the first "#### " in text, commas and a trailing "." removed, or None."""
    match = ANSWER_RE.search(text)
    return match.group(1).replace(",", "").rstrip(".") if match else None


def number_key(answer):
    """An extract_answer string as the value answers are compared by: a Decimal when it is a number (exact, unlike
    float: "18", "18.0" and "18.00" are one key), else the string itself ("1.2.3")."""
    try:
        return Decimal(answer)
    except InvalidOperation:
        return answer


def official_answer(text):
    """The official grade-school-math rule (and the original nanochat's): the string after the first "#### ", commas
    removed; compared with the reference's as strings."""
    match = ANSWER_RE.search(text)
    return match.group(1).replace(",", "") if match else None


def rule_disagreements(references, replies):
    """How many replies the official rule (first "####", string compare) and ours (first "####", number compare)
    judge differently. references: the reference solutions' texts (ending in "#### N"), replies: what the model
    wrote, in the same order. Returns {"replies", "ours_only", "official_only"} (ours_only: right by ours only)."""
    counts = {"replies": 0, "ours_only": 0, "official_only": 0}
    for reference, reply in zip(references, replies, strict=True):
        answer = extract_answer(reply)
        ours = answer is not None and number_key(answer) == number_key(extract_answer(reference))
        official_reply = official_answer(reply)
        official = official_reply is not None and official_reply == official_answer(reference)
        counts["replies"] += 1
        if ours != official:
            counts["ours_only" if ours else "official_only"] += 1
    return counts


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
        source = "train" if split == "val" else split
        # the local copy holds the "main" solutions only, so socratic asks for a file that is not there
        local_name = f"{source}.jsonl" if subset == "main" else f"{source}_socratic.jsonl"
        self.rows = load_dataset_rows("openai/gsm8k", subset, source,
                                      lambda: read_jsonl(local_path("gsm8k", local_name)))
        if source == "train":
            self.rows = train_or_val(self.rows, split, lambda row: row["question"])

    def get_example(self, index):
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": solution_parts(row["answer"])},
            ],
        }

    def reference_answer(self, conversation):
        reference = conversation["messages"][-1]["content"][-1]["text"]  # the final text part ends with "#### N"
        expected = extract_answer(reference)
        assert expected is not None, f"GSM8K reference without '#### N': {reference[-80:]!r}"
        return number_key(expected)

    def evaluate(self, conversation, assistant_response):
        answer = extract_answer(assistant_response)
        return answer is not None and number_key(answer) == self.reference_answer(conversation)

    def rule_disagreements(self, conversations, replies):
        """rule_disagreements() of the replies to these conversations, against their references."""
        references = [conversation["messages"][-1]["content"][-1]["text"] for conversation in conversations]
        return rule_disagreements(references, replies)
