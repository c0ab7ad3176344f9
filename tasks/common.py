"""The Task base class, task mixtures, the multiple-choice renderer and dataset loading for the chat tasks.

A task is a list of conversations (the format of tokenizer.render_conversation) that can be sliced, mixed and, for
evaluation tasks, scored. Datasets come from the Hugging Face hub, or from NANOCHAT_DATA_DIR laid out like
../shared/data; both are shuffled with seed 42 into the same order, so offline and online runs pick the same
examples. Not here: tokenization, sampling, the scoring loop (nanochat/chat_eval.py).

Splits: train on the first column, tune on validation (chat_eval --split=val, the training scripts' evaluations),
report test (chat_eval's default). Never train on the last two; never tune on test.

| task                         | trained on (mid/SFT/RL)        | validation ("val")         | test (reported)          |
|------------------------------|--------------------------------|----------------------------|--------------------------|
| ARC-Easy / ARC-Challenge     | train, less the held-out slice | held-out slice of train    | test (local: validation) |
| MMLU                         | auxiliary_train (hub only)     | all/validation             | all/test                 |
| GSM8K                        | main/train, less the slice     | held-out slice of train    | main/test                |
| HumanEval                    | never                          | none (all 164 are test)    | test (its only split)    |
| SmolTalk                     | train                          | test: validation loss only | never                    |
| CustomJSON (identity)        | the whole file                 | never                      | never                    |
| SpellingBee / SimpleSpelling | split="train" (seeds train/i)  | split="val" (seeds val/i)  | split="test" (test/i)    |

The held-out slice is 1 in VAL_EVERY examples of a train split, chosen by a hash of the question text (`held_out`):
the same examples on the hub and in a local subset, and a question that occurs twice stays on one side.
"""

import csv
import gzip
import hashlib
import json
import os
import random
import zipfile
from collections import Counter

import numpy as np

from nanochat.common import MissingFileError, UserError, print0

SHUFFLE_SEED = 42  # every dataset is shuffled with this seed at load, hub and local alike
VAL_EVERY = 10  # 1 in 10 examples of a train split is held out for validation (ARC-Easy: ~225 of 2,251)


class Task:
    """A view over a dataset of conversations: `task[i]` is example start + i*step of the underlying data
    (stop excluded, clipped to its size). Subclasses define get_example(index) (and num_examples() unless they keep
    their dataset in self.rows), and, for evaluation tasks, eval_type and evaluate()."""

    eval_type = None  # "generative" (sample, then check) or "categorical" (pick the likeliest answer letter)

    def __init__(self, start=0, stop=None, step=1):
        if not isinstance(start, int) or start < 0:
            raise UserError(f"task start must be an int >= 0, got {start!r}")
        if stop is not None and (not isinstance(stop, int) or stop < start):
            raise UserError(f"task stop must be None or an int >= start ({start}), got {stop!r}")
        if not isinstance(step, int) or step < 1:
            raise UserError(f"task step must be an int >= 1, got {step!r}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        """Size of the underlying dataset, before slicing: by default its rows (a task that loads a dataset keeps them
        in self.rows)."""
        return len(self.rows)

    def get_example(self, index):
        """The conversation at physical index (0 <= index < num_examples())."""
        raise NotImplementedError

    def _range(self):
        n = self.num_examples()
        return range(min(self.start, n), n if self.stop is None else min(self.stop, n), self.step)

    def __len__(self):
        return len(self._range())

    def __getitem__(self, i):
        if not isinstance(i, int):
            raise TypeError(f"tasks are indexed by int, got {type(i).__name__}")
        return self.get_example(self._range()[i])  # range indexing raises IndexError and handles i < 0

    def evaluate(self, conversation, assistant_response):
        """True when assistant_response (the text the model wrote) answers the conversation correctly."""
        raise NotImplementedError(f"{type(self).__name__} is not an evaluation task")

    def reward(self, conversation, assistant_response):
        """RL reward: 1.0 for a correct answer, else 0.0."""
        return float(self.evaluate(conversation, assistant_response))

    def reference_answer(self, conversation):
        """The reference answer in the form evaluate() compares: two conversations with equal ones are answered
        right by the same reply. Defined by the tasks scored by exact answer."""
        raise NotImplementedError(f"{type(self).__name__} is not scored by an exact answer")

    def baseline(self, conversations):
        """The accuracy on these conversations of answering without reading the question. Categorical tasks:
        chance, the mean of 1/(number of choices). Exact-answer tasks: the best constant reply, which is right on
        the conversations whose reference answer is the most common one (SpellingBee: always "#### 1")."""
        if not conversations:
            raise ValueError("the baseline of no conversations is undefined")
        if self.eval_type == "categorical":
            return sum(1 / len(conversation["letters"]) for conversation in conversations) / len(conversations)
        answers = Counter(self.reference_answer(conversation) for conversation in conversations)
        return max(answers.values()) / len(conversations)


class TaskMixture(Task):
    """All examples of several tasks in one deterministic shuffled order (random.Random(seed)), for training.
    Pass a task twice to see its examples twice per epoch."""

    def __init__(self, tasks, seed=SHUFFLE_SEED, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        t, i = self.index_map[index]
        return self.tasks[t][i]


def build_mixture(builders, skip, stage):
    """The training tasks of a stage's mixture, printed. builders: {source name: function returning that source's
    list of tasks}, in mixture order; skip: the --skip setting, a comma list of sources to leave out. Returns (tasks,
    {source: examples}, [skipped sources]). UserError for an unknown name, for a source whose data is missing (saying
    how to leave it out) and for a mixture left empty."""
    skipped = [name.strip() for name in skip.split(",") if name.strip()]
    for name in skipped:
        if name not in builders:
            raise UserError(f"--skip={skip}: unknown source {name!r}; the sources are {', '.join(builders)}")
    tasks, sizes = [], {}
    for name, build in builders.items():
        if name in skipped:
            continue
        try:
            source_tasks = build()
        except (FileNotFoundError, UserError, ConnectionError) as e:
            raise UserError(f"{stage} source {name!r} is not available: {e}. Leave it out with --skip={name} "
                            f"(a comma list: --skip={','.join(skipped + [name])})") from e
        tasks += source_tasks
        sizes[name] = sum(len(task) for task in source_tasks)
    if not tasks:
        raise UserError(f"--skip={skip} leaves no {stage} data")
    print0("Mixture: " + ", ".join(f"{name} {size:,}" for name, size in sizes.items()) +
           f" = {sum(sizes.values()):,} conversations" + (f" | skipped: {', '.join(skipped)}" if skipped else ""))
    return tasks, sizes, skipped


def render_mc(question, letters, choices):
    """The user message of a multiple-choice question. Each choice is followed by "=LETTER" with nothing between:
    the letter then starts a fresh token, like the bare letter the assistant answers with, which helps small
    models bind choices to letters."""
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def held_out(question):
    """Whether a train-split example, by its question text, is in the validation slice (1 in VAL_EVERY)."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % VAL_EVERY == 0


