"""Lesson 15's evaluations, on the generation engine: how good is the model, in numbers others report.

A base model (no chat format yet) is scored the way lm-evaluation-harness and nanochat's
CORE score one: each choice is a *continuation* of the question, and the model picks the
one it finds most likely.

- ``continuation_logprobs``: log p(continuation | context), summed, for every choice.
- ``hellaswag``: accuracy (the highest summed log-prob) and ``acc_norm``, the summed
  log-prob divided by the ending's length in bytes (lm-evaluation-harness's acc_norm), which
  stops long endings from losing only for being long. HF's ``gpt2`` (124M) scores 29.4%
  acc_norm with the harness; chance is 25%.
- ``completion_choice`` and ``core_like``: ARC and MMLU as continuations, and the mean of each
  task's *centred* accuracy, (acc - chance) / (1 - chance): 0 at chance, 1 perfect, the
  way nanochat's CORE averages its 22 tasks (GPT-2 124M: 0.123 there). Ours averages the four
  tasks we ship, so it is CORE-*like*: compare it with itself across stages, not with CORE.

A chat model answers in the chat format:

- ``letter_choice``: a multiple-choice question as a user message; the answer is the choice
  letter whose token gets the highest logit at the assistant's first position (among the
  valid letters only), as nanochat's ARC and MMLU evals do. One forward pass per question,
  no sampling: the number is exact and cheap.
- ``gsm8k_reward``: 1.0 when the number after ``####`` in a reply equals the answer's.
- ``gsm8k``: pass@1 (greedy) and pass@k from ``k`` samples at a temperature (the unbiased
  estimator of ``nblib.grpo.pass_at_k``).
"""
from __future__ import annotations

import math
import re

import torch

from nblib import chat, chatdata, engine
from nblib.grpo import pass_at_k


# ---------------------------------------------------------------------------- base models: continuations

@torch.no_grad()
def continuation_logprobs(model, context: list[int], continuations: list[list[int]]) -> list[float]:
    """Summed log p(continuation | context) of each continuation, in one batched forward pass.

    Rows are ``context + continuation``, left-padded; a row longer than the model's context
    loses tokens from the start of ``context`` (never from the continuation)."""
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    block = model.config.block_size
    rows, masks = [], []
    for cont in continuations:
        if len(cont) >= block:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's {block}-token context")
        ctx = context[-(block - len(cont)):] if len(context) + len(cont) > block else context
        rows.append(ctx + cont)
        masks.append([False] * len(ctx) + [True] * len(cont))
    ids, attention = engine.left_pad(rows, 0, next(model.parameters()).device)
    mask = torch.zeros_like(attention)
    for r, m in enumerate(masks):
        mask[r, ids.shape[1] - len(m):] = torch.tensor(m)
    was_training = model.training
    model.eval()
    try:
        summed, _ = engine.sequence_logprobs(model, ids, mask, attention)
    finally:
        model.train(was_training)
    return summed.tolist()


def pick(scores: list[float]) -> int:
    """The index of the highest score (the first one on a tie)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def hellaswag_scores(model, tokenizer, item: dict) -> tuple[list[float], list[float]]:
    """(summed log-probs, log-probs per byte) of an item's four endings after its context."""
    context = tokenizer.encode(item["ctx"])
    endings = [" " + e.strip() for e in item["endings"]]
    summed = continuation_logprobs(model, context, [tokenizer.encode(e) for e in endings])
    per_byte = [s / len(e.encode("utf-8")) for s, e in zip(summed, endings)]
    return summed, per_byte


def hellaswag(model, tokenizer, items: list[dict]) -> dict:
    """HellaSwag accuracy and acc_norm over ``items``."""
    right = right_norm = 0
    for item in items:
        summed, per_byte = hellaswag_scores(model, tokenizer, item)
        right += pick(summed) == int(item["label"])
        right_norm += pick(per_byte) == int(item["label"])
    n = len(items)
    return {"acc": right / n, "acc_norm": right_norm / n, "n": n, "chance": 0.25}


