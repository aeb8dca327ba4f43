"""Supervised fine-tuning: batches of conversations, the masked loss, and the evals (lesson 08 on).

- ``collate``: rendered conversations (ids + assistant mask, ``nblib.chat.render``) into a
  right-padded ``Batch`` (padding is ``<|pad|>`` with mask False, so it never counts).
- ``sft_loss(logits, ids, mask)``: next-token cross-entropy averaged over the positions
  whose *target* token is in the mask: the model learns to write the assistant's replies
  (and to end them), not the user's messages. ``loss_fn`` wraps it for ``nblib.train``;
  ``all_tokens_loss_fn`` is the same loss on every non-pad token (the lesson's "no mask" run).
- ``batches``: a ``get_batch(split, generator)`` that draws fresh conversations from a
  ``nblib.tasks.Mixture`` (the train split's problems for "train", held-out ones for "val").
- evals: ``heldout_loss`` (the masked loss on fixed held-out batches), ``evaluate``
  (greedy replies through ``nblib.engine``, batched, read with ``nblib.chat.reply_text``,
  checked with ``nblib.tasks.verify``), ``accuracy_by_task`` and ``format_compliance``
  (the reply ended its turn with ``<|end|>`` and wrote no other special token), and
  ``majority_baseline``, the accuracy of always giving the most common answer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nblib import chat, tasks
from nblib.progress import progress


@dataclass
class Batch:
    """Right-padded token ids [B, T] and the assistant mask [B, T] (False on padding)."""

    ids: torch.Tensor
    mask: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(self.ids.to(device), self.mask.to(device))

    def __len__(self) -> int:
        return self.ids.shape[0]


def collate(examples: list[tuple[list[int], list[bool]]], pad_id: int) -> Batch:
    """``(ids, mask)`` pairs of any lengths -> one ``Batch``, padded on the right to the longest."""
    if not examples:
        raise ValueError("collate needs at least one example")
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.bool)
    for b, (x, m) in enumerate(examples):
        if len(x) != len(m):
            raise ValueError(f"example {b}: {len(x)} ids but {len(m)} mask entries")
        ids[b, :len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[b, :len(m)] = torch.as_tensor(m, dtype=torch.bool)
    return Batch(ids, mask)


def token_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the masked next-token losses, number of masked targets) for ``logits`` of ``model(ids)``.

    Position t predicts token t+1, so the targets are ``ids[:, 1:]``, the logits that
    predict them ``logits[:, :-1]``, and a target counts when ``mask[:, 1:]`` is True.
    """
    if logits.shape[:2] != ids.shape or ids.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, ids {tuple(ids.shape)} and mask {tuple(mask.shape)} "
                         "must agree on [B, T]")
    targets = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -100)
    predictions = logits[:, :-1]
    predictions = predictions.to(torch.promote_types(predictions.dtype, torch.float32))  # bf16/fp16 -> fp32
    losses = F.cross_entropy(predictions.reshape(-1, logits.size(-1)), targets.reshape(-1),
                             ignore_index=-100, reduction="sum")
    return losses, mask[:, 1:].sum()


def sft_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets in the mask (every masked token weighs the same).

    ``logits`` [B, T, V] are ``model(ids)``'s, ``ids`` and ``mask`` [B, T]. Padding and
    unmasked tokens change nothing: not the value, and they get no gradient.
    """
    total, count = token_losses(logits, ids, mask)
    if count == 0:
        raise ValueError("no target token is in the mask: nothing to learn from this batch")
    return total / count


def loss_fn(model, batch: Batch):
    """SFT's training step loss for ``nblib.train``: ``(loss, metrics)`` on the assistant's tokens."""
    batch = batch.to(next(model.parameters()).device)
    logits, _ = model(batch.ids)
    loss = sft_loss(logits, batch.ids, batch.mask)
    return loss, {"tokens": batch.mask[:, 1:].sum().float()}


def all_tokens_loss_fn(model, batch: Batch, pad_id: int = 0):
    """The same loss with no assistant mask: every token but padding is a target (user messages too)."""
    return loss_fn(model, Batch(batch.ids, batch.ids != pad_id))


def batches(mixture: tasks.Mixture, tokenizer: chat.ChatTokenizer, batch_size: int, block_size: int,
            two_turn_fraction: float = 0.0):
    """``get_batch(split, generator) -> Batch`` of fresh conversations from ``mixture``.

    "train" draws training problems, "val" held-out ones (``nblib.train`` evaluates on
    "val"). The generator seeds a ``random.Random``, so a batch is the same for the same
    generator state. A batch holds conversations of one problem each, or, with
    probability ``two_turn_fraction``, of two problems in a row (a whole batch of them:
    mixing lengths would pad every row to the longest). A conversation longer than
    ``block_size`` tokens is drawn again.
    """
    def get_batch(split: str, generator: torch.Generator | None = None) -> Batch:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = random.Random(seed)
        turns = 2 if rng.random() < two_turn_fraction else 1
        examples = []
        while len(examples) < batch_size:
            ids, mask = chat.render(mixture.conversation(rng, split, turns), tokenizer)
            if len(ids) <= block_size:
                examples.append((ids, mask))
        return collate(examples, tokenizer.pad_id)

    return get_batch


@torch.no_grad()
def heldout_loss(model, fixed_batches: list[Batch]) -> float:
    """The masked loss over all assistant tokens of ``fixed_batches`` (each token weighs the same)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in fixed_batches:
        batch = batch.to(device)
        s, n = token_losses(model(batch.ids)[0], batch.ids, batch.mask)
        total, count = total + s.item(), count + int(n)
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------------------- generation evals