def train_or_val(rows, split, question_of):
    """The rows of a train split that split "train" trains on (all but the held-out slice) or that split "val"
    validates on (the slice only), in their order. question_of(row) -> the text that decides."""
    return [row for row in rows if held_out(question_of(row)) == (split == "val")]


def evaluate_categorical(conversation, assistant_response):
    """Categorical answer check: the response is exactly the reference letter (surrounding space ignored)."""
    return assistant_response.strip() == conversation["messages"][-1]["content"]


# -----------------------------------------------------------------------------
# Loading datasets: the hub by name, or a local copy


def local_data_dir():
    """The local dataset directory (NANOCHAT_DATA_DIR, laid out like ../shared/data), or None to use the hub."""
    return os.environ.get("NANOCHAT_DATA_DIR") or None


def shuffled(rows, seed=SHUFFLE_SEED):
    """rows in the order datasets' Dataset.shuffle(seed=seed) gives: new[i] = old[permutation[i]] with
    permutation = np.random.default_rng(seed).permutation(n) (checked by tests/test_tasks.py)."""
    return [rows[j] for j in np.random.default_rng(seed).permutation(len(rows))]


def local_path(*parts):
    """Path of a file under the local data dir; MissingFileError naming it when absent."""
    path = os.path.join(local_data_dir(), *parts)
    if not os.path.exists(path):
        raise MissingFileError(f"dataset file {path} not found (NANOCHAT_DATA_DIR={local_data_dir()}); copy it there "
                               f"in the layout of ../shared/data (see its MANIFEST.md), or unset NANOCHAT_DATA_DIR "
                               f"to download from the Hugging Face hub")
    return path


def load_dataset_rows(hub_path, hub_name, split, read_local, seed=SHUFFLE_SEED):
    """Rows (indexable, each a dict in the hub's schema) of a dataset, shuffled with seed.
    Local (NANOCHAT_DATA_DIR set): read_local() returns the rows in the hub's order (it raises MissingFileError
    naming the file). Else: datasets.load_dataset(hub_path, hub_name, split=split)."""
    if local_data_dir() is not None:
        return shuffled(read_local(), seed)
    import datasets  # slow to import; only the hub path needs it
    try:
        dataset = datasets.load_dataset(hub_path, hub_name, split=split)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
        where = f"{hub_path}" + (f" ({hub_name})" if hub_name else "") + f" split {split!r}"
        raise MissingFileError(f"could not load {where} from the Hugging Face hub: {e}. When offline, set "
                               f"NANOCHAT_DATA_DIR to a local copy laid out like ../shared/data") from e
    return dataset.shuffle(seed=seed)


def read_jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_zipped_lines(path):
    """Lines of the single text file inside a zip archive, unzipped in memory, without line ends (CRLF too)."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        if len(names) != 1:
            raise ValueError(f"{path}: expected one file in the archive, found {names}")
        return archive.read(names[0]).decode("utf-8").splitlines()