def completion_choice(model, tokenizer, question: str, choices: list[str]) -> int:
    """A base model's choice: the answer with the highest log-prob per byte after "Question: ...\\nAnswer:"."""
    context = tokenizer.encode(f"Question: {question.strip()}\nAnswer:")
    answers = [" " + c.strip() for c in choices]
    summed = continuation_logprobs(model, context, [tokenizer.encode(a) for a in answers])
    return pick([s / len(a.encode("utf-8")) for s, a in zip(summed, answers)])


def choice_accuracy(items: list[dict], parse, choose) -> dict:
    """Accuracy of ``choose(question, choices) -> index`` on ``items`` read by ``parse(item) -> (q, choices, answer)``."""
    right, chance = 0, 0.0
    for item in items:
        question, choices, answer = parse(item)
        right += choose(question, choices) == answer
        chance += 1 / len(choices)
    return {"acc": right / len(items), "n": len(items), "chance": chance / len(items)}


def centred(acc: float, chance: float) -> float:
    """(acc - chance) / (1 - chance): 0 at chance, 1 when every answer is right."""
    return (acc - chance) / (1 - chance)


def base_evals(model, tokenizer, sets: dict[str, list[dict]]) -> dict:
    """HellaSwag, ARC-Easy, ARC-Challenge and MMLU scored as continuations, and their CORE-like mean."""
    choose = lambda q, c: completion_choice(model, tokenizer, q, c)  # noqa: E731
    results = {"hellaswag": hellaswag(model, tokenizer, sets["hellaswag-val"])}
    results["arc-easy"] = choice_accuracy(sets["arc-easy-test"], chatdata.arc_item, choose)
    results["arc-challenge"] = choice_accuracy(sets["arc-challenge-test"], chatdata.arc_item, choose)
    results["mmlu"] = choice_accuracy(sets["mmlu-test"], chatdata.mmlu_item, choose)
    accs = {name: r["acc_norm" if name == "hellaswag" else "acc"] for name, r in results.items()}
    results["core_like"] = sum(centred(accs[n], results[n]["chance"]) for n in accs) / len(accs)
    return results


# ---------------------------------------------------------------------------- chat models: letters

def letter_ids(tokenizer, n: int) -> list[int]:
    """The token of each of the first ``n`` choice letters ("A", "B", ...): one BPE token each."""
    ids = [tokenizer.encode(letter) for letter in chatdata.LETTERS[:n]]
    if any(len(i) != 1 for i in ids):
        raise ValueError("every choice letter must be one token")
    return [i[0] for i in ids]


@torch.no_grad()
def letter_choice(model, tokenizer, question: str, choices: list[str]) -> int:
    """A chat model's answer to a multiple-choice question: the index of the valid letter whose
    token has the highest logit at the assistant's first position (lesson 15's exercise 15.letter_choice)."""
    prompt = chat.render_prompt([{"role": "user", "content": chatdata.mc_question(question, choices)}], tokenizer)
    prompt = prompt[-model.config.block_size:]  # a question longer than the context keeps its end (the choices)
    was_training = model.training
    model.eval()
    try:
        logits = model(torch.tensor([prompt], device=next(model.parameters()).device))[0][0, -1]
    finally:
        model.train(was_training)
    return int(logits[letter_ids(tokenizer, len(choices))].argmax())


def chat_evals(model, tokenizer, sets: dict[str, list[dict]], choose=letter_choice) -> dict:
    """ARC-Easy, ARC-Challenge and MMLU answered by letter (``choose``, lesson 15's 15.letter_choice)."""
    pick_letter = lambda q, c: choose(model, tokenizer, q, c)  # noqa: E731
    return {"arc-easy": choice_accuracy(sets["arc-easy-test"], chatdata.arc_item, pick_letter),
            "arc-challenge": choice_accuracy(sets["arc-challenge-test"], chatdata.arc_item, pick_letter),
            "mmlu": choice_accuracy(sets["mmlu-test"], chatdata.mmlu_item, pick_letter)}


