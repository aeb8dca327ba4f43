"""nblib.sample: edge cases of temperature, top-k, top-p, seeding, cropping, empty prompts."""
import pytest
import torch

from nblib.gpt import GPT, GPTConfig
from nblib.sample import filter_logits, generate, sample_next_token

CFG = GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CFG).eval()


def greedy(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx[:, -CFG.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def prompt(B=2, T=3, seed=1):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_top_k_1_and_temperature_0_equal_greedy(model):
    want = greedy(model, prompt(), 12)
    for kwargs in (dict(top_k=1), dict(temperature=0.0), dict(top_p=1e-6), dict(top_k=1, temperature=5.0)):
        got = generate(model, prompt(), 12, generator=torch.Generator().manual_seed(5), **kwargs)
        assert torch.equal(got, want), kwargs


def test_seeded_reproducible_and_seed_matters(model):
    a = generate(model, prompt(), 20, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt(), 20, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    c = generate(model, prompt(), 20, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_long_prompt_is_cropped_not_an_error(model):
    long = prompt(B=1, T=3 * CFG.block_size)
    out = generate(model, long, 5, temperature=0.0)
    assert out.shape == (1, 3 * CFG.block_size + 5)
    assert torch.equal(out[:, : long.size(1)], long)  # the prompt comes back whole
    # only the last block_size tokens matter: same continuation as from the cropped prompt
    cropped = generate(model, long[:, -CFG.block_size:], 5, temperature=0.0)
    assert torch.equal(out[:, -5:], cropped[:, -5:])


def test_empty_prompt(model):
    out = generate(model, torch.zeros(2, 0, dtype=torch.long), 6, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 6)
    # it starts from the start token (default: the last id, GPT-2's <|endoftext|>)
    start = torch.full((2, 1), CFG.vocab_size - 1)
    assert torch.equal(generate(model, torch.zeros(2, 0, dtype=torch.long), 4, temperature=0.0),
                       greedy(model, start, 4)[:, 1:])
    one_d = generate(model, torch.tensor([], dtype=torch.long), 3, start_token=7, temperature=0.0)
    assert one_d.shape == (3,)
    assert torch.equal(one_d, greedy(model, torch.tensor([[7]]), 3)[0, 1:])


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False]]
    g = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}


def test_top_p_nucleus_by_hand():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    # sorted: 0.5, 0.3, 0.15, 0.05; the mass before each: 0, 0.5, 0.8, 0.95
    assert filter_logits(logits, top_p=0.45).isfinite().tolist() == [[True, False, False, False]]
    assert filter_logits(logits, top_p=0.6).isfinite().tolist() == [[True, False, True, False]]
    assert filter_logits(logits, top_p=0.81).isfinite().tolist() == [[True, False, True, True]]
    assert filter_logits(logits, top_p=1.0).isfinite().all()
    # what is kept is renormalised: with top_p=0.6, P(token 0) = 0.5 / 0.8
    g = torch.Generator().manual_seed(0)
    n = 4000
    hits = sum(sample_next_token(logits.expand(n, 4), top_p=0.6, generator=g).eq(0).sum().item() for _ in range(1))
    assert abs(hits / n - 0.625) < 0.03


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(20000, 3)
    g = torch.Generator().manual_seed(1)
    frac = {t: sample_next_token(logits, temperature=t, generator=g).eq(0).float().mean().item() for t in (0.5, 1.0, 2.0)}
    expected = {t: torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / t, 0)[0].item() for t in frac}
    for t in frac:
        assert abs(frac[t] - expected[t]) < 0.015, (t, frac[t], expected[t])


