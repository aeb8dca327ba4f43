"""nblib.grpo: groups laid out and rewarded right, no signal from equal groups, pass@k, and GRPO learning."""
import math

import pytest
import torch

from nblib import chat, grpo, llama

TOK = chat.ChatTokenizer()


def tiny(seed=0):
    torch.manual_seed(seed)
    return llama.Llama(llama.LlamaConfig(vocab_size=TOK.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16,
                                         eos_token_id=TOK.end_id)).eval()


def prompts(n=4):
    return [chat.render_prompt([{"role": "user", "content": "Hi" + "!" * i}], TOK) for i in range(n)]


def test_rollout_lays_out_groups_and_rewards_each_reply_of_its_prompt():
    model, cfg = tiny(), grpo.GRPOConfig(group_size=3, max_new_tokens=5)
    seen = []

    def reward_fn(i, completion):
        seen.append((i, completion))
        return float(i)                      # every reply of prompt i gets i: all groups equal inside

    groups = grpo.rollout(model, model, prompts(4), reward_fn, cfg, TOK.end_id, TOK.pad_id,
                          torch.Generator().manual_seed(0))
    assert [i for i, _ in seen] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert groups.rewards.tolist() == [0.0] * 3 + [1.0] * 3 + [2.0] * 3 + [3.0] * 3
    assert (groups.advantages == 0).all()    # no group has a reply better than another: no signal
    h = grpo.health(groups, 3)
    assert h["all_equal"] == 1.0 and h["reward"] == 1.5 and abs(h["kl"]) < 1e-6 and 1 <= h["length"] <= 5
    # the reply handed to reward_fn is what was sampled, the end token included when it ended
    for (_, completion), row_mask, row, done in zip(seen, groups.mask, groups.ids, groups.finished):
        assert completion == row[row_mask].tolist() and (completion[-1] == TOK.end_id) == bool(done)


def test_rollout_advantages_are_the_group_normalised_rewards():
    model = tiny()
    cfg = grpo.GRPOConfig(group_size=4, max_new_tokens=4)
    rewards = iter([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    groups = grpo.rollout(model, model, prompts(2), lambda i, c: next(rewards), cfg, TOK.end_id, TOK.pad_id)
    std = math.sqrt(3 / 16)
    assert groups.advantages.tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std,
                                                        0.25 / std, 0.25 / std, -0.75 / std, 0.25 / std], rel=1e-5)
    with pytest.raises(ValueError, match="returned None"):
        grpo.rollout(model, model, prompts(1), lambda i, c: None, cfg, TOK.end_id, TOK.pad_id)


def test_pass_at_k_hand_values():
    assert grpo.pass_at_k(8, 0, 8) == 0.0 and grpo.pass_at_k(8, 1, 8) == 1.0 and grpo.pass_at_k(8, 1, 1) == 0.125
    assert grpo.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)   # both draws wrong: C(2,2)/C(4,2) = 1/6
    assert grpo.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        grpo.pass_at_k(4, 1, 5)


@pytest.mark.parametrize("average", ["sequence", "token", "constant"])
def test_grpo_learns_to_say_a_rewarded_character(average):
    """Reward 1 for a reply that contains an 'a': from a few percent to most replies in a few steps."""
    a_id = TOK.encode("a")[0]
    policy = tiny(3)
    cfg = grpo.GRPOConfig(prompts_per_step=8, group_size=8, max_new_tokens=6, average=average, epochs=2,
                          minibatches=2, lr=3e-2)

    def draw(rng, n):
        return [rng.choice(prompts(4)) for _ in range(n)], lambda i, completion: float(a_id in completion)

    trained, log = grpo.run(policy, policy, draw, cfg, 25, TOK.end_id, TOK.pad_id, seed=0, desc="test")
    first, last = sum(h["reward"] for h in log[:3]) / 3, sum(h["reward"] for h in log[-3:]) / 3
    assert first < 0.4 and last > first + 0.4, [round(h["reward"], 2) for h in log]
    assert set(log[0]) >= {"reward", "all_equal", "kl", "length", "ended", "clip_fraction"}
    assert log[-1]["kl"] > log[0]["kl"] and not trained.training


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, torch.tensor(math.nan)])
def test_rollout_refuses_a_reward_that_is_not_finite(bad):
    """A nan reward would turn every weight to nan in one update: the rollout names the replies instead."""
    model, cfg = tiny(), grpo.GRPOConfig(group_size=4, max_new_tokens=3)
    with pytest.raises(ValueError, match=r"reward_fn returned (nan|inf|-inf) for 4 of 8 replies \(first: prompt 1, "
                                         r"reply \[[\d, ]+\]\); return a finite float"):
        grpo.rollout(model, model, prompts(2), lambda i, c: bad if i == 1 else 1.0, cfg, TOK.end_id, TOK.pad_id)
    with pytest.raises(ValueError, match="reward_fn returned 'yes' for prompt 0"):
        grpo.rollout(model, model, prompts(2), lambda i, c: "yes", cfg, TOK.end_id, TOK.pad_id)


def test_each_method_config_builds_its_train_config_in_one_place():
    """One idiom across post-training: a method's config holds its hyper-parameters, and
    ``cfg.train_config(...)`` turns them into the TrainConfig (no TrainConfig fields copied by hand)."""
    from nblib import dpo, ppo, reward, train

    g = grpo.GRPOConfig(epochs=2, minibatches=3, lr=5e-4, warmup_steps=4).train_config(10)
    assert (g.max_steps, g.lr, g.min_lr, g.warmup_steps, g.weight_decay, g.grad_clip, g.dtype) == \
        (60, 5e-4, 5e-4, 4, 0.0, 1.0, "float32")
    p = ppo.PPOConfig(epochs=4, minibatches=2).train_config(5)
    assert (p.max_steps, p.lr, p.min_lr, p.warmup_steps) == (40, 3e-4, 3e-4, 0)
    assert reward.RewardConfig(steps=300).train_config(1) == train.finetune_config(300, 1e-3, 32, seed=1)
    assert dpo.DPOConfig().train_config(300) == train.finetune_config(300, 3e-4, 32)
