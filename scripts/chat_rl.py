"""
Reinforcement learning on a task with a checkable answer (GSM8K by default, or SpellingBee): the model samples
answers, the task scores them, and the likelihood of the better-than-average answers is pushed up.

The original's simplified GRPO, i.e. on-policy REINFORCE with a per-question baseline: per step, examples_per_step
questions (split across ranks) x num_samples answers each, sampled with the engine (all of a step's answers decoded
together by its BatchDecoder, the calculator tool included).
Reward: 1 for a correct final answer, else 0. Advantage: reward - the mean reward of that question's answers (so
the advantages of a question sum to 0; no division by the std, no KL, no ratio clipping: every sample is fresh).
Loss: -sum(advantage * log p(token)) over the tokens the model sampled, divided by the number of such tokens in the
whole step (token-level normalisation); the prompt and the calculator's forced output are never trained on. An
answer that ended by itself also trains on its <|assistant_end|> (stopping is part of a good answer). The LR falls
linearly to 0. Periodically: pass@k on the task's validation split (test is left to chat_eval).

Checkpoints go to <base>/chatrl_checkpoints/<model_tag>/.

Usage:
    python -m scripts.chat_rl
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl
    NANOCHAT_DATA_DIR=data/tasks python -m scripts.chat_rl --task=SpellingBee --examples_per_step=8 --num_samples=8 \\
        --max_new_tokens=160 --num_iterations=50
"""

import math
import time

import torch

from nanochat.checkpoint_manager import checkpoint_dir, load_model, save_checkpoint
from nanochat.common import UserError, all_ranks_sum, compute_cleanup, compute_init, init_wandb, print0
from nanochat.configurator import check_positive, configure
from nanochat.dataloader import masked_batch
from nanochat.engine import Completions
from nanochat.optim import lr_multiplier
from nanochat.report import get_report
from tasks.gsm8k import GSM8K
from tasks.spellingbee import SpellingBee

# Settings
run = "dummy"  # wandb run name; "dummy" logs nothing to wandb
device_type = ""  # cuda | cpu | mps; "" = autodetect
source = "sft"  # the model to train: sft | mid
model_tag = ""  # "" = the largest model of that source
model_step = -1  # -1 = its last checkpoint
task = "GSM8K"  # GSM8K | SpellingBee
spelling_bee_size = 20000  # SpellingBee train problems (GSM8K uses its whole train split)
calculator = True  # run the model's python blocks; False: they are not run, and the model writes their output too
# Rollouts
examples_per_step = 16  # questions per optimizer step, across processes
num_samples = 16  # answers sampled per question
device_batch_size = 8  # rows per forward/backward of the update; num_samples must be a multiple
generation_batch_size = 64  # answers decoded together (rows of one KV cache), across questions
max_new_tokens = 256
temperature = 1.0
top_k = 50
num_epochs = 1
num_iterations = -1  # optimizer steps; -1 = num_epochs of the task's train questions
# Optimization: the base LRs scaled by init_lr_frac, decaying linearly to 0
embedding_lr = 0.2
unembedding_lr = 0.004
matrix_lr = 0.02
init_lr_frac = 0.05
weight_decay = 0.0
# Evaluation and checkpoints (every <= 0: never in between; pass@k is always measured before the first step and
# after the last, for the report's before/after, and the last step is always saved)
eval_every = 60  # steps between pass@k evaluations
eval_examples = 400  # validation questions per evaluation
eval_num_samples = 8  # answers per validation question: pass@1 .. pass@eval_num_samples
save_every = 60
dry_run = False  # train and evaluate, but save no checkpoint and write no report

user_config = configure(globals())

# -----------------------------------------------------------------------------
# Settings check, processes, model, task

if task not in ("GSM8K", "SpellingBee"):
    raise UserError(f"--task={task}: expected GSM8K or SpellingBee")
if source not in ("sft", "mid"):
    raise UserError(f"--source={source}: expected sft or mid")
check_positive(user_config, "examples_per_step", "num_samples", "device_batch_size", "generation_batch_size",
               "max_new_tokens", "num_epochs", "eval_examples", "eval_num_samples", "spelling_bee_size")
if num_samples % device_batch_size != 0:
    raise UserError(f"--num_samples={num_samples} is not a multiple of --device_batch_size={device_batch_size}")
if num_samples < 2:
    raise UserError(f"--num_samples={num_samples}: the per-question baseline needs at least 2 answers")
if temperature <= 0:
    raise UserError(f"--temperature={temperature}: RL needs sampling, use a temperature > 0")
if num_iterations == 0 or num_iterations < -1:
    raise UserError(f"--num_iterations={num_iterations}: must be a positive number of steps, or -1 for num_epochs")

is_ddp, rank, local_rank, world_size, device = compute_init(device_type)
master_process = rank == 0
wandb_run = init_wandb(run, user_config, master_process, project="nanochat-rl")
if examples_per_step % world_size != 0:
    raise UserError(f"--examples_per_step={examples_per_step} is not a multiple of the {world_size} processes")
