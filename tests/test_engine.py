"""nblib.engine: batched generation and sequence log-probs, against the same thing done one
prompt at a time, without the cache, and by a teacher-forced forward pass; both model families."""
import pytest
import torch

from nblib import engine, gpt, llama

VOCAB = 61


def make_gpt():
    torch.manual_seed(0)
    return gpt.GPT(gpt.GPTConfig(vocab_size=VOCAB, block_size=48, n_layer=2, n_head=4, n_embd=32)).eval()


def make_llama():
    torch.manual_seed(0)
    return llama.Llama(llama.LlamaConfig(vocab_size=VOCAB, block_size=48, n_layer=2, n_head=4, n_kv_heads=2,
                                         n_embd=32)).eval()


@pytest.fixture(params=["gpt", "llama"], scope="module")
def model(request):
    return make_gpt() if request.param == "gpt" else make_llama()


PROMPTS = [[5, 9, 2, 7, 7, 1, 30], [11], [3, 40, 8, 12]]  # lengths 7, 1, 4: two rows padded


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---------------------------------------------------------------- a row is what its prompt gives alone

@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0),
                                      dict(temperature=0.8, top_k=20, top_p=0.9)])
def test_padded_rows_equal_each_prompt_alone(model, sampling):
    seeds = [10, 11, 12]
    batch = engine.generate(model, PROMPTS, 12, generator=gens(seeds), **sampling)
    P = batch.prompt_len
    assert P == 7 and batch.ids.shape == (3, 7 + 12)
    for row, (prompt, seed) in enumerate(zip(PROMPTS, seeds)):
        alone = engine.generate(model, [prompt], 12, generator=gens([seed]), **sampling)
        assert alone.prompt_len == len(prompt)
        assert batch.completions()[row] == alone.completions()[0], (row, sampling)
        pad = P - len(prompt)
        assert batch.ids[row, pad:].tolist() == alone.ids[0].tolist()
        assert not batch.attention_mask[row, :pad].any() and (batch.ids[row, :pad] == 0).all()
        torch.testing.assert_close(batch.logprobs[row, pad:], alone.logprobs[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.2, top_k=30)])
def test_cached_equals_uncached(model, sampling):
    kw = dict(generator=gens([1, 2, 3, 4, 5, 6]), num_samples=2, stop_tokens={4, 17}, **sampling)
    fast = engine.generate(model, PROMPTS, 20, use_cache=True, **kw)
    kw["generator"] = gens([1, 2, 3, 4, 5, 6])
    slow = engine.generate(model, PROMPTS, 20, use_cache=False, **kw)
    assert torch.equal(fast.ids, slow.ids)
    for name in ("attention_mask", "completion_mask", "finished"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)


def test_greedy_equals_lesson_07_generate():
    model = make_llama()
    prompt = torch.tensor([PROMPTS[0]])
    want = llama.generate(model, prompt, 15, temperature=0)[0, 7:].tolist()
    assert engine.generate(model, [PROMPTS[0]], 15, temperature=0).completions() == [want]


# ---------------------------------------------------------------- stop tokens, masks, groups

def test_rows_stop_at_the_stop_token_and_stay_padded(model):
    free = engine.generate(model, PROMPTS, 25, num_samples=3, generator=torch.Generator().manual_seed(0))
    # stop at a token that some rows produce early: the 3rd generated token of row 0
    stop = free.ids[0, free.prompt_len + 2].item()
    r = engine.generate(model, PROMPTS, 25, num_samples=3, stop_tokens=stop, pad_id=60,
                        generator=torch.Generator().manual_seed(0))
    P = r.prompt_len
    assert r.finished[0]
    for row in range(9):
        gen_ids = r.ids[row, P:].tolist()
        comp = r.completion_mask[row, P:].tolist()
        if stop in free.ids[row, P:].tolist():
            k = free.ids[row, P:].tolist().index(stop)  # the same draws up to the stop token
            assert r.finished[row] and gen_ids[:k + 1] == free.ids[row, P:P + k + 1].tolist()
            assert comp == [True] * (k + 1) + [False] * (len(comp) - k - 1)
            assert all(t == 60 for t in gen_ids[k + 1:])  # pad_id after the stop token
            assert (r.logprobs[row, P + k + 1:] == 0).all() and (r.logprobs[row, P:P + k + 1] < 0).all()
            assert r.completions()[row] == gen_ids[:k]  # without the stop token
        else:
            assert not r.finished[row] and all(comp) and r.completions()[row] == gen_ids
    assert torch.equal(r.attention_mask[:, P:], r.completion_mask[:, P:])
    assert not r.completion_mask[:, :P].any() and (r.logprobs[:, :P] == 0).all()


