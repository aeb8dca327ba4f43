"""nblib.ppo: rollouts priced right (KL on every token, the score on the last), the update loop, and PPO learning."""
import copy

import torch

from nblib import chat, engine, llama, ppo, reward, rl, train

TOK = chat.ChatTokenizer()


def tiny(seed=0):
    torch.manual_seed(seed)
    return llama.Llama(llama.LlamaConfig(vocab_size=TOK.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16,
                                         eos_token_id=TOK.end_id))


def prompts(n=6):
    return [chat.render_prompt([{"role": "user", "content": "Hi" + "!" * i}], TOK) for i in range(n)]


def test_last_token_index_and_values_before_each_token():
    mask = torch.tensor([[False, True, True, False], [False, False, False, True]])
    assert ppo.last_token_index(mask).tolist() == [2, 3]
    vm = reward.ScalarHead(tiny())
    torch.nn.init.normal_(vm.head.weight)
    ids = torch.randint(4, TOK.vocab_size, (2, 5))
    v = ppo.token_values(vm, ids, torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(v[:, 1:], vm(ids)[:, :-1])
    assert (v[:, 0] == 0).all()


def test_rollout_prices_kl_on_every_token_and_the_score_on_the_last():
    policy = tiny(0)
    ref = tiny(1)   # another model: the KL price is not zero
    ac = ppo.ActorCritic(policy, reward.ScalarHead(copy.deepcopy(policy)))
    cfg = ppo.PPOConfig(max_new_tokens=6, kl_coef=0.3)
    scores = torch.arange(6.0)
    exp = ppo.rollout(ac, ref, lambda ids, attn, last: scores, prompts(), cfg, TOK.end_id, TOK.pad_id,
                      torch.Generator().manual_seed(0))
    last = ppo.last_token_index(exp.mask)
    price = -0.3 * (exp.logprobs - exp.ref_logprobs)
    expected = torch.where(exp.mask, price, torch.zeros_like(price))
    expected[torch.arange(6), last] += scores
    torch.testing.assert_close(exp.rewards, expected)
    # log-probs are the policy's own at temperature 1 (a teacher-forced pass), zero outside the completion
    _, again = engine.sequence_logprobs(policy, exp.ids, exp.mask, exp.attention_mask)
    torch.testing.assert_close(exp.logprobs, again)
    assert (exp.logprobs[~exp.mask] == 0).all() and (exp.advantages[~exp.mask] == 0).all()
    # advantages are whitened over the completion tokens; returns are GAE's
    assert abs(exp.advantages[exp.mask].mean().item()) < 1e-5
    adv, ret = rl.gae(exp.rewards, exp.values, exp.mask, cfg.gamma, cfg.lam)
    torch.testing.assert_close(exp.returns, ret)


def test_a_penalty_replaces_the_score_of_replies_that_never_end():
    policy = tiny(0)
    ac = ppo.ActorCritic(policy, reward.ScalarHead(copy.deepcopy(policy)))
    cfg = ppo.PPOConfig(max_new_tokens=2, kl_coef=0.0, no_end_penalty=-5.0)
    exp = ppo.rollout(ac, policy, lambda ids, attn, last: torch.ones(len(ids)), prompts(), cfg, TOK.end_id,
                      TOK.pad_id, torch.Generator().manual_seed(0))
    assert torch.equal(exp.scores, torch.where(exp.finished, 1.0, -5.0))


def test_update_takes_epochs_times_minibatches_steps():
    policy = tiny(0)
    ac = ppo.ActorCritic(policy, reward.ScalarHead(copy.deepcopy(policy)))
    cfg = ppo.PPOConfig(max_new_tokens=4, epochs=3, minibatches=2)
    exp = ppo.rollout(ac, copy.deepcopy(policy), lambda ids, attn, last: torch.zeros(len(ids)), prompts(), cfg,
                      TOK.end_id, TOK.pad_id, torch.Generator().manual_seed(0))
    trainer = train.Trainer(ac, train.TrainConfig(max_steps=6, lr=1e-3, warmup_steps=0, dtype="float32"))
    results = ppo.update(trainer, exp, cfg, torch.Generator().manual_seed(0))
    assert len(results) == 6 and trainer.steps_done == 6
    # the first minibatch of the first epoch starts at ratio 1: nothing clipped yet
    assert results[0]["clip_fraction"].item() == 0
    h = ppo.health(exp)
    assert set(h) == {"score", "kl", "length", "ended", "explained_variance"} and h["kl"] == 0


def test_ppo_learns_to_say_a_rewarded_character():
    """A reward for every 'a' in the reply: a few PPO iterations raise it well above the start."""
    torch.manual_seed(0)
    policy = tiny(3)
    ref = copy.deepcopy(policy).eval()
    a_id = TOK.encode("a")[0]
    ac = ppo.ActorCritic(policy, reward.ScalarHead(copy.deepcopy(policy)))
    cfg = ppo.PPOConfig(max_new_tokens=8, kl_coef=0.01, epochs=2, minibatches=2)
    iters = 12
    trainer = train.Trainer(ac, train.TrainConfig(max_steps=iters * 4, lr=3e-2, min_lr=3e-2, warmup_steps=0,
                                                  weight_decay=0.0, dtype="float32"))

    def score(ids, attn, last):
        return ((ids == a_id) & attn).float().sum(1)

    g = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(iters):
        exp = ppo.rollout(ac, ref, score, prompts(16), cfg, TOK.end_id, TOK.pad_id, g)
        seen.append(exp.scores.mean().item())
        ppo.update(trainer, exp, cfg, g)
    assert sum(seen[-3:]) / 3 > sum(seen[:3]) / 3 + 3.0, seen  # from ~0.1 to most of the 8 tokens


def test_run_is_reproducible_records_health_and_leaves_its_inputs_alone():
    policy = tiny(3).eval()
    rm = reward.ScalarHead(copy.deepcopy(policy)).eval()
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    start = [p.clone() for p in policy.parameters()] + [p.clone() for p in rm.parameters()]
    cfg = ppo.PPOConfig(prompts_per_iter=6, max_new_tokens=6, epochs=1, minibatches=2, lr=1e-2)

    def go(seed):
        return ppo.run(policy, rm, policy, prompts(), cfg, 3, TOK.end_id, TOK.pad_id, seed=seed,
                       extra=lambda exp: {"rows": float(exp.ids.shape[0])}, desc="test")

    trained, log = go(0)
    assert len(log) == 3 and all(h["rows"] == 6.0 for h in log)
    assert set(log[0]) == {"score", "kl", "length", "ended", "explained_variance", "rows", "entropy",
                           "clip_fraction", "approx_kl", "value_loss"}
    assert abs(log[0]["kl"]) < 1e-5 and log[-1]["kl"] != 0  # the policy starts as the reference, then moves
    assert go(0)[1] == log and go(1)[1] != log
    assert not trained.training and trained is not policy
    assert all(torch.equal(a, b) for a, b in zip(start, list(policy.parameters()) + list(rm.parameters())))


def test_mean_entropy_is_the_entropy_of_the_next_token_distributions():
    policy = tiny(1).eval()
    ac = ppo.ActorCritic(policy, reward.ScalarHead(copy.deepcopy(policy)))
    exp = ppo.rollout(ac, policy, lambda ids, attn, last: torch.zeros(len(last)), prompts(3),
                      ppo.PPOConfig(max_new_tokens=5), TOK.end_id, TOK.pad_id, torch.Generator().manual_seed(0))
    logits, _ = policy(exp.ids, attention_mask=exp.attention_mask)
    entropy = torch.distributions.Categorical(logits=logits[:, :-1]).entropy()   # position t - 1 predicts token t
    want = entropy[exp.mask[:, 1:]].mean().item()
    assert abs(ppo.mean_entropy(policy, exp) - want) < 1e-5