@dataclass
class Reply:
    """A model's reply to a problem: its text, whether it ended its turn properly, and whether it is right."""

    problem: tasks.Problem
    text: str
    ended: bool                  # the reply ended with <|end|> and wrote no other special token
    correct: bool | None         # None for open requests


def _fit_shots(problem: tasks.Problem, shots: list[tasks.Problem], tokenizer, room: int) -> list[int]:
    """The few-shot prompt with as many of ``shots`` as fit in ``room`` tokens (none if even one does not)."""
    for k in range(len(shots), -1, -1):
        prompt = chat.render_prompt(tasks.fewshot(problem, shots[:k]), tokenizer)
        if len(prompt) <= room:
            return prompt
    raise ValueError(f"the prompt of {problem.prompt!r} does not fit in {room} tokens")


def max_reply_tokens(problems: list[tasks.Problem]) -> int:
    """Room for a reply: the longest demonstration plus a margin (the end token and a few more)."""
    return max(len(p.reply) for p in problems) + 8


@torch.no_grad()
def evaluate(model, tokenizer: chat.ChatTokenizer, problems: list[tasks.Problem],
             shots: dict[str, list[tasks.Problem]] | None = None, max_new_tokens: int | None = None,
             batch_size: int = 64, temperature: float = 0.0, generator: torch.Generator | None = None,
             show_progress: bool = True) -> list[Reply]:
    """Replies of ``model`` to ``problems`` (greedy by default), batched through ``nblib.engine``.

    ``shots`` (task name -> solved problems) makes few-shot prompts, for a base model
    that has never seen the template used as a chat; as many shots as fit are used.
    ``max_new_tokens`` defaults to the longest demonstration of each task + 8.
    """
    from nblib import engine

    by_task: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        by_task.setdefault(p.task, []).append(i)
    out: list[Reply | None] = [None] * len(problems)
    block = model.config.block_size
    jobs = []
    for task, idxs in by_task.items():
        n_new = max_new_tokens or max_reply_tokens([problems[i] for i in idxs])
        for start in range(0, len(idxs), batch_size):
            jobs.append((task, idxs[start:start + batch_size], n_new))
    for task, idxs, n_new in progress(jobs, desc="eval", **({} if show_progress else {"disable": True})):
        prompts = [_fit_shots(problems[i], (shots or {}).get(task, []), tokenizer, block - n_new) for i in idxs]
        rollout = engine.generate(model, prompts, n_new, temperature=temperature, stop_tokens=[tokenizer.end_id],
                                  pad_id=tokenizer.pad_id, generator=generator)
        for i, completion, finished in zip(idxs, rollout.completions(), rollout.finished.tolist()):
            text = chat.reply_text(completion, tokenizer)
            ended = bool(finished) and not any(tokenizer.is_special(t) for t in completion)
            p = problems[i]
            out[i] = Reply(p, text, ended, tasks.verify(p, text) if p.verifiable else None)
    return out


def accuracy_by_task(problems: list[tasks.Problem], replies: list[str]) -> dict[str, float]:
    """Fraction of right replies per verifiable task (open requests are skipped), tasks in first-seen order."""
    right: dict[str, list[bool]] = {}
    for p, r in zip(problems, replies, strict=True):
        if p.verifiable:
            right.setdefault(p.task, []).append(tasks.verify(p, r))
    return {t: sum(v) / len(v) for t, v in right.items()}


def majority_baseline(task_list: list[tasks.Task], problems: list[tasks.Problem], n: int = 2000,
                      seed: int = 0) -> dict[str, float]:
    """Accuracy per task of a "model" that always gives the task's most common training answer.

    The floor any accuracy should be read against: a model that answers "1" to every
    counting question is right whenever the letter occurs once.
    """
    by_name = {t.name: t for t in task_list}
    out = {}
    for name in dict.fromkeys(p.task for p in problems if p.verifiable):
        rng = random.Random(f"majority:{name}:{seed}")
        counts: dict[str, int] = {}
        for _ in range(n):
            answer = tasks.normalize(by_name[name].sample(rng, "train").answer)
            counts[answer] = counts.get(answer, 0) + 1
        guess = max(counts, key=counts.get)
        mine = [p for p in problems if p.task == name]
        out[name] = sum(tasks.verify(p, guess) for p in mine) / len(mine)
    return out


def format_compliance(replies: list[Reply]) -> float:
    """Fraction of replies that ended their turn with ``<|end|>`` (and wrote no other special token)."""
    return sum(r.ended for r in replies) / max(len(replies), 1)


def summary(replies: list[Reply]) -> dict:
    """Accuracy per verifiable task, their mean, and format compliance, for a table."""
    acc = accuracy_by_task([r.problem for r in replies], [r.text for r in replies])
    return {"accuracy": acc, "mean_accuracy": sum(acc.values()) / max(len(acc), 1),
            "format": format_compliance(replies)}