def test_generation_ends_when_every_row_has_stopped(model):
    every = set(range(VOCAB))  # any token stops: one new token per row
    r = engine.generate(model, PROMPTS, 10, stop_tokens=every, temperature=0)
    assert r.ids.shape == (3, 8) and r.finished.all() and r.completions() == [[], [], []]
    assert r.completion_mask[:, -1].all()


def test_num_samples_are_grouped_by_prompt(model):
    seeds = list(range(100, 112))
    r = engine.generate(model, PROMPTS, 8, num_samples=4, generator=gens(seeds))
    assert r.ids.shape[0] == 12
    P = r.prompt_len
    for i, prompt in enumerate(PROMPTS):
        for j in range(4):
            row = 4 * i + j
            assert r.ids[row, P - len(prompt):P].tolist() == prompt
            alone = engine.generate(model, [prompt], 8, generator=gens([seeds[row]]))
            assert r.completions()[row] == alone.completions()[0]
        group = {tuple(c) for c in r.completions()[4 * i:4 * i + 4]}
        assert len(group) > 1  # different draws, different samples


def test_one_generator_or_the_global_seed_reproduces():
    model = make_gpt()
    a = engine.generate(model, PROMPTS, 10, num_samples=2, generator=torch.Generator().manual_seed(3))
    b = engine.generate(model, PROMPTS, 10, num_samples=2, generator=torch.Generator().manual_seed(3))
    c = engine.generate(model, PROMPTS, 10, num_samples=2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    torch.manual_seed(5)
    d = engine.generate(model, PROMPTS, 10)
    torch.manual_seed(5)
    assert torch.equal(d.ids, engine.generate(model, PROMPTS, 10).ids)


def test_sampling_follows_the_filtered_distribution():
    """The inverse-CDF draw: frequencies match softmax(filter(logits / T)), filtered tokens never appear."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(20000, 5)
    u = torch.rand(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    from nblib.sample import inverse_cdf, sampling_logits
    z = sampling_logits(logits, 0.7, top_k=3)
    tokens = inverse_cdf(z, u)
    want = torch.softmax(z[0], -1)
    got = torch.bincount(tokens, minlength=5) / 20000
    assert got[3:].sum() == 0
    assert (got - want).abs().max() < 0.01, (got, want)


# ---------------------------------------------------------------- log-probs

@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.6, top_k=12),
                                      dict(temperature=1.3, top_p=0.8), dict(temperature=0.0)])
def test_logprobs_equal_a_teacher_forced_pass(model, sampling):
    r = engine.generate(model, PROMPTS, 15, num_samples=2, stop_tokens=9, generator=gens(range(6)), **sampling)
    with torch.no_grad():
        logits, _ = model(r.ids, attention_mask=r.attention_mask)
    # logits at t - 1 chose token t, with the same temperature and filters
    want = engine.token_logprobs(logits[:, :-1], r.ids[:, 1:], **sampling)
    mask = r.completion_mask[:, 1:]
    torch.testing.assert_close(r.logprobs[:, 1:][mask], want[mask], atol=1e-5, rtol=0)
    assert (r.logprobs[:, 1:][~mask] == 0).all()
    if sampling["temperature"] in (0.0, 1.0) and len(sampling) == 1:
        # the model's own distribution: what sequence_logprobs computes
        summed, per_token = engine.sequence_logprobs(model, r.ids, r.completion_mask, r.attention_mask)
        torch.testing.assert_close(per_token, r.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(summed, r.logprobs.sum(-1), atol=1e-4, rtol=0)


def hand_logprobs(model, ids, mask):
    """One sequence at a time, one position at a time, from the model's next-token softmax."""
    out = torch.zeros(ids.shape)
    for row in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if mask[row, t]:
                logits, _ = model(ids[row:row + 1, :t])
                out[row, t] = torch.log_softmax(logits[0, -1].double(), -1)[ids[row, t]].float()
    return out


def test_sequence_logprobs_equals_a_hand_loop(model):
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(1)) < 0.6
    mask[0, 0] = True  # position 0 has no prediction: ignored
    with torch.no_grad():
        summed, per_token = engine.sequence_logprobs(model, ids, mask)
        want = hand_logprobs(model, ids, mask & (torch.arange(9) > 0))
    assert per_token[0, 0] == 0
    torch.testing.assert_close(per_token, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(summed, want.sum(-1), atol=1e-4, rtol=0)


def test_sequence_logprobs_padding_changes_nothing_and_gradients_flow(model):
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, :3] = False  # a "prompt" of 3 tokens, completion of 5
    _, alone = engine.sequence_logprobs(model, ids, mask)
    pad = 4
    padded = torch.cat([torch.full((2, pad), 7), ids], dim=1)
    attention = torch.cat([torch.zeros(2, pad, dtype=torch.bool), torch.ones(2, 8, dtype=torch.bool)], dim=1)
    pmask = torch.cat([torch.zeros(2, pad, dtype=torch.bool), mask], dim=1)
    summed, per_token = engine.sequence_logprobs(model, padded, pmask, attention)
    torch.testing.assert_close(per_token[:, pad:], alone, atol=1e-5, rtol=0)
    assert (per_token[:, :pad] == 0).all()
    model.zero_grad()
    summed.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()


