"""One sampler, one seed, the same tokens: every generation entry point of nblib against the others
(lesson 06's loop, lesson 07's with and without a KV cache, the engine, pretrain's sampler), and the
engine's step API (new_cache, prefill, decode_step) driven by hand, with a cache the caller owns."""
import pytest
import torch

from nblib import checkpoint, engine, gpt, llama, pretrain, sample

VOCAB = 40
CHARS = ["\n"] + [chr(ord("A") + i) for i in range(VOCAB - 1)]  # a character tokenizer's, "\n" = 0
PROMPT = [0, 5, 9, 2, 7, 30]  # starts with "\n", as pretrain's sample_text does
N_NEW = 14
SAMPLINGS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=20),
             dict(temperature=1.3, top_k=25, top_p=0.9)]


def make(family):
    torch.manual_seed(0)
    if family == "gpt":
        return gpt.GPT(gpt.GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    return llama.Llama(llama.LlamaConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_kv_heads=2,
                                         n_embd=16)).eval()


@pytest.fixture(params=["gpt", "llama"], scope="module")
def model(request):
    return make(request.param)


def seeded(seed=7):
    return torch.Generator().manual_seed(seed)


def lesson_06(model, sampling, seed=7):
    """PROMPT's new tokens by lesson 06's plain loop."""
    return sample.generate(model, torch.tensor([PROMPT]), N_NEW, generator=seeded(seed), **sampling)[0, len(PROMPT):]


def other_paths(model, sampling, seed=7):
    """PROMPT's new tokens through every other entry point, each from a generator seeded alike."""
    prompt, P = torch.tensor([PROMPT]), len(PROMPT)
    return {
        "llama.generate, cache": llama.generate(model, prompt, N_NEW, generator=seeded(seed), **sampling)[0, P:],
        "llama.generate, no cache": llama.generate(model, prompt, N_NEW, use_cache=False, generator=seeded(seed),
                                                   **sampling)[0, P:],
        "engine.generate": engine.generate(model, [PROMPT], N_NEW, generator=seeded(seed), **sampling).ids[0, P:],
        "engine.generate, a list of one generator": engine.generate(model, [PROMPT], N_NEW, generator=[seeded(seed)],
                                                                    **sampling).ids[0, P:],
        "engine.generate, no cache": engine.generate(model, [PROMPT], N_NEW, generator=seeded(seed), use_cache=False,
                                                     **sampling).ids[0, P:],
    }


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_the_same_seed_gives_the_same_tokens_through_every_entry_point(model, sampling):
    want = lesson_06(model, sampling).tolist()
    assert len(want) == N_NEW
    for name, tokens in other_paths(model, sampling).items():
        assert tokens.tolist() == want, f"{name} differs from sample.generate with {sampling}"
    if sampling["temperature"] > 0:  # and the seed matters
        assert lesson_06(model, sampling, seed=8).tolist() != want


def test_pretrain_sample_text_draws_what_the_other_paths_draw(tmp_path):
    model = make("llama")
    path = checkpoint.save_checkpoint(tmp_path / "tiny.safetensors", model)
    manifest = {"tokenizer": "char", "chars": CHARS, "vocab_size": VOCAB, "eot_token": None}
    prompt, text = pretrain.sample_text(path, manifest, torch.device("cpu"), n_tokens=N_NEW, seed=7)
    assert prompt == "\n"
    # sample_text samples at temperature 0.8 with top-k 200 (all 40 tokens here)
    want = engine.generate(model, [[0]], N_NEW, temperature=0.8, top_k=200, generator=seeded(7)).completions()[0]
    assert text == "".join(CHARS[t] for t in want)


def test_a_loop_that_stops_early_shares_its_tokens_with_one_that_goes_on(model):
    kw = dict(temperature=1.0, top_p=0.95)
    short = llama.generate(model, torch.tensor([PROMPT]), 4, generator=seeded(), **kw)
    long = llama.generate(model, torch.tensor([PROMPT]), N_NEW, generator=seeded(), **kw)
    assert torch.equal(long[:, :short.shape[1]], short)
    stopped = engine.generate(model, [PROMPT], N_NEW, stop_tokens=long[0, len(PROMPT) + 3].item(),
                              generator=seeded(), **kw)
    assert stopped.ids[0].tolist() == short[0].tolist()  # stops at its 4th token, the one it stopped on


