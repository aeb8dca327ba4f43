"""nblib.dpo: log-probs of completions, the precomputed reference, ln 2 at step 0, padding, and DPO learning."""
import copy
import math

import pytest
import torch

from nblib import chat, dpo, llama, prefs, train

TOK = chat.ChatTokenizer()


def tiny(seed=0):
    torch.manual_seed(seed)
    return llama.Llama(llama.LlamaConfig(vocab_size=TOK.vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=16,
                                         eos_token_id=TOK.end_id))


def prompt(text):
    return chat.render_prompt([{"role": "user", "content": text}], TOK)


def reply(text):
    return TOK.encode(text) + [TOK.end_id]


def pair(question, chosen, rejected):
    return prefs.Pair(prompt(question), reply(chosen), reply(rejected), 1.0, 0.0)


PAIRS = [pair("Hi", "ab", "cde"), pair("Hello there", "xyz w", "q"), pair("Yo", "mm", "nnnn"), pair("Hey!", "k", "kk")]


def test_completion_logprobs_sum_the_completion_tokens_only():
    model = tiny()
    batch = prefs.collate_pairs(PAIRS[:1], TOK.pad_id)
    got = dpo.completion_logprobs(model, batch)
    for row, (p, c) in enumerate([(PAIRS[0].prompt, PAIRS[0].chosen), (PAIRS[0].prompt, PAIRS[0].rejected)]):
        ids = torch.tensor([p + c])
        logp = model(ids)[0].log_softmax(-1)[0]
        # token t is predicted at position t - 1; the completion starts at len(p)
        want = sum(logp[t - 1, ids[0, t]] for t in range(len(p), len(p) + len(c)))
        torch.testing.assert_close(got[row], want, atol=1e-5, rtol=0)
    assert got.requires_grad


def test_padding_changes_nothing():
    model = tiny()
    short = pair("Hi", "a", "b")
    alone = dpo.completion_logprobs(model, prefs.collate_pairs([short], TOK.pad_id))
    longer = pair("A much longer question, padded to nothing", "a long chosen reply", "and a long rejected one")
    together = dpo.completion_logprobs(model, prefs.collate_pairs([longer, short], TOK.pad_id))
    # rows: chosen (longer, short), then rejected (longer, short)
    torch.testing.assert_close(together[[1, 3]], alone, atol=1e-5, rtol=0)


