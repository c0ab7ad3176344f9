"""ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 answer choices, as categorical tasks.

Hub: allenai/ai2_arc, subsets ARC-Easy / ARC-Challenge, splits train / validation / test. Local: the same rows as
JSONL at arc/<subset>/<split>.jsonl under NANOCHAT_DATA_DIR. Split "val" is our held-out slice of train
(tasks/common.py), not ARC's own "validation" split, which stands in for test where the local copy has no test file
(eval_split() below). Labels are kept as the dataset gives them (usually A-D, sometimes 1-4), as "letters".
"""

import os

from tasks.common import (Task, evaluate_categorical, load_dataset_rows, local_data_dir, local_path, read_jsonl,
                          render_mc, train_or_val)

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "val", "validation", "test")


def eval_split(subset):
    """The split chat_eval scores: test, unless the local data dir lacks it (../shared/data has only validation
    in the hub's format), then validation. Neither is ever trained on."""
    data_dir = local_data_dir()
    if data_dir is not None and not os.path.exists(os.path.join(data_dir, "arc", subset, "test.jsonl")):
        return "validation"
    return "test"


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"ARC split must be one of {SPLITS}, got {split!r}")
        self.subset, self.split = subset, split
        source = "train" if split == "val" else split
        self.rows = load_dataset_rows("allenai/ai2_arc", subset, source,
                                      lambda: read_jsonl(local_path("arc", subset, f"{source}.jsonl")))
        if source == "train":
            self.rows = train_or_val(self.rows, split, lambda row: row["question"])

    def get_example(self, index):
        row = self.rows[index]
        letters, choices = list(row["choices"]["label"]), list(row["choices"]["text"])
        assert row["answerKey"] in letters, f"ARC {row['id']}: answer {row['answerKey']!r} not among {letters}"
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, choices)},
                {"role": "assistant", "content": row["answerKey"]},
            ],
            "letters": letters,
        }

    def evaluate(self, conversation, assistant_response):
        return evaluate_categorical(conversation, assistant_response)
