"""Wrong answers to lessons 08-14 that the visible checks used to pass (or to name wrongly): each now
fails its check with a message that names the mistake and the fix. And an exercise not written yet
says so, without a traceback that shows the check's source."""
import linecache
import traceback

import pytest
import torch
import torch.nn.functional as F

from nblib import llama, profiling, rl, sft, tasks
from nblib.checks import CheckFailed, call_learner
from nblib.checks import pretrain as pretrain_checks
from nblib.checks import profiling as profiling_checks
from nblib.checks import rl as rl_checks
from nblib.checks import scaling as scaling_checks
from nblib.checks import sft as sft_checks

# ---------------------------------------------------------------------------- 08


def render(skip_empty=False, by_turn=False, unknown_as_user=False):
    """A learner's chat template with one planted mistake."""
    def render_fn(conversation, tok):
        ids, mask = [], []
        for turn, message in enumerate(conversation):
            role, content = message["role"], message["content"]
            if skip_empty and not content:
                continue
            known = role in ("user", "assistant") or not unknown_as_user
            body = tok.encode(content) + [tok.end_id]
            ids += [tok.role_id(role if known else "user")] + body
            mask += [False] + [turn % 2 == 1 if by_turn else role == "assistant"] * len(body)
        return ids, mask
    return render_fn


@pytest.mark.parametrize("mistake, phrase", [
    (render(skip_empty=True), r"ids of the conversation \(assistant / user / assistant / user\)"),
    (render(by_turn=True), r"the mask of \(assistant / user / assistant / user\) is off"),
    (render(unknown_as_user=True), r"'system'\) should raise ValueError"),
])
def test_render_mistakes_the_hidden_tests_caught_are_named(mistake, phrase):
    with pytest.raises(CheckFailed, match=phrase):
        sft_checks.check_render(mistake)


def accuracy_against_the_demonstration(problems, replies):
    right = {}
    for problem, reply in zip(problems, replies):
        if problem.answer is not None:
            right.setdefault(problem.task, []).append(tasks.normalize(reply) == tasks.normalize(problem.reply))
    return {task: sum(marks) / len(marks) for task, marks in right.items()}


def test_the_render_helper_is_right_without_its_mistakes():
    sft_checks.check_render(render())


def test_accuracy_against_the_teachers_demonstration_is_named():
    with pytest.raises(CheckFailed, match=r"against problem\.reply, the teacher's demonstration.*problem\.answer"):
        sft_checks.check_per_task_accuracy(accuracy_against_the_demonstration)
    sft_checks.check_per_task_accuracy(lambda problems, replies: sft.accuracy_by_task(problems, replies))


def sft_loss_writing_into_ids(logits, ids, mask):
    ids[~mask] = 0  # "ignore" the unmasked targets by overwriting the caller's batch
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    keep = mask[:, 1:].to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum()


def test_an_sft_loss_that_writes_into_its_inputs_is_named():
    with pytest.raises(CheckFailed, match=r"changed its input ids in place.*Build new tensors"):
        sft_checks.check_sft_loss(sft_loss_writing_into_ids)

# ---------------------------------------------------------------------------- 09 and 11


def gae_multiplying_by_the_mask(rewards, values, mask, gamma, lam):
    """Right on finite inputs; keeps nan and inf from outside the mask (0 * nan = nan)."""
    keep = mask.double()
    advantages = torch.zeros(mask.shape, dtype=torch.float64)
    next_value = next_advantage = torch.zeros(mask.shape[0], dtype=torch.float64)
    for t in reversed(range(mask.shape[1])):
        advantage = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_advantage
        advantages[:, t] = advantage * keep[:, t]
        next_value = values[:, t] * keep[:, t] + next_value * (1 - keep[:, t])
        next_advantage = advantage * keep[:, t] + next_advantage * (1 - keep[:, t])
    return advantages, (advantages + values) * keep


def gae_resetting_at_holes(rewards, values, mask, gamma, lam):
    """Right on contiguous masks; treats a column outside the mask as the episode's end."""
    advantages = torch.zeros(mask.shape, dtype=torch.float64)
    next_value = next_advantage = torch.zeros(mask.shape[0], dtype=torch.float64)
    for t in reversed(range(mask.shape[1])):
        inside = mask[:, t]
        advantage = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_advantage
        advantages[:, t] = torch.where(inside, advantage, 0.0)
        next_value = torch.where(inside, values[:, t].double(), 0.0)
        next_advantage = torch.where(inside, advantage, 0.0)
    return advantages, torch.where(mask, advantages + values, 0.0)


@pytest.mark.parametrize("mistake, phrase", [
    (gae_multiplying_by_the_mask, r"nan or inf reached .*Multiplying by the mask keeps them.*torch\.where"),
    (gae_resetting_at_holes, r"restart after a hole.*no step, not the end"),
])
def test_gae_mistakes_the_hidden_tests_caught_are_named(mistake, phrase):
    with pytest.raises(CheckFailed, match=phrase):
        rl_checks.check_gae(mistake)