# ---------------------------------------------------------------- mode, errors

def test_eval_mode_is_used_and_restored():
    torch.manual_seed(0)
    noisy = gpt.GPT(gpt.GPTConfig(vocab_size=VOCAB, block_size=48, n_layer=2, n_head=4, n_embd=32, dropout=0.5))
    noisy.train()
    a = engine.generate(noisy, PROMPTS, 6, temperature=0)
    assert noisy.training
    noisy.eval()
    assert torch.equal(a.ids, engine.generate(noisy, PROMPTS, 6, temperature=0).ids)  # no dropout inside
    assert not noisy.training


def test_bad_arguments_are_clear_errors():
    model = make_gpt()  # block_size 48
    with pytest.raises(ValueError, match="more than the model's context of 48: ask for at most 38 new tokens"):
        engine.generate(model, [list(range(10))], 39)
    with pytest.raises(ValueError, match="the longest prompt has 50 tokens, more than the model's context of 48"):
        engine.generate(model, [[1] * 50], 1)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate(model, [[1, VOCAB]], 3)
    with pytest.raises(ValueError, match="pad_id=61"):
        engine.generate(model, [[1]], 3, pad_id=VOCAB)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        engine.generate(model, [[1]], 3, temperature=float("nan"))
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(model, [[1]], 3, top_p=0.0)
    with pytest.raises(ValueError, match="2 generators for 4 rows"):
        engine.generate(model, [[1], [2]], 3, num_samples=2, generator=gens([0, 1]))
    with pytest.raises(ValueError, match="num_samples"):
        engine.generate(model, [[1]], 3, num_samples=0)
    r = engine.generate(model, [[1, 2], [3]], 0)  # nothing to generate: the prompts come back
    assert r.ids.tolist() == [[1, 2], [0, 3]] and not r.completion_mask.any() and r.completions() == [[], []]


def test_completions_keep_the_stop_token_when_asked():
    ids = torch.tensor([[9, 4, 5, 2, 0], [9, 6, 7, 8, 1]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    r = engine.Rollout(ids, mask | (torch.arange(5) == 0), mask, torch.zeros(2, 5), torch.tensor([True, False]), 1)
    assert r.completions(keep_stop=True) == [[4, 5, 2], [6, 7, 8, 1]] == engine.completion_tokens(ids, mask)
    assert r.completions() == [[4, 5], [6, 7, 8, 1]]
