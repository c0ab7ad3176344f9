"""
Scoring a chat model (mid, SFT or RL) on the chat tasks: each accuracy with its number of problems, one standard
error and a baseline, and ChatCORE.

Categorical tasks (ARC-Easy, ARC-Challenge, MMLU) need no sampling: the answer is the letter whose token has the
highest logit at the last prompt position. Generative tasks (GSM8K, HumanEval, SpellingBee, SimpleSpelling) sample
num_samples completions per problem (with the calculator unless switched off) and pass if any is correct (pass@k);
all problems share gen_batch decoder rows, a finished row taking the next (problem, sample) at once. Ranks take
every world_size-th problem; the counts are summed.

A score is only as good as what it is compared with: each comes with n, one standard error sqrt(p(1-p)/n) and the
baseline of answering without reading the question (Task.baseline: chance, or the best constant answer). An
accuracy within two standard errors of its baseline is marked: no evidence that the model learned the task.
ChatCORE is the mean over its six tasks of (accuracy - b) / (1 - b) with the original's fixed b (0.25 for the
four-choice tasks, 0 for the others), so that it stays comparable with published numbers. Not here: loading
checkpoints, the command line and the report (scripts/chat_eval.py); datasets and answer checks (tasks/).
"""

import math
from dataclasses import dataclass
from functools import partial

import torch

from nanochat.common import UserError, all_ranks_sum, get_dist_info, print0
from nanochat.engine import Completions
from nanochat.report import NEAR_BASELINE_MARK
from tasks.arc import ARC, eval_split
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SimpleSpelling, SpellingBee

# ChatCORE's tasks and the baseline each is centred on (the original's constants, not the measured baselines)
CHATCORE_BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
                      "SpellingBee": 0.0}
SPLITS = ("test", "val")
# name -> {split: the task on it}. "val" is held out from training and tuned on; HumanEval (164 problems) has none
TASKS = {
    "ARC-Easy": {"test": lambda **kw: ARC("ARC-Easy", eval_split("ARC-Easy"), **kw),
                 "val": partial(ARC, "ARC-Easy", "val")},
    "ARC-Challenge": {"test": lambda **kw: ARC("ARC-Challenge", eval_split("ARC-Challenge"), **kw),
                      "val": partial(ARC, "ARC-Challenge", "val")},
    "MMLU": {"test": partial(MMLU, "all", "test"), "val": partial(MMLU, "all", "validation")},
    "GSM8K": {"test": partial(GSM8K, "main", "test"), "val": partial(GSM8K, "main", "val")},
    "HumanEval": {"test": HumanEval},
    "SpellingBee": {"test": partial(SpellingBee, 256, "test"), "val": partial(SpellingBee, 256, "val")},
    # a warm-up check, not part of ChatCORE
    "SimpleSpelling": {"test": partial(SimpleSpelling, 256, "test"), "val": partial(SimpleSpelling, 256, "val")},
}


def make_task(task_name, split="test", max_problems=None):
    """The evaluation task called task_name on split ("test" or "val"), cut to its first max_problems problems
    (already shuffled)."""
    if task_name not in TASKS:
        raise UserError(f"unknown task {task_name!r}; the tasks are {', '.join(TASKS)}")
    if split not in SPLITS:
        raise UserError(f"split {split!r}: expected one of {SPLITS}")
    if split not in TASKS[task_name]:
        raise UserError(f"{task_name} has no {split} split (only {', '.join(TASKS[task_name])}): leave it out")
    return TASKS[task_name][split](stop=max_problems)


@dataclass
class Score:
    """An accuracy as num_passed of total problems, with the baseline of answering without reading them."""
    num_passed: int
    total: int
    baseline: float
    notes: str = ""  # what else was measured on the way (GSM8K: where the official scoring rule disagrees)

    @property
    def accuracy(self):
        return self.num_passed / self.total

    @property
    def stderr(self):
        """One standard error of the accuracy (binomial: sqrt(p(1-p)/n))."""
        return math.sqrt(self.accuracy * (1 - self.accuracy) / self.total)

    @property
    def near_baseline(self):
        """Within two standard errors of the baseline: no evidence of doing better than not reading the question."""
        return abs(self.accuracy - self.baseline) <= 2 * self.stderr

    def __str__(self):
        """e.g. "80.1 ± 2.5 (n=256, base 59.0)", in percent, marked when near the baseline."""
        mark = NEAR_BASELINE_MARK if self.near_baseline else ""
        return (f"{100 * self.accuracy:.1f} ± {100 * self.stderr:.1f} (n={self.total}, "
                f"base {100 * self.baseline:.1f}){mark}")


def letter_token_ids(tokenizer, letters):
    """The token id of each answer letter; each must be one token, as the assistant's answer is."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(encoded)} tokens with this tokenizer; categorical "
                             f"scoring needs one token per letter")
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def categorical_predictions(model, tokenizer, conversations, batch_size):
    """The predicted letter of each conversation: the letter whose token has the highest logit after the prompt.
    Prompts of a batch are right-padded and go through one forward; padding sits after each prompt's last token,
    so causal attention keeps it out of that position's logits."""
    device = model.get_device()
    pad_id = tokenizer.get_bos_token_id()
    predictions = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start:start + batch_size]
        prompts = [tokenizer.render_for_completion(conversation) for conversation in batch]
        max_len = max(len(prompt) for prompt in prompts)
        ids = torch.tensor([prompt + [pad_id] * (max_len - len(prompt)) for prompt in prompts],
                           dtype=torch.long, device=device)  # (B, T)
        first = min(len(prompt) for prompt in prompts) - 1  # the earliest position read: no logits before it
        logits = model(ids, logits_from=first)  # (B, T - first, V)
        for row, (conversation, prompt) in enumerate(zip(batch, prompts)):
            letters = conversation["letters"]
            letter_logits = logits[row, len(prompt) - 1 - first, letter_token_ids(tokenizer, letters)]  # (num_letters,)
            predictions.append(letters[letter_logits.argmax().item()])
    return predictions