# ---------------------------------------------------------------- the step API by hand

PADDED_PROMPTS = [[5, 9, 2, 7, 7, 1, 30], [11], [3, 20, 8, 12]]


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_k=15)])
def test_prefill_and_decode_steps_by_hand_reproduce_generate(model, sampling):
    seeds = [1, 2, 3]
    ids, mask = engine.left_pad(PADDED_PROMPTS, pad_id=0)
    B, P = ids.shape
    cache = engine.new_cache(model, B, P + N_NEW)
    assert cache.k.dtype == next(model.parameters()).dtype and cache.max_len == P + N_NEW
    generators = [seeded(s) for s in seeds]
    logits = engine.prefill(model, ids, mask, cache)
    assert logits.shape == (B, VOCAB) and cache.pos == P
    new = []
    for _ in range(N_NEW):
        token = sample.sample_next_token(logits, generator=generators, **sampling)[:, 0]
        new.append(token)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool)], dim=1)
        logits = engine.decode_step(model, token, mask, cache)
    want = engine.generate(model, PADDED_PROMPTS, N_NEW, generator=[seeded(s) for s in seeds], **sampling)
    assert torch.equal(torch.stack(new, dim=1), want.ids[:, P:])
    with pytest.raises(ValueError, match="one token per row"):
        engine.decode_step(model, token[:, None], mask, cache)


def test_a_cache_of_your_own_is_used_and_reused_not_reallocated(model, monkeypatch):
    kw = dict(num_samples=2, temperature=1.0, top_k=30)
    want = engine.generate(model, PADDED_PROMPTS, 10, generator=seeded(), **kw)
    cache = engine.new_cache(model, 6, 24)  # 3 prompts x 2 samples; 7 + 10 positions needed, 24 held
    storage = cache.k.data_ptr(), cache.v.data_ptr()

    def no_new_cache(*args, **kwargs):
        raise AssertionError("generate made a cache of its own although one was passed")

    monkeypatch.setattr(engine, "new_cache", no_new_cache)
    for _ in range(2):  # reused across calls, emptied in between
        got = engine.generate(model, PADDED_PROMPTS, 10, generator=seeded(), cache=cache, **kw)
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
        assert (cache.k.data_ptr(), cache.v.data_ptr()) == storage
        assert cache.pos == 7 + 10 - 1  # the last token is sampled, never run
        with pytest.raises(ValueError, match=r"already holds 16 positions .* call cache.reset\(\)"):
            engine.generate(model, PADDED_PROMPTS, 10, cache=cache, **kw)
        cache.reset()


def test_a_cache_that_does_not_fit_is_refused_with_what_to_do(model):
    too_short = engine.new_cache(model, 6, 12)
    with pytest.raises(ValueError, match=r"needs 6 rows .* x 17 positions .* engine.new_cache\(model, 6, 17\)"):
        engine.generate(model, PADDED_PROMPTS, 10, num_samples=2, cache=too_short)
    with pytest.raises(ValueError, match="holds 3 rows"):
        engine.generate(model, PADDED_PROMPTS, 10, num_samples=2, cache=engine.new_cache(model, 3, 17))
    with pytest.raises(ValueError, match=r"the cache is torch.float64 on cpu, the model torch.float32"):
        engine.generate(model, PADDED_PROMPTS, 10, cache=llama.KVCache(model.config, 3, 17, dtype=torch.float64))
    with pytest.raises(ValueError, match="use_cache=False"):
        engine.generate(model, PADDED_PROMPTS, 10, use_cache=False, cache=engine.new_cache(model, 3, 17))
    assert too_short.pos == 0  # refused before any forward pass
    ids, mask = engine.left_pad(PADDED_PROMPTS, pad_id=0)
    with pytest.raises(ValueError, match="3 rows do not fit a cache of 2"):
        engine.prefill(model, ids, mask, engine.new_cache(model, 2, 17))
