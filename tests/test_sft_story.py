"""Lesson 08's generation exercise (08.generate): the course's solution passes its check, and each
planted mistake fails it with a message that names the mistake. Plus the keywords through which
lesson 08 runs on the learner's functions (sft.batches, sft.evaluate, sft.summary, sft.loss_fn)."""
import pytest
import torch

from nblib import chat, engine, sample, sft, tasks
from nblib.checks import CheckFailed
from nblib.checks import sft as sft_checks


def make_generate(right_pad=False, no_padding_mask=False, no_pad_after_stop=False, never_stop_early=False,
                  logprobs_at_temperature_one=False, logprobs_after_stop=False, no_finished=False,
                  first_token_only=False):
    """The lesson's batched generation loop, with at most one planted mistake."""
    def generate(model, prompts, max_new_tokens, temperature=1.0, stop_tokens=(), pad_id=0, generator=None):
        stop = torch.tensor(list(stop_tokens), dtype=torch.long)
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, P), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(B, P, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            cols = slice(0, len(prompt)) if right_pad else slice(P - len(prompt), P)
            ids[row, cols] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, cols] = True
        step_mask = torch.ones_like(attention_mask) if no_padding_mask else attention_mask
        cache = engine.new_cache(model, B, P + max_new_tokens)
        logits = engine.prefill(model, ids, step_mask, cache)
        finished = torch.zeros(B, dtype=torch.bool)
        new_ids, new_mask, new_logprobs = [], [], []
        for step in range(max_new_tokens):
            token = sample.sample_next_token(logits, temperature, generator=generator)[:, 0]
            alive = torch.ones(B, dtype=torch.bool) if no_pad_after_stop else ~finished
            scaled = logits / temperature if temperature > 0 and not logprobs_at_temperature_one else logits
            logprob = scaled.log_softmax(-1).gather(-1, token[:, None])[:, 0]
            new_ids.append(torch.where(alive, token, pad_id))
            new_mask.append(alive)
            new_logprobs.append(logprob if logprobs_after_stop else torch.where(alive, logprob, 0.0))
            finished = finished | (alive & torch.isin(token, stop))
            if (bool(finished.all()) and not never_stop_early) or step + 1 == max_new_tokens:
                break
            step_mask = torch.cat([step_mask, alive[:, None] | no_padding_mask], dim=1)
            logits = engine.decode_step(model, new_ids[-1] if not first_token_only else new_ids[0], step_mask, cache)
        new = torch.stack(new_mask, 1)
        return engine.Rollout(ids=torch.cat([ids, torch.stack(new_ids, 1)], 1),
                              attention_mask=torch.cat([attention_mask, new], 1),
                              completion_mask=torch.cat([torch.zeros_like(attention_mask), new], 1),
                              logprobs=torch.cat([torch.zeros(B, P), torch.stack(new_logprobs, 1)], 1),
                              finished=torch.zeros(B, dtype=torch.bool) if no_finished else finished, prompt_len=P)
    return generate


def test_the_lessons_generation_loop_passes():
    sft_checks.check_generate(make_generate())


@pytest.mark.parametrize("mistake, phrase", [
    (dict(right_pad=True), "padded on the right"),
    (dict(no_padding_mask=True), "attention sees their padding"),
    (dict(no_pad_after_stop=True), "after a row writes its stop token"),
    (dict(never_stop_early=True), "stop as soon as all rows are finished"),
    (dict(logprobs_at_temperature_one=True), "comes from softmax\\(logits / temperature\\)"),
    (dict(logprobs_after_stop=True), "logprobs should be 0 outside the completion"),
    (dict(no_finished=True), "finished should be"),
    (dict(first_token_only=True), "the new tokens differ from the engine's"),
])
def test_each_planted_mistake_is_named(mistake, phrase):
    with pytest.raises(CheckFailed, match=phrase):
        sft_checks.check_generate(make_generate(**mistake))


def test_the_course_engine_itself_is_refused():
    with pytest.raises(CheckFailed, match="course's own implementation"):
        sft_checks.check_generate(engine.generate)


def test_an_unwritten_generate_says_so():
    def generate(model, prompts, max_new_tokens, temperature=1.0, stop_tokens=(), pad_id=0, generator=None):
        """Complete every prompt, all rows at once."""
        raise NotImplementedError("08.generate")
    with pytest.raises(NotImplementedError, match="not written yet"):
        sft_checks.check_generate(generate)


# ---------------------------------------------------------------------------- the lesson runs on the learner's code

def test_sft_helpers_use_the_functions_they_are_given():
    tok = chat.ChatTokenizer()
    mixture = tasks.Mixture([tasks.Addition()], weights=[1])
    calls = []

    def render(conversation, tokenizer):
        calls.append("render")
        return chat.render(conversation, tokenizer)

    get_batch = sft.batches(mixture, tok, 2, 64, render=render)
    batch = get_batch("train", torch.Generator().manual_seed(0))
    assert calls.count("render") == 2

    def masked_loss(logits, ids, mask):
        calls.append("loss")
        return sft.sft_loss(logits, ids, mask)

    from nblib import gpt
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    loss, _ = sft.loss_fn(model, batch, masked_loss)
    assert calls[-1] == "loss" and torch.allclose(loss, sft.loss_fn(model, batch)[0])

    def generate(model, prompts, n, **kwargs):
        calls.append("generate")
        return engine.generate(model, prompts, n, **kwargs)

    problems = tasks.eval_set(mixture["add"], 3, seed=0)
    replies = sft.evaluate(model.eval(), tok, problems, generate=generate, show_progress=False)
    assert calls[-1] == "generate"
    assert sft.summary(replies, accuracy=lambda p, r: {"add": 0.25})["accuracy"] == {"add": 0.25}