def run_categorical_eval(task, model, tokenizer, batch_size=8):
    """(num_passed, total) over this rank's share of the task (every world_size-th problem)."""
    _, rank, _, world_size = get_dist_info()
    conversations = [task[i] for i in range(rank, len(task), world_size)]
    predictions = categorical_predictions(model, tokenizer, conversations, batch_size)
    num_passed = sum(task.evaluate(conversation, letter) for conversation, letter in zip(conversations, predictions))
    return num_passed, len(conversations)


def decide_problems(engine, prompts, is_correct, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                    gen_batch=32, seed=42):
    """Yield (problem, passed) for each prompt as soon as it is decided: passed once is_correct(problem, completion)
    holds for one of its num_samples completions (its other samples are then dropped), failed once all are wrong.

    The (problem, sample) pairs share gen_batch decoder rows, a finished row taking the next pair at once, so the
    work is batched across problems instead of within one. A completion is the generated tokens with the calculator's
    forced ones (none when engine.calculator is off), the stop token left out, as in Engine.generate_batch. Sample s
    of every problem is seeded with seed + s, as generate_batch seeds its rows, so a completion does not depend on
    gen_batch, the rank or the other problems (up to float rounding of batched matmuls)."""
    completions = Completions(engine.model, engine.tokenizer, prompts, num_samples, max_new_tokens, temperature,
                              top_k, seed_of=lambda problem, sample: seed + sample, max_batch=gen_batch,
                              calculator=engine.calculator, compile_step=engine.compile_step)
    samples_left = [num_samples] * len(prompts)
    for completion in completions:
        problem = completion.prompt
        if is_correct(problem, completion.tokens):
            completions.drop(problem)  # its other samples: queued ones never start, running ones stop
            yield problem, True
        else:
            samples_left[problem] -= 1
            if samples_left[problem] == 0:
                yield problem, False


def run_generative_eval(task, tokenizer, engine, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                        gen_batch=32, replies=None):
    """(num_passed, total) over this rank's share of the task: a problem passes when any of its num_samples
    completions is correct (pass@num_samples). gen_batch completions are decoded together (decide_problems).
    replies: a list that receives (conversation, text) of every completion judged, if given."""
    _, rank, _, world_size = get_dist_info()
    conversations = [task[i] for i in range(rank, len(task), world_size)]
    prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]

    def is_correct(problem, completion):
        text = tokenizer.decode(completion)
        if replies is not None:
            replies.append((conversations[problem], text))
        return task.evaluate(conversations[problem], text)

    num_passed = total = 0
    for _, passed in decide_problems(engine, prompts, is_correct, num_samples, max_new_tokens, temperature, top_k,
                                     gen_batch):
        num_passed += passed
        total += 1
        if total % 50 == 0:  # long generative runs (GSM8K: 1319 problems) show that they are moving
            print0(f"  {type(task).__name__}: {num_passed}/{total} passed on rank 0 so far")
    return num_passed, total


def score_chat_task(task_name, model, tokenizer, engine, split="test", batch_size=8, num_samples=1,
                    max_new_tokens=512, temperature=0.0, top_k=50, max_problems=None, gen_batch=32):
    """The Score of the model on one task's split (over all ranks)."""
    task = make_task(task_name, split, max_problems)
    if len(task) == 0:
        raise UserError(f"{task_name}: no problems to evaluate (max_problems={max_problems})")
    replies = [] if hasattr(task, "rule_disagreements") else None
    if task.eval_type == "categorical":
        counts = run_categorical_eval(task, model, tokenizer, batch_size)
    else:
        counts = run_generative_eval(task, tokenizer, engine, num_samples, max_new_tokens, temperature, top_k,
                                     gen_batch, replies)
    if replies is not None:  # GSM8K: how often the official rule (first "####", strings) judges a reply otherwise
        rules = task.rule_disagreements([c for c, _ in replies], [text for _, text in replies])
        counts = (*counts, rules["replies"], rules["ours_only"], rules["official_only"])
    num_passed, total, *rules = [int(count) for count in all_ranks_sum(list(counts), model.get_device())]
    notes = "" if not rules else (f"the official rule (first ####, strings) disagrees on {rules[1] + rules[2]} of "
                                  f"{rules[0]} replies: {rules[1]} right by ours only, {rules[2]} by it only")
    # The baseline is a property of the problems, the same on every rank: computed over all of them
    return Score(num_passed, total, task.baseline([task[i] for i in range(len(task))]), notes)


def chatcore(accuracies):
    """Mean centred accuracy over the six ChatCORE tasks ({name: accuracy}), or None unless all six are there."""
    if not all(name in accuracies for name in CHATCORE_BASELINES):
        return None
    centred = [(accuracies[name] - base) / (1.0 - base) for name, base in CHATCORE_BASELINES.items()]
    return sum(centred) / len(centred)