def test_bad_arguments_are_clear_errors():
    logits = torch.zeros(1, 5)
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        sample_next_token(logits, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        sample_next_token(logits, top_p=0.0)
    with pytest.raises(ValueError, match="batch, vocab"):
        sample_next_token(torch.zeros(5))


def gpt2_sized_logits(seed, scale=3.0, rows=4):
    """Logits like a real model's: GPT-2's 50,257 tokens, spread ~N(0, scale^2)."""
    return torch.randn(rows, 50257, generator=torch.Generator().manual_seed(seed)) * scale


def test_top_p_one_is_an_exact_no_op_on_a_large_vocabulary():
    # a float32 running sum over 50,257 probabilities reaches 1.0 thousands of tokens early
    logits = gpt2_sized_logits(0)
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)
    assert torch.equal(filter_logits(logits, top_k=100, top_p=1.0), filter_logits(logits, top_k=100))


@pytest.mark.parametrize("seed, scale", [(0, 3.0), (1, 3.0), (2, 3.0), (3, 1.0), (4, 10.0)])
def test_top_p_keeps_the_same_tokens_as_transformers(seed, scale):
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = gpt2_sized_logits(seed, scale)
    for p in (1e-6, 0.05, 0.5, 0.9, 0.95, 0.99, 0.999, 0.99999):
        want = TopPLogitsWarper(p)(None, logits.clone()).isfinite()
        got = filter_logits(logits, top_p=p).isfinite()
        assert torch.equal(got, want), f"p={p}: {(got != want).sum().item()} tokens differ from transformers"


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), float("-inf")])
def test_temperature_nan_or_inf_is_a_clear_error(model, temperature):
    # NaN used to fail deep inside torch.multinomial; inf silently sampled uniformly
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        sample_next_token(torch.zeros(1, 5), temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        generate(model, prompt(), 3, temperature=temperature)


def test_sampling_logits_is_what_sample_next_token_draws_from():
    from nblib.sample import sampling_logits

    logits = gpt2_sized_logits(5, rows=2)[:, :300]
    z = sampling_logits(logits, 0.7, top_k=50, top_p=0.9)
    assert z.dtype == torch.float32
    assert torch.equal(z, filter_logits(logits / 0.7, top_k=50, top_p=0.9))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    drawn = sample_next_token(logits, 0.7, 50, 0.9, generator=g1)
    # by hand: one uniform per row, the first token whose cumulative probability passes it
    u = torch.rand(2, dtype=torch.float64, generator=g2)
    cdf = torch.softmax(z, -1).double().cumsum(-1)
    assert torch.equal(drawn[:, 0], (cdf <= u[:, None] * cdf[:, -1:]).sum(-1))
    assert z[torch.arange(2), drawn[:, 0]].isfinite().all()  # never a filtered token
    with pytest.raises(ValueError, match="temperature 0 is greedy"):
        sampling_logits(logits, 0.0)


def test_a_list_of_generators_gives_each_row_its_own_draws():
    logits = gpt2_sized_logits(6, scale=1.0, rows=3)[:, :500]
    batch = sample_next_token(logits, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    for row, seed in enumerate((1, 2, 3)):
        alone = sample_next_token(logits[row:row + 1], generator=torch.Generator().manual_seed(seed))
        assert batch[row].item() == alone.item()
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        sample_next_token(logits, generator=[torch.Generator(), torch.Generator()])


def test_one_uniform_per_row_per_step_and_none_for_greedy():
    logits = gpt2_sized_logits(7, rows=2)[:, :100]
    g = torch.Generator().manual_seed(0)
    sample_next_token(logits, temperature=0.0, generator=g)  # greedy draws nothing
    first = sample_next_token(logits, generator=g)
    second = sample_next_token(logits, generator=g)
    g_again = torch.Generator().manual_seed(0)
    assert torch.equal(torch.cat([first, second], 1),
                       torch.cat([sample_next_token(logits, generator=g_again) for _ in range(2)], 1))
    torch.manual_seed(3)
    a = sample_next_token(logits)
    torch.manual_seed(3)
    assert torch.equal(a, sample_next_token(logits))  # None: the global seed decides


def test_nan_logits_are_a_clear_error():
    logits = torch.zeros(2, 5)
    logits[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sample_next_token(logits)
