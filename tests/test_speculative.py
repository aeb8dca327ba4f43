"""nblib.speculative: the accept/reject rule leaves the target's distribution unchanged (exact
marginals and a chi-square test on many seeded draws), and greedy speculative decoding gives the
target's greedy tokens, whatever the draft."""
import itertools

import pytest
import torch

from nblib import engine, gpt, llama, speculative

# chi-square critical values at p = 0.001 (df = number of cells - 1); a correct rule exceeds them
# once in a thousand seeds, a rule that keeps every draft exceeds them every time here
CHI2_CRIT = {3: 16.27, 7: 24.32, 63: 103.4}


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def random_dist(g, V, sharp=2.0):
    return torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * sharp, -1)


def test_one_position_the_output_is_distributed_as_the_target():
    g = torch.Generator().manual_seed(0)
    p = torch.stack([random_dist(g, 4), random_dist(g, 4)])  # the target at the drafted position and after
    q = random_dist(g, 4)[None]  # a different draft
    counts = torch.zeros(4, dtype=torch.float64)
    for _ in range(6000):
        x = int(torch.multinomial(q[0], 1, generator=g))
        out = speculative.accept_draft(p, q, [x], g)
        assert 1 <= len(out) <= 2 and (len(out) == 1 or out[0] == x)
        counts[out[0]] += 1
    assert chi_square(counts, p[0]) < CHI2_CRIT[3], (counts / counts.sum(), p[0])
    # the same test rejects the draft's own distribution: it has the power to see a wrong rule
    assert chi_square(q[0] * counts.sum(), p[0]) > CHI2_CRIT[3]


def test_greedy_keeps_a_draft_exactly_when_it_is_the_target_argmax():
    p = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6]], dtype=torch.float64)
    one_hot = lambda i: torch.nn.functional.one_hot(torch.tensor(i), 3).double()  # noqa: E731
    target = torch.stack([one_hot(int(r.argmax())) for r in p])
    assert speculative.accept_draft(target, torch.stack([one_hot(1), one_hot(0)]), [1, 0]) == [1, 0, 2]
    assert speculative.accept_draft(target, torch.stack([one_hot(1), one_hot(2)]), [1, 2]) == [1, 0]
    assert speculative.accept_draft(target, torch.stack([one_hot(0), one_hot(0)]), [0, 0]) == [1]


def make(family, seed, V=61, layers=2, width=32):
    torch.manual_seed(seed)
    if family == "gpt":
        model = gpt.GPT(gpt.GPTConfig(vocab_size=V, block_size=48, n_layer=layers, n_head=2, n_embd=width))
    else:
        model = llama.Llama(llama.LlamaConfig(vocab_size=V, block_size=48, n_layer=layers, n_head=2, n_kv_heads=1,
                                              n_embd=width))
    return model.double().eval()


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("lookahead", [1, 3, 6])
def test_greedy_speculative_decoding_gives_the_targets_greedy_tokens(family, lookahead):
    target, draft = make(family, 0, layers=3), make(family, 1, layers=1, width=16)
    prompt = [5, 9, 2, 7]
    expected = engine.generate(target, [prompt], 20, temperature=0.0).completions()[0]
    got, stats = speculative.speculative_generate(target, draft, prompt, 20, lookahead=lookahead, temperature=0.0)
    assert got == expected
    assert stats["rounds"] <= 20 and 0 <= stats["acceptance"] <= 1
    # the target as its own draft: every drafted token is kept
    same, stats = speculative.speculative_generate(target, target, prompt, 20, lookahead=lookahead, temperature=0.0)
    assert same == expected and stats["acceptance"] == 1.0 and stats["rounds"] == -(-20 // (lookahead + 1))


def test_sampled_sequences_are_distributed_as_the_target_alone():
    """Three tokens from a 4-token vocabulary: the 64 sequences' exact probabilities under the target,
    against 2,000 seeded speculative draws (lookahead 2, a different draft)."""
    V, prompt = 4, [1, 2]
    target, draft = make("gpt", 0, V=V), make("gpt", 7, V=V, layers=1, width=16)
    with torch.no_grad():
        seqs = list(itertools.product(range(V), repeat=3))
        ids = torch.tensor([prompt + list(s) for s in seqs])
        logp = target(ids[:, :-1])[0].log_softmax(-1)
        exact = torch.stack([logp[:, len(prompt) - 1 + j].gather(-1, ids[:, len(prompt) + j, None])[:, 0]
                             for j in range(3)]).sum(0).exp()
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(seqs), dtype=torch.float64)
    accepted = 0
    for _ in range(2000):
        out, stats = speculative.speculative_generate(target, draft, prompt, 3, lookahead=2, temperature=1.0,
                                                      generator=g)
        counts[seqs.index(tuple(out))] += 1
        accepted += stats.get("accepted", 0)
    assert abs(float(exact.sum()) - 1) < 1e-9
    assert chi_square(counts, exact) < CHI2_CRIT[63]
    assert 0 < accepted  # the draft was used, not only the target's own token


def test_a_draft_of_another_vocabulary_or_too_long_a_request_is_refused():
    target = make("gpt", 0)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative.speculative_generate(target, make("gpt", 1, V=50), [1, 2], 4)
    with pytest.raises(ValueError, match="context"):
        speculative.speculative_generate(target, target, [1] * 40, 20)