def ppo_loss(select_first: bool, select_after: bool):
    def loss_fn(logprobs, old_logprobs, advantages, mask, clip):
        if select_first:
            logprobs, old_logprobs, advantages = (torch.where(mask, x, 0.0)
                                                  for x in (logprobs, old_logprobs, advantages))
        ratio = (logprobs - old_logprobs).exp()
        per_token = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
        if select_after:
            return torch.where(mask, per_token, 0.0).sum() / mask.sum()
        return (per_token * mask).sum() / mask.sum()
    return loss_fn


def test_ppo_losses_letting_junk_outside_the_mask_in_are_named():
    with pytest.raises(CheckFailed, match=r"the loss is nan.*torch\.where\(mask, x, 0\) before any exp, never x \*"):
        rl_checks.check_ppo_policy_loss(ppo_loss(select_first=False, select_after=False))
    with pytest.raises(CheckFailed, match=r"gradient w\.r\.t\. logprobs holds nan.*\*before\* the exp"):
        rl_checks.check_ppo_policy_loss(ppo_loss(select_first=False, select_after=True))
    rl_checks.check_ppo_policy_loss(ppo_loss(select_first=True, select_after=False))


def test_the_batchs_std_is_told_to_use_each_groups_own_std():
    def by_the_batch_std(rewards, group_size, scale=True):
        groups = rewards.float().view(-1, group_size)
        centred = groups - groups.mean(dim=1, keepdim=True)
        return (centred / (rewards.float().std(correction=0) + 1e-6) if scale else centred).view(-1)

    with pytest.raises(CheckFailed, match=r"divides by the std of the whole batch: scale each group by its own std"):
        rl_checks.check_group_advantages(by_the_batch_std)

# ---------------------------------------------------------------------------- 12


def flops(config, seq_len, hidden=None, embedding=False):
    d, kv = config.n_embd, config.n_kv_heads * config.head_dim
    h = hidden(config) if hidden else config.ffn_hidden
    weights = config.n_layer * (2 * d * d + 2 * d * kv + 3 * d * h) + d * config.vocab_size
    return 6 * (weights + embedding * config.vocab_size * d) + 12 * config.n_layer * d * seq_len


def test_counting_the_embedding_table_is_named_as_such():
    with pytest.raises(CheckFailed, match=r"over by exactly the embedding table's .*a lookup, not a matmul"):
        scaling_checks.check_flops_per_token(lambda c, T: flops(c, T, embedding=True))


def test_an_mlp_width_not_read_from_the_config_fails():
    with pytest.raises(CheckFailed, match=r"ffn_hidden=72"):
        scaling_checks.check_flops_per_token(lambda c, T: flops(c, T, hidden=lambda c: llama.swiglu_hidden(c.n_embd)))

# ---------------------------------------------------------------------------- 13


def activation_bytes(config, B, T, lse=True, rsqrt=True, ids_bytes=8):
    """The lesson's count, with one of its terms left out on request."""
    L, d, h, H, V = config.n_layer, config.n_embd, config.ffn_hidden, config.n_head, config.vocab_size
    per_layer = 10 * B * T * d + 4 * B * T * h + 2 * B * T * rsqrt + B * H * T * lse
    once = 3 * B * T * d + B * T * rsqrt + B * T * V + 2 * T * config.head_dim
    return 4 * (L * per_layer + once) + ids_bytes * 2 * B * T


@pytest.mark.parametrize("left_out, phrase", [
    (dict(lse=False), "short of exactly attention's log-sum-exp"),
    (dict(rsqrt=False), "short of exactly the norms' rsqrt"),
    (dict(ids_bytes=0), "short of exactly the int64 token ids and targets"),
    (dict(ids_bytes=4), "short of exactly 8 \\* B \\* T bytes.*counted at 4 bytes where int64 has 8"),
])
def test_activation_bytes_is_exact_and_names_the_missing_term(left_out, phrase):
    with pytest.raises(CheckFailed, match=phrase):
        profiling_checks.check_activation_bytes(lambda c, B, T: activation_bytes(c, B, T, **left_out))
    profiling_checks.check_activation_bytes(lambda c, B, T: activation_bytes(c, B, T))
    # torch's own count has 4 bytes more (a 0-d float32 of the loss): a learner who counts it is right too
    profiling_checks.check_activation_bytes(lambda c, B, T: activation_bytes(c, B, T) + 4)


def test_a_bf16_step_returning_an_undetached_loss_is_named():
    def undetached(model, opt, x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, y)[1]
        loss.backward(), opt.step(), opt.zero_grad()
        return loss  # right in every way but this: not loss.detach()

    with pytest.raises(CheckFailed, match=r"still requires grad.*return loss\.detach\(\)"):
        profiling_checks.check_bf16_step(undetached)