examples_per_rank = examples_per_step // world_size

model, tokenizer, meta = load_model(source, device, phase="train", model_tag=model_tag or None,
                                    step=None if model_step < 0 else model_step)
model_tag, model_config = meta["model_tag"], meta["model_config"]
optimizer = model.setup_optimizers(unembedding_lr=unembedding_lr * init_lr_frac, embedding_lr=embedding_lr * init_lr_frac,
                                   matrix_lr=matrix_lr * init_lr_frac, weight_decay=weight_decay)
pad_id = assistant_end = tokenizer.encode_special("<|assistant_end|>")

if task == "GSM8K":
    train_task, val_task = GSM8K("main", "train"), GSM8K("main", "val", stop=eval_examples)
else:
    train_task, val_task = SpellingBee(size=spelling_bee_size, split="train"), SpellingBee(size=eval_examples, split="val")
if num_iterations < 0:
    num_iterations = max(1, num_epochs * len(train_task) // examples_per_step)
print0(f"{task}: {len(train_task):,} train questions | {examples_per_step} questions x {num_samples} answers a step "
       f"| {num_iterations:,} steps")


def sample_answers(prompts, count, seed):
    """count answers to each prompt, all decoded together in rows of one BatchDecoder (generation_batch_size at
    a time; a finished row takes the next answer). Returns, per prompt, (sequences, masks, texts): prompt +
    answer ids, their masks (0 on the prompt and on the calculator's output) and the answer texts. An answer that
    ended by itself gets its <|assistant_end|> back (sampled, mask 1), so that stopping is trained too. Answer j
    of prompt i is seeded by (seed, i, j): it does not depend on the batching."""
    answers = Completions(model, tokenizer, prompts, count, max_new_tokens, temperature, top_k,
                          seed_of=lambda i, j: hash((seed, i, j)) & 0x7FFFFFFF, max_batch=generation_batch_size,
                          calculator=calculator)
    finished = {(answer.prompt, answer.sample): answer for answer in answers}
    results = []
    for i, prompt in enumerate(prompts):
        sequences, masks, texts = [], [], []
        for j in range(count):
            answer = finished[(i, j)]
            texts.append(tokenizer.decode(answer.tokens))
            stop = [assistant_end] if answer.stopped else []
            sequences.append(prompt + answer.tokens + stop)
            masks.append([0] * len(prompt) + answer.masks + [1] * len(stop))
        results.append((sequences, masks, texts))
    return results


@torch.no_grad()
def evaluate_pass_at_k():
    """({"pass@k": fraction of validation questions with a correct answer among the first k samples} for k = 1..K,
    [whether the first sample was right, for each of this rank's questions])."""
    model.eval()
    conversations = [val_task[index] for index in range(rank, len(val_task), world_size)]
    prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
    passed, firsts = [0] * eval_num_samples, []
    if prompts:
        for conversation, (_, _, texts) in zip(conversations, sample_answers(prompts, eval_num_samples, seed=-1)):
            correct = [bool(val_task.evaluate(conversation, text)) for text in texts]
            firsts.append(correct[0])
            for k in range(eval_num_samples):
                passed[k] += any(correct[:k + 1])
    model.train()
    *passed, total = all_ranks_sum(passed + [len(prompts)], device)
    return {f"pass@{k + 1}": passed[k] / max(1.0, total) for k in range(eval_num_samples)}, firsts


def paired_change(before, after):
    """(mean, standard error, number of questions) over all ranks of after - before, per question (1 right, 0 wrong)
    on the same questions: pairing leaves out the variation between questions, which both evaluations share."""
    diffs = [int(a) - int(b) for b, a in zip(before, after)]
    n, total, squares = all_ranks_sum([len(diffs), sum(diffs), sum(d * d for d in diffs)], device)
    mean = total / n
    variance = (squares - n * mean * mean) / max(1.0, n - 1)
    return mean, math.sqrt(max(0.0, variance) / n), int(n)


# -----------------------------------------------------------------------------
# Training loop: iteration `step` evaluates/saves the model after `step` updates, then (unless last) trains once

report = get_report()
curve = {"model_tag": model_tag, "task": task, "step": [], "reward": [], "lrm": [], "answer_tokens": [],
         "calculator_tokens": [], "eval_step": [], "pass@1": [], f"pass@{eval_num_samples}": []}
step, total_training_time = 0, 0.0
while True:
    last_step = step == num_iterations
    if step == 0 or last_step or (eval_every > 0 and step % eval_every == 0):
        pass_at_k, firsts = evaluate_pass_at_k()
        if step == 0:
            first_pass_at_k, firsts_before = pass_at_k, firsts
        print0(f"step {step:05d} | " + " | ".join(f"{name} {value:.4f}" for name, value in pass_at_k.items()))
        wandb_run.log({"step": step, **{f"eval/{name}": value for name, value in pass_at_k.items()}})
        curve["eval_step"].append(step)
        for name in dict.fromkeys(["pass@1", f"pass@{eval_num_samples}"]):  # one name when eval_num_samples is 1
            curve[name].append(pass_at_k[name])
    if not dry_run and step > 0 and (last_step or (save_every > 0 and step % save_every == 0)):
        save_checkpoint(checkpoint_dir("rl", model_tag), step, model.state_dict(), None, {
            "step": step, "task": task, "mean_reward": curve["reward"][-1], **pass_at_k, "model_config": model_config,
            "user_config": user_config, "world_size": world_size}, rank=rank)
    if last_step:
        break

    t0 = time.time()
    # Rollouts: this rank's questions, num_samples answers each, their rewards and advantages (reward minus the
    # question's mean reward: a question's advantages sum to 0)
    model.eval()
    rollouts = []  # (inputs, targets, advantages) per pass
    rewards_sum, sampled_tokens, forced_tokens = 0.0, 0, 0
    indices = [(step * examples_per_step + k * world_size + rank) % len(train_task) for k in range(examples_per_rank)]
    conversations = [train_task[index] for index in indices]
    prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
    for conversation, prompt, (sequences, masks, texts) in zip(conversations, prompts,
                                                                 sample_answers(prompts, num_samples, seed=step)):
        rewards = [train_task.reward(conversation, text) for text in texts]
        advantages = torch.tensor(rewards) - sum(rewards) / len(rewards)
        rewards_sum += sum(rewards)
        sampled_tokens += sum(sum(mask) for mask in masks)
        forced_tokens += sum(len(mask) - len(prompt) - sum(mask) for mask in masks)  # the calculator's output
        for start in range(0, num_samples, device_batch_size):
            rows = slice(start, start + device_batch_size)
            inputs, targets = masked_batch(sequences[rows], masks[rows], pad_id)
            rollouts.append((inputs.to(device), targets.to(device), advantages[rows].to(device)))
    model.train()
    rewards_total, step_tokens, step_forced_tokens = all_ranks_sum([rewards_sum, sampled_tokens, forced_tokens], device)
    mean_reward = rewards_total / (examples_per_step * num_samples)

    # One update: loss = -sum over sampled tokens of advantage * log p(token), over every sampled token of the step
    # (times world_size: the optimizer averages the ranks); masked targets (-1) have zero loss, so zero gradient
    for inputs, targets, advantages in rollouts:
        log_probs = -model(inputs, targets, loss_reduction="none")  # (B, T)
        loss = -(log_probs * advantages[:, None]).sum() / (max(1.0, step_tokens) / world_size)
        loss.backward()
    lrm = lr_multiplier(step, num_iterations, warmdown_steps=num_iterations)  # 1 -> 0 linearly
    optimizer.update(lrm)
    dt = time.time() - t0
    step += 1

    total_training_time += dt
    mean_answer_tokens = step_tokens / (examples_per_step * num_samples)
    print0(f"step {step:05d}/{num_iterations:05d} | mean reward {mean_reward:.4f} | answer tokens "
           f"{mean_answer_tokens:.1f} | calculator tokens {int(step_forced_tokens)} | lrm {lrm:.4f} | dt {dt * 1000:.0f}ms",
           flush=True)
    wandb_run.log({"step": step, "train/reward": mean_reward, "train/answer_tokens": mean_answer_tokens, "train/lrm": lrm})
    curve["step"].append(step)
    curve["reward"].append(mean_reward)
    curve["lrm"].append(lrm)
    curve["answer_tokens"].append(mean_answer_tokens)
    curve["calculator_tokens"].append(int(step_forced_tokens))

# -----------------------------------------------------------------------------
# Report

change, change_stderr, num_questions = paired_change(firsts_before, firsts)
measurable = change != 0 and abs(change) >= 2 * change_stderr
effect = (f"{100 * change:+.1f} ± {100 * change_stderr:.1f} points (paired, the same {num_questions} validation "
          f"questions): " + ("two standard errors or more, a measurable change" if measurable else
                             "within two standard errors, no change that this many questions can show"))
print0(f"pass@1 after RL vs before: {effect}")
if not dry_run:
    report.log_curve("chat_rl", curve)
    rewards = curve["reward"]
    first, last = rewards[:max(1, len(rewards) // 5)], rewards[-max(1, len(rewards) // 5):]
    report.log(section="Chat RL", data=[
        user_config,
        {
            "Task": task,
            "Source": f"{source} ({model_tag})",
            "Number of iterations": step,
            "DDP world size": world_size,
            "Mean reward, first fifth of the steps": sum(first) / len(first) if rewards else "-",
            "Mean reward, last fifth of the steps": sum(last) / len(last) if rewards else "-",
            **{f"{name} before": value for name, value in first_pass_at_k.items()},
            **{f"{name} after": value for name, value in pass_at_k.items()},
            "Change in pass@1": effect,
            "Total training time": f"{total_training_time:.0f}s",
        },
        "Mean reward per step: " + ", ".join(f"{reward:.3f}" for reward in rewards),
    ])
wandb_run.finish()
compute_cleanup()