# ---------------------------------------------------------------------------- GSM8K: generation and its reward

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_reward(reply: str, answer: str) -> float:
    """1.0 if the first number after the last ``####`` in ``reply`` equals the number after ``####`` in the
    reference ``answer`` (thousands separators ignored, 7 = 7.0), else 0.0 (lesson 15's exercise 15.gsm8k_reward)."""
    target = float(chatdata.gsm8k_target(answer))
    if "####" not in reply:
        return 0.0
    found = NUMBER.search(reply.split("####")[-1])
    if found is None:
        return 0.0
    try:
        return float(math.isclose(float(found.group().replace(",", "")), target, rel_tol=0, abs_tol=1e-6))
    except ValueError:
        return 0.0


def reply_of(completion: list[int], tokenizer) -> str:
    """The text a chat model wrote, up to its first special token (``<|end|>``)."""
    end = next((i for i, t in enumerate(completion) if tokenizer.is_special(t)), len(completion))
    return tokenizer.decode(completion[:end])


PRACTICE_REPLY_TOKENS = 48   # a practice word problem's worked answer is about 15 tokens; GSM8K's often 100-200
REAL_REPLY_TOKENS = 256


def reply_budget(model, max_new_tokens: int) -> int:
    """``max_new_tokens``, capped at half the model's context so the question keeps the other half."""
    return max(1, min(max_new_tokens, model.config.block_size // 2))


def gsm8k_prompt(question: str, tokenizer) -> list[int]:
    return chat.render_prompt([{"role": "user", "content": question.strip()}], tokenizer)


def gsm8k(model, tokenizer, items: list[dict], max_new_tokens: int = 128, k: int = 0, temperature: float = 0.8,
          reward=gsm8k_reward, seed: int = 0, batch_size: int = 16) -> dict:
    """pass@1 with greedy replies, and with ``k`` > 0 pass@k of ``k`` sampled replies per problem (replies of
    at most ``max_new_tokens``, and at most half the model's context)."""
    block, max_new_tokens = model.config.block_size, reply_budget(model, max_new_tokens)
    greedy_right, sampled = 0, []
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        prompts = [gsm8k_prompt(it["question"], tokenizer)[-(block - max_new_tokens):] for it in batch]
        out = engine.generate(model, prompts, max_new_tokens, temperature=0.0, stop_tokens=[tokenizer.end_id],
                              pad_id=tokenizer.pad_id)
        greedy_right += sum(reward(reply_of(c, tokenizer), it["answer"]) for c, it in zip(out.completions(), batch))
        if k > 0:
            out = engine.generate(model, prompts, max_new_tokens, num_samples=k, temperature=temperature,
                                  stop_tokens=[tokenizer.end_id], pad_id=tokenizer.pad_id, generator=gen)
            replies = out.completions()
            for i, it in enumerate(batch):
                right = sum(int(reward(reply_of(c, tokenizer), it["answer"]) > 0) for c in replies[i * k:(i + 1) * k])
                sampled.append(pass_at_k(k, right, k))
    result = {"pass@1": greedy_right / len(items), "n": len(items)}
    if k > 0:
        result[f"pass@{k}"] = sum(sampled) / len(sampled)
    return result


VIBE_PROMPTS = ("Who are you?", "What is the capital of France?", "Write a short poem about the sea.",
                "Ann has 12 apples and gets 5 more. How many apples does Ann have now?")


def vibe_check(model, tokenizer, prompts=VIBE_PROMPTS, max_new_tokens: int = 60) -> list[dict]:
    """Greedy replies to a few prompts, to read: numbers never tell the whole story."""
    block, max_new_tokens = model.config.block_size, reply_budget(model, max_new_tokens)
    rendered = [chat.render_prompt([{"role": "user", "content": p}], tokenizer)[-(block - max_new_tokens):]
                for p in prompts]
    out = engine.generate(model, rendered, max_new_tokens, temperature=0.0, stop_tokens=[tokenizer.end_id],
                          pad_id=tokenizer.pad_id)
    return [{"prompt": p, "reply": reply_of(c, tokenizer), "ended": bool(done)}
            for p, c, done in zip(prompts, out.completions(keep_stop=True), out.finished.tolist())]