# ---------------------------------------------------------------------------- exercises not written yet


def measured_mfu(model, step_seconds, batch_size, block_size, peak_flops):
    """MFU of a training step that took `step_seconds` on a batch of batch_size x block_size tokens.

    model.flops_per_token(block_size): training FLOPs per token (forward + backward).
    """
    raise NotImplementedError("Exercise 13.mfu: your code goes here (replace this line).")


def run_mfu(train_rows, flops_per_token, peak_per_device, devices):
    """The steady MFU of a run from its log's train rows."""
    raise NotImplementedError("Exercise 14.run_mfu: your code goes here (replace this line).")


@pytest.mark.parametrize("check, stub, exercise", [
    (profiling_checks.check_mfu, measured_mfu, "13.mfu"),
    (pretrain_checks.check_run_mfu, run_mfu, "14.run_mfu"),
])
def test_an_empty_exercise_says_so_and_its_traceback_shows_no_formula(check, stub, exercise):
    with pytest.raises(NotImplementedError) as err:
        check(stub)
    first_line = stub.__doc__.splitlines()[0]
    assert str(err.value).startswith(f"{stub.__name__} is not written yet: Exercise {exercise}: your code goes here")
    assert str(err.value).endswith(f"The exercise: {first_line}")
    frames = traceback.extract_tb(err.value.__traceback__)
    assert frames[-1].name == stub.__name__  # the traceback ends in the learner's own line
    for frame in frames:
        if "nblib" not in frame.filename:
            continue
        # IPython prints two lines either side of each frame's line; the token count B * T is in every MFU formula
        shown = [linecache.getline(frame.filename, n) for n in range(frame.lineno - 2, frame.lineno + 3)]
        assert not any("B * T" in line or "peak * n" in line for line in shown), (frame, shown)
    hidden = [frame.f_code.co_name for frame, _ in traceback.walk_tb(err.value.__traceback__)
              if frame.f_locals.get("__tracebackhide__")]
    assert hidden == ["call_learner"]  # IPython leaves it out: the check's call, then the learner's line


def test_an_ellipsis_left_in_the_skeleton_is_not_written_yet():
    def half_done(x):
        """Double x."""
        y = ...
        return y * 2

    with pytest.raises(NotImplementedError, match=r"half_done is not written yet: replace each `\.\.\.`.*Double x"):
        call_learner("half_done", half_done, 3)
    with pytest.raises(NotImplementedError, match="returns `...`"):
        call_learner("stub", lambda x: ..., 3)


def test_a_crash_shows_the_learners_line_and_keeps_its_cause():
    def crashes(x):
        return x / 0

    with pytest.raises(CheckFailed, match="raised ZeroDivisionError") as err:
        call_learner("crashes", crashes, 1)
    assert isinstance(err.value.__cause__, ZeroDivisionError)
    assert traceback.extract_tb(err.value.__traceback__)[-1].name == "crashes"


def test_the_course_answers_pass_the_stricter_checks():
    rl_checks.check_gae(lambda r, v, m, gamma, lam: rl.gae(r, v, m, gamma, lam))
    rl_checks.check_ppo_policy_loss(lambda lp, old, a, m, clip: rl.ppo_policy_loss(lp, old, a, m, clip))
    rl_checks.check_group_advantages(lambda r, g, scale=True: rl.group_advantages(r, g, scale=scale))
    sft_checks.check_sft_loss(lambda logits, ids, mask: sft.sft_loss(logits, ids, mask))
    profiling_checks.check_activation_bytes(lambda c, B, T: profiling.activation_bytes(c, B, T))
    scaling_checks.check_flops_per_token(lambda c, T: flops(c, T))


def test_answers_computed_in_float32_for_float64_inputs_are_named():
    """The hidden tests of 10.reply_logprobs and 11.grpo_loss compare float64 results to 1e-9."""
    def reply_logprobs_in_float32(logits, ids, mask):
        taken = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return torch.where(mask[:, 1:], taken, 0.0).sum(-1)

    with pytest.raises(CheckFailed, match=r"the inputs are torch\.float64, the result is torch\.float32"):
        rl_checks.check_reply_logprobs(reply_logprobs_in_float32)

    def grpo_loss_in_float32(logprobs, old, ref, advantages, mask, clip, kl_coef):
        return rl.grpo_loss(*(x.float() for x in (logprobs, old, ref, advantages)), mask, clip, kl_coef,
                            average="sequence")[0]

    with pytest.raises(CheckFailed, match=r"the inputs are torch\.float64, the result is torch\.float32"):
        rl_checks.check_grpo_loss(grpo_loss_in_float32)
