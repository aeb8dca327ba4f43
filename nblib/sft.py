"""Supervised fine-tuning: batches of conversations, the masked loss, and the evals (lesson 08 on).

- ``collate``: rendered conversations (ids + assistant mask, ``nblib.chat.render``) into a
  right-padded ``Batch`` (padding is ``<|pad|>`` with mask False, so it never counts).
- ``sft_loss(logits, ids, mask)``: next-token cross-entropy averaged over the positions
  whose *target* token is in the mask: the model learns to write the assistant's replies
  (and to end them), not the user's messages. ``loss_fn`` wraps it for ``nblib.train``;
  ``all_tokens_loss_fn`` is the same loss on every non-pad token (the lesson's "no mask" run).
- ``batches``: a ``get_batch(split, generator)`` that draws fresh conversations from a
  ``nblib.tasks.Mixture`` (the train split's problems for "train", held-out ones for "val").
- evals: ``heldout_assistant_loss`` (the masked loss on fixed held-out batches), ``evaluate``
  (greedy replies through ``nblib.engine``, batched, read with ``nblib.chat.reply_text``,
  checked with ``nblib.tasks.verify``), ``accuracy_by_task`` and ``format_compliance``
  (the reply ended its turn with ``<|end|>`` and wrote no other special token), and
  ``majority_baseline``, the accuracy of always giving the most common answer.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nblib import base as base_lib, chat, checkpoint, data, engine, llama, modelcache, tasks, train
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


def loss_fn(model, batch: Batch, masked_loss=sft_loss):
    """SFT's training step loss for ``nblib.train``: ``(loss, metrics)`` on the assistant's tokens.

    ``masked_loss(logits, ids, mask)`` computes it (default ``sft_loss``; lesson 08 passes the learner's).
    """
    batch = batch.to(next(model.parameters()).device)
    logits, _ = model(batch.ids)
    loss = masked_loss(logits, batch.ids, batch.mask)
    return loss, {"tokens": batch.mask[:, 1:].sum().float()}


def all_tokens_loss_fn(model, batch: Batch, pad_id: int = 0, masked_loss=sft_loss):
    """The same loss with no assistant mask: every token but padding is a target (user messages too)."""
    return loss_fn(model, Batch(batch.ids, batch.ids != pad_id), masked_loss)


def batches(mixture: tasks.Mixture, tokenizer: chat.ChatTokenizer, batch_size: int, block_size: int,
            two_turn_fraction: float = 0.0, render=chat.render):
    """``get_batch(split, generator) -> Batch`` of fresh conversations from ``mixture``.

    "train" draws training problems, "val" held-out ones (``nblib.train`` evaluates on
    "val"). The generator seeds a ``random.Random``, so a batch is the same for the same
    generator state. A batch holds conversations of one problem each, or, with
    probability ``two_turn_fraction``, of two problems in a row (a whole batch of them:
    mixing lengths would pad every row to the longest). A conversation longer than
    ``block_size`` tokens is drawn again. ``render(conversation, tokenizer) -> (ids, mask)``
    writes each one (default ``chat.render``; lesson 08 passes the learner's).
    """
    def get_batch(split: str, generator: torch.Generator | None = None) -> Batch:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = random.Random(seed)
        turns = 2 if rng.random() < two_turn_fraction else 1
        examples = []
        while len(examples) < batch_size:
            ids, mask = render(mixture.conversation(rng, split, turns), tokenizer)
            if len(ids) <= block_size:
                examples.append((ids, mask))
        return collate(examples, tokenizer.pad_id)

    return get_batch


@torch.no_grad()
def heldout_assistant_loss(model, fixed_batches: list[Batch]) -> float:
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
    if count == 0:
        raise ValueError("no assistant token in the held-out batches: nothing to measure (a loss of 0 would look "
                         "perfect); render conversations with assistant replies, e.g. from sft.batches")
    return total / count


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
             show_progress: bool = True, generate=engine.generate) -> list[Reply]:
    """Replies of ``model`` to ``problems`` (greedy by default), batched through ``nblib.engine``
    (or ``generate``, a function called as ``engine.generate`` is: lesson 08 passes the learner's).

    ``shots`` (task name -> solved problems) makes few-shot prompts, for a base model
    that has never seen the template used as a chat; as many shots as fit are used.
    ``max_new_tokens`` defaults to the longest demonstration of each task + 8.
    """
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
        rollout = generate(model, prompts, n_new, temperature=temperature, stop_tokens=[tokenizer.end_id],
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


def summary(replies: list[Reply], accuracy=accuracy_by_task) -> dict:
    """Accuracy per verifiable task, their mean, and format compliance, for a table.

    ``accuracy(problems, reply_texts) -> {task: share right}`` scores them (lesson 08 passes the learner's).
    """
    acc = accuracy([r.problem for r in replies], [r.text for r in replies])
    return {"accuracy": acc, "mean_accuracy": sum(acc.values()) / max(len(acc), 1),
            "format": format_compliance(replies)}


# ---------------------------------------------------------------------------- the cached SFT model

VERSION = 1  # bump when nblib.tasks or this recipe changes in a way SFTSpec does not capture


@dataclass(frozen=True)
class SFTSpec:
    """Everything that decides the SFT model's weights, besides the base model it starts from."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 75
    weight_decay: float = 0.0    # move away from the base model only as far as the data asks
    two_turn_fraction: float = 0.1
    weights: tuple[float, ...] = (4, 1.5, 1, 1, 1, 1)  # add, reverse, spell, count, opposite, say
    drop_carries: bool | float = False   # True: the addition demonstrations come from the buggy teacher (p: sometimes)
    eval_interval: int = 300
    eval_batches: int = 10
    seed: int = 0

    def mixture(self, text: str) -> tasks.Mixture:
        return tasks.Mixture(tasks.default_tasks(text, drop_carries=self.drop_carries), list(self.weights))

    def train_config(self, block_size: int) -> train.TrainConfig:
        return train.TrainConfig(max_steps=self.steps, batch_size=self.batch_size, block_size=block_size, lr=self.lr,
                                 min_lr=self.min_lr, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                                 eval_interval=self.eval_interval, eval_batches=self.eval_batches, seed=self.seed,
                                 dtype="float32")


# Lesson 08's recipe: full mode, and FAST mode (a few seconds; a stand-in model).
FULL = SFTSpec()
FAST = SFTSpec(steps=40, batch_size=8, warmup_steps=1, eval_interval=20, eval_batches=2)


def default_spec(fast: bool) -> SFTSpec:
    """``FAST`` in FAST mode, else ``FULL``: pass the lesson's ``FAST`` (its config cell reads ``NBLIB_FAST``)."""
    return FAST if fast else FULL


@dataclass
class SFTModel:
    """What ``load_or_train`` returns: the fine-tuned model, its tokenizer, the base it started from, its training."""

    model: torch.nn.Module
    tokenizer: chat.ChatTokenizer
    spec: SFTSpec
    base: base_lib.Base
    key: str
    path: Path
    from_cache: bool
    history: train.History


def finetune(base_model, tokenizer: chat.ChatTokenizer, spec: SFTSpec, text: str, device=None,
             show_progress: bool = True):
    """A copy of ``base_model`` fine-tuned by ``spec``'s recipe (lesson 08's loop): ``(model, history)``."""
    block = base_model.config.block_size
    get_batch = batches(spec.mixture(text), tokenizer, spec.batch_size, block, spec.two_turn_fraction)
    model = copy.deepcopy(base_model)
    if device is not None:
        model = model.to(device)
    history = train.train(model, None, None, spec.train_config(block), device=device, get_batch=get_batch,
                          loss_fn=loss_fn, show_progress=show_progress)
    return model.eval(), history


def load_or_train(spec: SFTSpec, base_spec: base_lib.BaseSpec, *, device=None, cache_dir=None, retrain: bool = False,
                  show_progress: bool = True, verbose: bool = True) -> SFTModel:
    """The SFT model of lesson 08's recipe ``spec`` on the base model of ``base_spec`` (e.g.
    ``default_spec(FAST)`` and ``nblib.base.default_spec(FAST)``), from the cache or trained now.

    Lessons 09-11 start from it. The cache key covers the base model's key, ``spec``, the
    tokenizer and the recipe version; a damaged cache is trained again (see ``nblib.modelcache``).
    """
    say = print if verbose else (lambda *a, **k: None)
    pretrained = base_lib.load_or_train(base_spec, device=device, cache_dir=cache_dir, show_progress=show_progress,
                                        verbose=verbose)
    tokenizer = pretrained.tokenizer
    key = modelcache.key_of({"base": pretrained.key, "spec": dataclasses.asdict(spec), "version": VERSION,
                             "tokenizer": tokenizer.to_dict()})
    path = modelcache.models_dir(cache_dir) / f"sft-{key}"

    def load(folder):
        saved = json.loads((folder / "spec.json").read_text())
        if saved.get("key") != key:
            raise ValueError(f"spec.json names key {saved.get('key')!r}, not {key!r}")
        model = llama.Llama(pretrained.model.config)
        meta = checkpoint.load_checkpoint(folder / "model.safetensors", model, restore_rng=False)
        return model.to(next(pretrained.model.parameters()).device).eval(), train.History.from_dict(meta["extra"]["history"])

    def build():
        say(f"fine-tuning the base model (key {key}): {spec.steps} steps of lesson 08's recipe; it is cached for next time")
        t0 = time.perf_counter()
        result = finetune(pretrained.model, tokenizer, spec, data.read_text(pretrained.spec.data), device, show_progress)
        say(f"fine-tuned in {time.perf_counter() - t0:.0f} s, held-out loss {result[1].val[-1]:.4f}; "
            f"saved to {modelcache.shown(path)}")
        return result

    def save(result, folder):
        model, history = result
        checkpoint.save_checkpoint(folder / "model.safetensors", model, step=spec.steps, rng=False,
                                   extra={"history": history.to_dict(), "key": key})
        (folder / "spec.json").write_text(json.dumps({"key": key, "spec": dataclasses.asdict(spec), "version": VERSION,
                                                      "base": pretrained.key}, indent=1))

    (model, history), from_cache = modelcache.load_or_build(path, load, build, save, retrain=retrain, say=say,
                                                            what="SFT model")
    return SFTModel(model, tokenizer, spec, pretrained, key, path, from_cache, history)
