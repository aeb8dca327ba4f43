"""Simulated preferences (nblib.prefs) and the reward model (nblib.reward)."""
import math
import random

import pytest
import torch

from nblib import chat, llama, prefs, reward

TOK = chat.ChatTokenizer()


def test_rater_counts_distinct_kind_and_grim_words():
    rater = prefs.Rater()
    assert rater("Good morrow, sweet love!") == 3
    assert rater("love love love") == -1           # one kind word, repeated twice: stuffing is not kindness
    assert rater("Or love good good: good good") == 2 - 3 and rater.repeats("good, good") == 1
    assert prefs.Rater(repeat_penalty=0)("love love love") == 1
    assert rater("Death and blood, good sir.") == -1
    assert rater("") == 0
    assert rater.explain("good good") == "+0.0 +['good'] repeats 1"
    strict = prefs.Rater(vocabulary=frozenset({"good", "sir"}), unknown_penalty=0.5)
    assert strict("good sir") == 1 and strict("good sirrr blah") == 0
    assert "+['good']" in strict.explain("good sirrr") and "unknown ['sirrr']" in strict.explain("good sirrr")


def test_corpus_vocabulary_keeps_frequent_words():
    vocab = prefs.corpus_vocabulary("the cat, the dog. The 'cat'", min_count=2)
    assert vocab == {"the", "cat"}


def test_pairs_skip_ties_and_follow_bradley_terry_noise():
    prompts = [[1, 2]] * 4000
    comps = [[[5], [6], [7]]] * 4000
    scores = [[1.0, 0.0, 0.0]] * 4000            # one tie (b, c) and two pairs with a gap of 1 per prompt
    pairs = prefs.label_pairs(prompts, comps, scores, random.Random(0), noise=0.5)
    assert len(pairs) == 8000
    expected = 1 / (1 + math.exp(-2))           # sigmoid(1 / 0.5) = 0.881
    assert abs(prefs.agreement(pairs) - expected) < 4 * math.sqrt(expected * (1 - expected) / 8000)
    assert all({p.chosen_score, p.rejected_score} == {0.0, 1.0} for p in pairs)


def test_pairs_are_reproducible_and_errors_are_clear():
    args = ([[1]], [[[4], [5]]], [[0.0, 2.0]])
    assert prefs.label_pairs(*args, random.Random(3)) == prefs.label_pairs(*args, random.Random(3))
    with pytest.raises(ValueError, match="one list of completions"):
        prefs.label_pairs([[1]], [], [], random.Random(0))
    with pytest.raises(ValueError, match="noise"):
        prefs.label_pairs(*args, random.Random(0), noise=0)
    with pytest.raises(ValueError, match="no pairs"):
        prefs.agreement([])


def test_collate_pairs_puts_chosen_first_with_masks_and_last_index():
    pairs = [prefs.Pair([1, 10], [20, 21, 3], [22, 3], 1.0, 0.0), prefs.Pair([1], [23, 3], [24, 25, 26, 3], 2.0, 1.0)]
    batch = prefs.collate_pairs(pairs, pad_id=0)
    assert batch.ids.tolist() == [[1, 10, 20, 21, 3], [1, 23, 3, 0, 0], [1, 10, 22, 3, 0], [1, 24, 25, 26, 3]]
    assert batch.completion_mask.tolist()[1] == [False, True, True, False, False]
    assert batch.last.tolist() == [4, 2, 3, 4] and batch.n_pairs == 2
    with pytest.raises(ValueError, match="empty completion"):
        prefs.collate_pairs([prefs.Pair([1], [], [2], 0.0, 1.0)], 0)


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return llama.Llama(llama.LlamaConfig(vocab_size=TOK.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))


def test_reward_model_starts_at_zero_so_the_loss_starts_at_ln2():
    rm = reward.ScalarHead(tiny_lm())
    pairs = [prefs.Pair([1, 40], [41, 42, 3], [43, 3], 1.0, 0.0)] * 3
    loss, metrics = reward.loss_fn(rm, prefs.collate_pairs(pairs, TOK.pad_id))
    assert abs(loss.item() - math.log(2)) < 1e-7