def test_precomputed_reference_logprobs_equal_a_fresh_computation():
    ref = tiny(1)
    ref.train()
    pre = dpo.reference_logprobs(ref, PAIRS, TOK.pad_id, batch_size=3)  # two batches of different padding
    assert pre.shape == (len(PAIRS), 2) and not pre.requires_grad and ref.training  # its mode is restored
    with torch.no_grad():
        fresh = dpo.completion_logprobs(ref, prefs.collate_pairs(PAIRS, TOK.pad_id))
    torch.testing.assert_close(pre[:, 0], fresh[:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(pre[:, 1], fresh[4:], atol=1e-5, rtol=0)
    batch = dpo.collate(PAIRS[1:3], pre[1:3], TOK.pad_id)
    assert batch.n_pairs == 2 and batch.ref_logprobs.tolist() == [pre[1, 0], pre[2, 0], pre[1, 1], pre[2, 1]]


def test_loss_at_step_0_is_ln2_when_the_policy_is_the_reference():
    ref = tiny(2)
    policy = copy.deepcopy(ref)
    ref_lp = dpo.reference_logprobs(ref, PAIRS, TOK.pad_id)
    for beta in (0.1, 1.0):
        loss, metrics = dpo.make_loss_fn(dpo.DPOConfig(beta=beta))(policy, dpo.collate(PAIRS, ref_lp, TOK.pad_id))
        assert abs(loss.item() - math.log(2)) < 1e-6
        assert abs(metrics["reward_margin"].item()) < 1e-6
    assert dpo.implicit_reward_accuracy(policy, PAIRS, ref_lp, dpo.DPOConfig(), TOK.pad_id) == 0.0   # all ties


def test_a_few_steps_learn_an_easy_preference():
    """Chosen replies are all 'a', rejected all 'z': DPO ranks held-out pairs right after a few steps."""
    ref = tiny(3).eval()
    policy = copy.deepcopy(ref)
    questions = ["Hi", "Hello", "Say it", "Now?", "Go on", "Well", "Sing", "Yes or no"]
    train_pairs = [pair(q, "a" * (1 + i % 3), "z" * (1 + i % 3)) for i, q in enumerate(questions)]
    held_out = [pair("Another one", "aa", "zz"), pair("Last", "aaaa", "zzzz"), pair("Hm", "a", "zzz")]
    cfg = dpo.DPOConfig(beta=0.5)
    train_ref = dpo.reference_logprobs(ref, train_pairs, TOK.pad_id)
    held_ref = dpo.reference_logprobs(ref, held_out, TOK.pad_id)

    def margin(model):  # log pi(chosen) - log pi(rejected) on the held-out pairs
        r = dpo.implicit_rewards(model, held_out, held_ref, cfg, TOK.pad_id)
        return ((r[:, 0] - r[:, 1]) / cfg.beta + held_ref[:, 0] - held_ref[:, 1]).mean().item()

    before = margin(policy)
    trainer = train.Trainer(policy, train.TrainConfig(max_steps=15, lr=1e-2, min_lr=1e-2, warmup_steps=0,
                                                      weight_decay=0.0, dtype="float32"))
    step_loss = dpo.make_loss_fn(cfg)
    results = [trainer.step([dpo.collate(train_pairs, train_ref, TOK.pad_id)], step_loss) for _ in range(15)]
    assert results[0]["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert results[-1]["loss"].item() < 0.2 and results[-1]["reward_accuracy"].item() == 1.0
    assert dpo.implicit_reward_accuracy(policy, held_out, held_ref, cfg, TOK.pad_id) == 1.0
    assert margin(policy) > before + 5.0
    assert trainer.history.metrics["reward_accuracy"][-1] == 1.0


def test_errors_are_clear():
    model = tiny()
    ref_lp = dpo.reference_logprobs(model, PAIRS, TOK.pad_id)
    with pytest.raises(ValueError, match="at least one pair"):
        dpo.reference_logprobs(model, [], TOK.pad_id)
    with pytest.raises(ValueError, match="at least one pair"):
        dpo.collate([], ref_lp[:0], TOK.pad_id)
    with pytest.raises(ValueError, match=r"must be \[2, 2\]"):
        dpo.collate(PAIRS[:2], ref_lp, TOK.pad_id)
    with pytest.raises(ValueError, match="no pairs"):
        dpo.implicit_reward_accuracy(model, [], ref_lp[:0], dpo.DPOConfig(), TOK.pad_id)
    with pytest.raises(ValueError, match="rows of reference log-probs"):
        dpo.implicit_reward_accuracy(model, PAIRS[:2], ref_lp, dpo.DPOConfig(), TOK.pad_id)
    empty = prefs.PairBatch(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5, dtype=torch.bool),
                            torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty PairBatch"):
        dpo.completion_logprobs(model, empty)
    with pytest.raises(ValueError, match="empty PairBatch"):
        dpo.make_loss_fn(dpo.DPOConfig())(model, dpo.DPOBatch(empty, torch.zeros(0)))
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo.DPOConfig(beta=0.0)


def test_dpo_config_builds_the_reward_models_schedule():
    """One idiom: DPO's TrainConfig comes from its config, by the same function as the reward model's."""
    cfg = dpo.DPOConfig(beta=0.3, batch_size=8, lr=1e-3)
    assert cfg.train_config(100, seed=2) == train.finetune_config(100, 1e-3, 8, seed=2)
    t = cfg.train_config(100)
    assert (t.max_steps, t.lr, t.min_lr, t.warmup_steps, t.weight_decay, t.eval_interval, t.dtype) == \
        (100, 1e-3, 1e-4, 5, 0.0, 25, "float32")
