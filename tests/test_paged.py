"""nblib.paged: the paged KV cache and continuous batching, against each request generated alone
by nblib.engine (the same tokens, greedy and sampled), on both model families."""
import random

import pytest
import torch

from nblib import engine, gpt, llama, paged

VOCAB = 61


def make(family):
    torch.manual_seed(0)
    if family == "gpt":
        model = gpt.GPT(gpt.GPTConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=32))
    else:
        model = llama.Llama(llama.LlamaConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_heads=2,
                                              n_embd=32))
    return model.double().eval()  # float64: a batch and a single row round alike, so greedy ties cannot flip


@pytest.fixture(params=["gpt", "llama"], scope="module")
def model(request):
    return make(request.param)


def trace(n=12, seed=0, max_prompt=20, max_new=24):
    """Requests of different prompt and reply lengths, arriving over time (seeded)."""
    rng = random.Random(seed)
    return [paged.Request(prompt=[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, max_prompt))],
                          max_new_tokens=rng.randint(1, max_new), arrival=0.0, seed=100 + i)
            for i in range(n)]


def alone(model, request, **kw):
    gen = torch.Generator().manual_seed(request.seed)
    rollout = engine.generate(model, [request.prompt], request.max_new_tokens, temperature=request.temperature,
                              generator=gen, **kw)
    return rollout.completions(keep_stop=True)[0]


def test_pages_are_handed_out_grown_and_given_back():
    config = gpt.GPTConfig(vocab_size=VOCAB, block_size=64, n_layer=1, n_head=2, n_embd=8)
    cache = paged.PagedKVCache(config, n_pages=5, page_size=4)
    cache.add(0), cache.add(1)
    cache.grow(0, 5)  # 2 pages
    cache.grow(1, 4)  # 1 page
    assert cache.tables == {0: [0, 1], 1: [2]} and cache.pages_in_use == 3
    cache.grow(0, 8)  # still 2 pages: 8 tokens fill them
    assert cache.tables[0] == [0, 1]
    assert cache.slots(0, 3, 6).tolist() == [3, 4, 5] and cache.slots(1, 0, 2).tolist() == [8, 9]
    cache.release(0)
    cache.grow(1, 9)  # 3 pages: it takes the freed ones
    assert cache.tables[1] == [2, 0, 1] and cache.slots(1, 3, 6).tolist() == [11, 0, 1]
    with pytest.raises(paged.OutOfPages, match="bigger"):
        cache.grow(1, 30)


def test_a_view_right_aligns_rows_of_different_lengths(model):
    cache = paged.paged_cache_for(model, n_pages=8, page_size=4)
    for seq, n in ((0, 5), (1, 2)):
        cache.add(seq)
        paged.forward_paged(model, cache, [seq], [list(range(1, n + 1))])
    view = cache.view([0, 1], [1, 1])
    assert view.pos == 5 and view.max_len == 6
    assert view.attention_mask.tolist() == [[True] * 6, [False, False, False, True, True, True]]
    cache.add(2)
    view = cache.view([0, 1, 2], [1, 1, 3])  # a decode step beside a prefill of 3 tokens: T = 3
    assert (view.pos, view.max_len, view.n_new) == (3, 6, 3)  # lengths 5, 2, 0 (the first view ran nothing)
    assert view.new_mask.tolist() == [[False, False, True], [False, False, True], [True, True, True]]
    assert view.attention_mask.tolist()[2] == [False] * 3 + [True] * 3


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_request_gets_what_it_gets_alone(model, temperature):
    requests = trace()
    for r in requests:
        r.temperature = temperature
    batcher = paged.ContinuousBatcher(model, n_pages=40, page_size=4, max_batch=5)
    batcher.run(requests)
    for r in requests:
        assert r.output == alone(model, r), r.id
    assert batcher.cache.pages_in_use == 0 and sorted(batcher.cache.free) == list(range(40))  # all given back
    assert batcher.peak_pages <= 40


def test_a_stop_token_ends_a_request_and_frees_its_row(model):
    requests = trace(n=6, seed=1)
    stop = 7
    batcher = paged.ContinuousBatcher(model, n_pages=40, page_size=4, max_batch=3, stop_tokens=stop)
    batcher.run(requests)
    for r in requests:
        expected = alone(model, r, stop_tokens=stop)
        assert r.output == expected and (stop not in r.output[:-1])


def test_requests_join_mid_flight_and_a_small_pool_makes_them_wait(model):
    """More requests than rows and pages: they queue, join as others leave, and still match."""
    requests = trace(n=10, seed=2)
    batcher = paged.ContinuousBatcher(model, n_pages=12, page_size=4, max_batch=4)
    for r in requests:
        batcher.submit(r)
    running_sizes = []
    while batcher.waiting or batcher.running:
        batcher.step()
        running_sizes.append(len(batcher.running))
        assert batcher.cache.pages_in_use <= 12
    assert max(running_sizes) <= 4 and len(running_sizes) > max(r.max_new_tokens for r in requests)
    for r in requests:
        assert r.output == alone(model, r)


def test_static_batches_give_the_same_tokens(model):
    requests = trace(n=7, seed=3)
    paged.static_batches(model, requests, batch_size=3)
    for r in requests:
        assert r.output == alone(model, r)


def test_bad_requests_are_refused_with_what_to_do(model):
    batcher = paged.ContinuousBatcher(model, n_pages=4, page_size=4, max_batch=2)
    with pytest.raises(ValueError, match="context"):
        batcher.submit(paged.Request(prompt=[1] * 60, max_new_tokens=10))
    with pytest.raises(ValueError, match="pool bigger"):
        batcher.submit(paged.Request(prompt=[1] * 10, max_new_tokens=10))
    with pytest.raises(ValueError, match="at least one token"):
        batcher.submit(paged.Request(prompt=[], max_new_tokens=3))