def test_score_reads_the_last_real_token_and_padding_changes_nothing():
    rm = reward.ScalarHead(tiny_lm())
    torch.nn.init.normal_(rm.head.weight)
    row = torch.tensor([[1, 40, 41, 42, 3]])
    alone = rm.score(row, torch.tensor([4]))
    padded = torch.cat([row, torch.zeros(1, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(rm.score(padded, torch.tensor([4])), alone)
    torch.testing.assert_close(rm(row)[:, -1], alone)
    both = reward.score_texts(rm, [[1, 40], [1]], [[41, 42, 3], [50, 3]], TOK.pad_id)
    torch.testing.assert_close(both[0], alone[0])


def test_a_few_steps_learn_an_easy_preference():
    torch.manual_seed(0)
    rm = reward.ScalarHead(tiny_lm())
    good, bad = TOK.encode("good")[0], TOK.encode("x")[0]
    rng = random.Random(0)
    pairs = [prefs.Pair([1], [rng.choice([good, 50]), good, 3], [rng.choice([bad, 50]), bad, 3], 1.0, 0.0)
             for _ in range(32)]
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-2)
    batch = prefs.collate_pairs(pairs, TOK.pad_id)
    for _ in range(30):
        loss, _ = reward.loss_fn(rm, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 and reward.pair_accuracy(rm, pairs, TOK.pad_id) == 1.0


def test_by_truth_and_win_rate():
    turned = prefs.by_truth([prefs.Pair([1], [5], [6], 0.0, 2.0), prefs.Pair([1], [7], [8], 1.0, -1.0)])
    assert [(p.chosen, p.chosen_score) for p in turned] == [([6], 2.0), ([7], 1.0)]
    assert prefs.win_rate([1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 3.0, -1.0]) == (0.625, 2, 1)   # (2 wins + 1 tie / 2) / 4
    with pytest.raises(ValueError, match="one reference score per score"):
        prefs.win_rate([1.0], [1.0, 2.0])


def test_simulated_pairs_are_reproducible_and_hold_out_the_first_pairs():
    lm = tiny_lm(1).eval()
    prompts = [chat.render_prompt([{"role": "user", "content": q}], TOK) for q in ("Hi", "Yo", "Say a")]
    rater = prefs.Rater(frozenset("aeiou"), frozenset("xyz"))   # a tiny model writes letters, not words
    data = prefs.simulated_pairs(lm, TOK, prompts, rater, n_prompts=40, k=4, max_new_tokens=12, seed=3)
    again = prefs.simulated_pairs(lm, TOK, prompts, rater, n_prompts=40, k=4, max_new_tokens=12, seed=3)
    assert data.pairs == again.pairs and data.pairs != prefs.simulated_pairs(
        lm, TOK, prompts, rater, n_prompts=40, k=4, max_new_tokens=12, seed=4).pairs
    assert len(data.groups) == 40 and all(len(g) == 4 for g in data.groups)
    assert data.scores == [[rater(chat.reply_text(c, TOK)) for c in g] for g in data.groups]
    assert data.val == data.pairs[:len(data.val)] and data.train == data.pairs[len(data.val):]
    assert len(data.val) == max(4, int(0.1 * len(data.pairs)))
    assert all(p.chosen_score != p.rejected_score and p.prompt in prompts for p in data.pairs)
    with pytest.raises(ValueError, match="sample more prompts"):
        prefs.simulated_pairs(lm, TOK, prompts, prefs.Rater(frozenset(), frozenset()), n_prompts=4, k=2,
                              max_new_tokens=8)


def test_evaluate_policy_measures_no_kl_against_itself_and_more_against_another_model():
    lm, other = tiny_lm(1).eval(), tiny_lm(2).eval()
    with torch.no_grad():   # a sharper model than the near-uniform reference: far from it in KL
        for p in other.parameters():
            p.mul_(4)
    prompts = [chat.render_prompt([{"role": "user", "content": q}], TOK) for q in ("Hi", "Yo")] * 4
    rater = prefs.Rater(frozenset("aeiou"), frozenset("xyz"))
    same = prefs.evaluate_policy(lm, lm, prompts, rater, TOK, max_new_tokens=10, reward_model=reward.ScalarHead(lm))
    assert abs(same["kl"]) < 1e-5 and same["proxy"] == 0.0 and len(same["texts"]) == len(prompts)
    assert same["true"] == sum(same["scores"]) / len(prompts) and 1 <= same["length"] <= 10
    assert prefs.evaluate_policy(other, lm, prompts, rater, TOK, max_new_tokens=10)["kl"] > 1.0
    # the same seed: the same replies, so that two models are compared on the same random numbers
    assert prefs.evaluate_policy(lm, lm, prompts, rater, TOK, max_new_tokens=10)["texts"] == same["texts"]


def test_train_reward_model_starts_at_ln2_and_leaves_the_language_model_alone():
    lm = tiny_lm()
    before = [p.clone() for p in lm.parameters()]
    good, bad = TOK.encode("good")[0], TOK.encode("x")[0]
    pairs = [prefs.Pair([1], [good, good, 3], [bad, bad, 3], 1.0, 0.0)] * 16
    rm, history = reward.train_reward_model(lm, pairs, pairs[:4], TOK.pad_id,
                                            reward.RewardConfig(steps=40, batch_size=8, lr=1e-2), show_progress=False)
    assert abs(history.loss[0] - math.log(2)) < 1e-6 and history.loss[-1] < 0.1
    assert not rm.training and reward.pair_accuracy(rm, pairs, TOK.pad_id) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, lm.parameters()))
