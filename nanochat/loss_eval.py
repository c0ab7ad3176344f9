"""
Bits per byte: the validation loss that does not depend on the tokenizer.

Mean cross-entropy per token changes with the vocabulary (a bigger vocab packs more text into a token, so each
token is harder to predict); nats summed over tokens and divided by the bytes of text they stand for does not.
Special tokens stand for no text (0 bytes) and ignored targets (-1) for nothing at all: both are left out.
Not a training-time loss: this runs the model in no_grad mode over a fixed number of batches.
"""

import math
import time

import torch

from nanochat.common import all_ranks_sum, dist_rank_and_size


def _target_bytes(targets, token_bytes):
    """Bytes of text each of the (flat) targets stands for: 0 for special tokens and for ignored targets (-1)."""
    return torch.where(targets >= 0, token_bytes[targets.clamp(min=0)], 0)


def _bits_per_byte_over_ranks(nats, num_bytes):
    """nats / (ln 2 * bytes), both 0-D tensors summed across ranks first; inf when there were no bytes."""
    nats, num_bytes = all_ranks_sum(nats).item(), all_ranks_sum(num_bytes).item()
    return nats / (math.log(2) * num_bytes) if num_bytes else float("inf")


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, progress_after_s=10.0, progress_every_s=30.0):
    """Bits per byte of `model` over `steps` batches of (inputs, targets) drawn from the iterator `batches`;
    token_bytes: 1-D int tensor, bytes of text per token id (0 for special tokens). Summed across ranks.
    An evaluation still running after progress_after_s seconds prints one progress line with an ETA (rank 0),
    then one every progress_every_s seconds; short ones print nothing."""
    total_nats = torch.zeros((), dtype=torch.float32, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    t0 = time.time()
    next_report = t0 + progress_after_s
    for step in range(steps):
        inputs, targets = next(batches)[:2]  # loaders with state yield a third item
        loss = model(inputs, targets, loss_reduction="none").view(-1).float()  # (B*T,) nats per token
        targets = targets.view(-1)
        num_bytes = _target_bytes(targets, token_bytes)  # (B*T,)
        total_nats += torch.where(num_bytes > 0, loss, 0.0).sum()
        total_bytes += num_bytes.sum()
        now = time.time()
        if now >= next_report and step + 1 < steps and dist_rank_and_size()[0] == 0:
            elapsed = now - t0
            eta = elapsed / (step + 1) * (steps - step - 1)
            print(f"evaluating bpb: batch {step + 1}/{steps} | elapsed {elapsed:.0f}s | eta {eta:.0f}s", flush=True)
            next_report = now + progress_every_s
    return _bits_per_byte_over_ranks(total_nats, total_bytes)


class UnigramBaseline:
    """The bits per byte of a model without context, which predicts every token by how often it occurs: the
    yardstick a trained model's bpb should land well below. Token frequencies are counted on the batches passed
    through count() (add-one smoothed, summed across ranks) and scored on those passed through score(); both hand
    their batches on, so the baseline rides along with the model's own evaluation without reading the data again.
    Special tokens and ignored targets are left out, as in evaluate_bpb."""

    def __init__(self, token_bytes):
        self.token_bytes = token_bytes
        self.counts = torch.zeros(token_bytes.numel(), dtype=torch.float64, device=token_bytes.device)
        self.nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
        self.bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)

    def count(self, batches):
        for batch in batches:
            targets = batch[1].reshape(-1)
            self.counts += torch.bincount(targets[targets >= 0], minlength=self.counts.numel())
            yield batch

    def score(self, batches):
        counts = all_ranks_sum(self.counts.clone())
        counts += 1  # add-one smoothing, once (not once per rank): no token is impossible
        return self._scored(batches, (counts / counts.sum()).log())

    def _scored(self, batches, log_probs):
        for batch in batches:
            targets = batch[1].reshape(-1)
            num_bytes = _target_bytes(targets, self.token_bytes)
            self.nats -= torch.where(num_bytes > 0, log_probs[targets.clamp(min=0)], 0.0).sum()
            self.bytes += num_bytes.sum()
            yield batch

    def bpb(self):
        return _bits_per_byte_over_ranks(self.nats.clone(), self.bytes.clone())
