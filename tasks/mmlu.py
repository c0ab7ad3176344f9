"""MMLU: four-choice questions over 57 subjects, as a categorical task (letters A-D).

Hub: cais/mmlu, subset "all" (splits dev / validation / test; rows {question, subject, choices, answer}) or
"auxiliary_train" (split train; ARC/MC_TEST/OBQA/RACE questions, each row wrapped in a "train" field, hub only).
Local: mmlu/<split>/<subject>_<split>.csv under NANOCHAT_DATA_DIR (header question,choice0..3,answer with a 0-based
answer), subjects concatenated in alphabetical order like the hub's "all".
"""

import glob
import os

from nanochat.common import MissingFileError
from tasks.common import (Task, evaluate_categorical, load_dataset_rows, local_data_dir, local_path, read_csv,
                          render_mc)

LETTERS = ("A", "B", "C", "D")
SUBSETS = ("all", "auxiliary_train")


def read_local_mmlu(split):
    folder = local_path("mmlu", split)
    files = sorted(glob.glob(os.path.join(folder, f"*_{split}.csv")))
    if not files:
        raise MissingFileError(f"no MMLU files {folder}/<subject>_{split}.csv found")
    rows = []
    for path in files:
        subject = os.path.basename(path)[:-len(f"_{split}.csv")]
        for r in read_csv(path):
            rows.append({"question": r["question"], "subject": subject,
                         "choices": [r[f"choice{k}"] for k in range(4)], "answer": int(r["answer"])})
    return rows


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"MMLU subset must be one of {SUBSETS}, got {subset!r}")
        allowed = ("train",) if subset == "auxiliary_train" else ("dev", "validation", "test")
        if split not in allowed:
            raise ValueError(f"MMLU {subset} split must be one of {allowed}, got {split!r}")
        if subset == "auxiliary_train" and local_data_dir() is not None:
            raise MissingFileError(f"MMLU auxiliary_train is only available from the Hugging Face hub (cais/mmlu), "
                                   f"not from NANOCHAT_DATA_DIR={local_data_dir()}; unset it to download, or leave "
                                   f"MMLU auxiliary_train out of the mixture")
        self.subset, self.split = subset, split
        self.rows = load_dataset_rows("cais/mmlu", subset, split, lambda: read_local_mmlu(split))

    def get_example(self, index):
        row = self.rows[index]
        if self.subset == "auxiliary_train":
            row = row["train"]
        choices = list(row["choices"])
        assert len(choices) == len(LETTERS), f"MMLU row with {len(choices)} choices: {row['question'][:60]!r}"
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, choices)},
                {"role": "assistant", "content": LETTERS[row["answer"]]},
            ],
            "subject": row["subject"],
            "letters": list(LETTERS),
        }

    def evaluate(self, conversation, assistant_response):
        return evaluate_categorical(conversation, assistant_response)
