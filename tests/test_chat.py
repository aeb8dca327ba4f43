"""The chat tokenizer, the template (render, mask, parse) and the masked SFT loss."""
import random

import pytest
import torch

from nblib import chat, sft, tasks
from nblib.llama import Llama, LlamaConfig

TOK = chat.ChatTokenizer()
CONV = [{"role": "user", "content": "What is 12+34?"}, {"role": "assistant", "content": "46"},
        {"role": "user", "content": "Reverse night."}, {"role": "assistant", "content": "thgin"}]


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_has_every_digit_and_printable_character_and_distinct_specials():
    for ch in "0123456789+-=?!.,:;' \nAZaz~":
        assert TOK.decode(TOK.encode(ch)) == ch
    ids = {TOK.pad_id, TOK.user_id, TOK.assistant_id, TOK.end_id}
    assert len(ids) == 4 and TOK.pad_id == 0 and TOK.pad_id != TOK.end_id
    assert TOK.vocab_size == 4 + 96
    assert all(TOK.is_special(i) for i in ids) and not TOK.is_special(TOK.encode("a")[0])


def test_special_token_names_in_text_stay_characters():
    ids = TOK.encode("<|end|>")
    assert len(ids) == 7 and TOK.end_id not in ids
    assert TOK.decode(ids) == "<|end|>"


def test_unknown_characters_are_a_clear_error():
    with pytest.raises(ValueError, match="does not know.*'é'"):
        TOK.encode("café")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TOK.decode([TOK.vocab_size])


def test_tokenizer_save_load_round_trip(tmp_path):
    path = TOK.save(tmp_path / "tok.json")
    back = chat.ChatTokenizer.load(path)
    assert back == TOK and back.encode("Hi 42") == TOK.encode("Hi 42") and back.end_id == TOK.end_id
    other = chat.ChatTokenizer(chars="ab\n")
    assert other != TOK and chat.ChatTokenizer.load(other.save(tmp_path / "o.json")) == other
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        chat.ChatTokenizer.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a chat tokenizer"):
        chat.ChatTokenizer.load(tmp_path / "other.json")


def test_tokenizer_refuses_a_vocabulary_without_the_chat_specials():
    with pytest.raises(ValueError, match="must include"):
        chat.ChatTokenizer(special_tokens=("<|pad|>", "<|user|>"))


# ---------------------------------------------------------------- template

def test_render_layout_and_mask():
    ids, mask = chat.render(CONV[:2], TOK)
    expected = [TOK.user_id] + TOK.encode("What is 12+34?") + [TOK.end_id, TOK.assistant_id] + TOK.encode("46") + [TOK.end_id]
    assert ids == expected
    # True exactly on the assistant's characters and its end token
    assert [i for i, m in enumerate(mask) if m] == [len(ids) - 3, len(ids) - 2, len(ids) - 1]
    assert TOK.decode(i for i, m in zip(ids, mask) if m) == "46<|end|>"


def test_show_mask_brackets_the_masked_runs():
    ids, mask = chat.render(CONV, TOK)
    assert chat.show_mask(ids, mask, TOK) == ("<|user|>What is 12+34?<|end|><|assistant|>[46<|end|>]"
                                              "<|user|>Reverse night.<|end|><|assistant|>[thgin<|end|>]")


def test_mask_covers_every_assistant_turn_and_nothing_else():
    ids, mask = chat.render(CONV, TOK)
    assert len(ids) == len(mask)
    assert TOK.decode(i for i, m in zip(ids, mask) if m) == "46<|end|>thgin<|end|>"
    assert not any(m for i, m in zip(ids, mask) if i in (TOK.user_id, TOK.assistant_id))


@pytest.mark.parametrize("seed", range(20))
def test_render_parse_round_trip(seed):
    rng = random.Random(seed)
    conv = []
    for _ in range(rng.randint(1, 4)):
        for role in ("user", "assistant"):
            conv.append({"role": role, "content": "".join(rng.choice(chat.CHARS) for _ in range(rng.randint(0, 12)))})
    ids, _ = chat.render(conv, TOK)
    assert chat.parse(ids, TOK) == conv
    assert chat.parse([TOK.pad_id] * 3 + ids + [TOK.pad_id] * 2, TOK) == conv  # left and right padding


def test_render_prompt_ends_with_the_assistant_header():
    prompt = chat.render_prompt(CONV[:1], TOK)
    assert prompt == chat.render(CONV[:1], TOK)[0] + [TOK.assistant_id]
    assert chat.parse(prompt, TOK, allow_unfinished=True) == CONV[:1] + [{"role": "assistant", "content": ""}]
    with pytest.raises(ValueError, match="ends with a user message"):
        chat.render_prompt(CONV[:2], TOK)


def test_parse_errors_say_what_is_wrong():
    ids, _ = chat.render(CONV[:2], TOK)
    with pytest.raises(ValueError, match="no <\\|end\\|>"):
        chat.parse(ids[:-1], TOK)
    with pytest.raises(ValueError, match="expected a role token"):
        chat.parse(TOK.encode("hi") + ids, TOK)
    with pytest.raises(ValueError, match="inside a user message"):
        chat.parse([TOK.user_id] + TOK.encode("a") + [TOK.assistant_id], TOK)
    with pytest.raises(ValueError, match="unknown role"):
        chat.render([{"role": "system", "content": "x"}], TOK)
    with pytest.raises(ValueError, match="'role' and 'content'"):
        chat.render([{"role": "user"}], TOK)


def test_reply_text_stops_at_special_tokens_and_newlines():
    ids = TOK.encode(" 46 \nmore") + [TOK.user_id] + TOK.encode("x")
    assert chat.reply_text(ids, TOK) == "46"
    assert chat.reply_text(TOK.encode("ab") + [TOK.end_id] + TOK.encode("cd"), TOK) == "ab"


# ---------------------------------------------------------------- the masked loss

def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))


def examples():
    return [chat.render(CONV[:2], TOK), chat.render(CONV, TOK), chat.render(CONV[2:], TOK)]


def test_collate_pads_right_with_mask_false():
    batch = sft.collate(examples(), TOK.pad_id)
    assert batch.ids.shape == batch.mask.shape == (3, len(examples()[1][0]))
    n = len(examples()[0][0])
    assert (batch.ids[0, n:] == TOK.pad_id).all() and not batch.mask[0, n:].any()


def test_sft_loss_is_the_mean_over_masked_targets():
    model = tiny_model()
    batch = sft.collate(examples(), TOK.pad_id)
    logits, _ = model(batch.ids)
    expected = []
    for b in range(3):
        for t in range(batch.ids.shape[1] - 1):
            if batch.mask[b, t + 1]:
                expected.append(torch.nn.functional.cross_entropy(logits[b, t], batch.ids[b, t + 1]))
    torch.testing.assert_close(sft.sft_loss(logits, batch.ids, batch.mask), torch.stack(expected).mean())


def test_padding_rows_and_positions_change_nothing():
    model = tiny_model().eval()
    ex = examples()
    batch = sft.collate(ex, TOK.pad_id)
    loss = sft.sft_loss(model(batch.ids)[0], batch.ids, batch.mask)
    # more padding on the right of every row
    wide = sft.collate([(ids + [TOK.pad_id] * 7, m + [False] * 7) for ids, m in ex], TOK.pad_id)
    torch.testing.assert_close(sft.sft_loss(model(wide.ids)[0], wide.ids, wide.mask), loss)
    # an extra row that is all padding
    extra = sft.collate(ex + [([TOK.pad_id] * 5, [False] * 5)], TOK.pad_id)
    torch.testing.assert_close(sft.sft_loss(model(extra.ids)[0], extra.ids, extra.mask), loss)
    # the model's own ignore_index=-100 loss on shifted targets agrees
    targets = batch.ids[:, 1:].masked_fill(~batch.mask[:, 1:], -100)
    torch.testing.assert_close(model(batch.ids[:, :-1], targets)[1], loss)


def test_tokens_outside_the_mask_get_no_gradient():
    model = tiny_model()
    batch = sft.collate(examples(), TOK.pad_id)
    logits, _ = model(batch.ids)
    logits.retain_grad()
    sft.sft_loss(logits, batch.ids, batch.mask).backward()
    grad_rows = logits.grad.abs().sum(-1)  # [B, T]
    predicts_masked = torch.zeros_like(batch.mask)
    predicts_masked[:, :-1] = batch.mask[:, 1:]
    assert (grad_rows[~predicts_masked] == 0).all()
    assert (grad_rows[predicts_masked] > 0).all()


def test_changing_user_tokens_leaves_the_loss_of_earlier_positions_alone():
    # a causal model: changing the last user message cannot change the loss of the first reply
    model = tiny_model().eval()
    a = sft.collate([chat.render(CONV[:2], TOK)], TOK.pad_id)
    ids, mask = chat.render(CONV[:2] + [{"role": "user", "content": "zzz"}], TOK)
    b = sft.collate([(ids, [m for m in mask])], TOK.pad_id)
    torch.testing.assert_close(sft.sft_loss(model(a.ids)[0], a.ids, a.mask),
                               sft.sft_loss(model(b.ids)[0], b.ids, b.mask))


def test_empty_mask_is_an_error_and_all_tokens_loss_counts_more():
    model = tiny_model()
    batch = sft.collate(examples(), TOK.pad_id)
    with pytest.raises(ValueError, match="no target token"):
        sft.sft_loss(model(batch.ids)[0], batch.ids, torch.zeros_like(batch.mask))
    _, masked = sft.loss_fn(model, batch)
    _, everything = sft.all_tokens_loss_fn(model, batch, TOK.pad_id)
    assert everything["tokens"] > masked["tokens"]


def test_two_turn_conversations_come_as_whole_batches():
    mix = tasks.Mixture([tasks.Addition()])
    get = sft.batches(mix, TOK, batch_size=5, block_size=64, two_turn_fraction=0.5)
    turns = set()
    for seed in range(20):
        batch = get("train", torch.Generator().manual_seed(seed))
        per_row = {row.count(TOK.user_id) for row in batch.ids.tolist()}
        assert len(per_row) == 1  # every row of a batch has the same number of turns
        turns |= per_row
    assert turns == {1, 2}


def test_batches_are_reproducible_and_fit_the_block():
    mix = tasks.Mixture([tasks.Addition(), tasks.Opposite()])
    get = sft.batches(mix, TOK, batch_size=6, block_size=40, two_turn_fraction=0.5)
    a = get("train", torch.Generator().manual_seed(3))
    b = get("train", torch.Generator().manual_seed(3))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask)
    assert a.ids.shape[0] == 6 and a.ids.shape[1] <= 40
    for row, m in zip(a.ids.tolist(), a.mask.tolist()):
        n = len(row) - row[::-1].index(TOK.end_id) if TOK.end_id in row else 0
        assert chat.render(chat.parse(row[:n], TOK), TOK) == (row[:n], m[:n])


# ---------------------------------------------------------------- chatting

class FakeRollout:
    def __init__(self, completions, finished):
        self._c, self.finished = completions, torch.tensor(finished)

    def completions(self):
        return self._c


def test_chat_runs_a_script_and_keeps_the_conversation(monkeypatch):
    from nblib import engine

    seen = []

    def fake_generate(model, prompts, max_new_tokens, **kw):
        seen.append(chat.parse(prompts[0], TOK, allow_unfinished=True))
        return FakeRollout([TOK.encode(f"reply {len(seen)}")], [True])

    monkeypatch.setattr(engine, "generate", fake_generate)
    printed = []
    conv = chat.chat(tiny_model(), TOK, script=["hello", "café", "again"], interactive=False, max_new_tokens=8,
                     print_fn=printed.append)
    assert [m["content"] for m in conv] == ["hello", "reply 1", "again", "reply 2"]
    assert any("cannot read" in line for line in printed)           # é is refused, the chat goes on
    assert [m["content"] for m in seen[1]] == ["hello", "reply 1", "again", ""]  # the history is in the prompt


def test_chat_interactive_reads_input_until_an_empty_line(monkeypatch):
    from nblib import engine

    monkeypatch.setattr(engine, "generate", lambda *a, **k: FakeRollout([TOK.encode("ok")], [False]))
    answers = iter(["hi", "/reset", "there", ""])
    printed = []
    conv = chat.chat(tiny_model(), TOK, interactive=True, input_fn=lambda _: next(answers), print_fn=printed.append,
                     max_new_tokens=8)
    assert [m["content"] for m in conv] == ["there", "ok"]
    assert any("did not end its turn" in line for line in printed)


def test_chat_without_a_script_where_no_one_can_type_is_an_error():
    assert not chat.can_ask()   # pytest's stdin is no terminal
    with pytest.raises(ValueError, match="script"):
        chat.chat(tiny_model(), TOK)


# ---------------------------------------------------------------- lesson 08's exercise checks

def test_render_check_passes_a_right_render_and_names_the_mask_mistakes():
    from nblib.checks import CheckFailed
    from nblib.checks import sft as checks

    def render(conversation, tok, header_in_mask=False, end_in_mask=True, user_in_mask=False):
        ids, mask = [], []
        for m in conversation:
            body = tok.encode(m["content"]) + [tok.end_id]
            mine = m["role"] == "assistant"
            ids += [tok.role_id(m["role"])] + body
            mask += [mine and header_in_mask] + [mine or user_in_mask] * (len(body) - 1) + [(mine and end_in_mask) or user_in_mask]
        return ids, mask

    checks.check_render(render)
    for wrong in (dict(header_in_mask=True), dict(end_in_mask=False), dict(user_in_mask=True)):
        with pytest.raises(CheckFailed, match=r"(?s)mask .* is off.*expected: .*got: "):
            checks.check_render(lambda c, t, w=wrong: render(c, t, **w))
    def no_end_after_user(conversation, tok):
        ids, mask = [], []
        for m in conversation:
            body = tok.encode(m["content"]) + ([tok.end_id] if m["role"] == "assistant" else [])
            ids += [tok.role_id(m["role"])] + body
            mask += [False] + [m["role"] == "assistant"] * len(body)
        return ids, mask

    with pytest.raises(CheckFailed, match="ids of the conversation"):
        checks.check_render(no_end_after_user)
    with pytest.raises(CheckFailed, match="tuple"):
        checks.check_render(lambda c, t: render(c, t)[0])


def test_sft_loss_check_passes_a_right_loss_and_names_common_mistakes():
    import torch.nn.functional as F

    from nblib.checks import CheckFailed
    from nblib.checks import sft as checks

    def loss(logits, ids, mask, shift_mask=True, divide_by_all=False, detach=False):
        per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        keep = (mask[:, 1:] if shift_mask else mask[:, :-1]).float()
        out = (per_token * keep).sum() / (keep.numel() if divide_by_all else keep.sum())
        return out.detach() if detach else out

    checks.check_sft_loss(loss)
    with pytest.raises(CheckFailed, match=r"mask of the \*input\* tokens"):
        checks.check_sft_loss(lambda *a: loss(*a, shift_mask=False))
    with pytest.raises(CheckFailed, match="divides by every position"):
        checks.check_sft_loss(lambda *a: loss(*a, divide_by_all=True))
    with pytest.raises(CheckFailed, match="gradients flow"):
        checks.check_sft_loss(lambda *a: loss(*a, detach=True))
    with pytest.raises(CheckFailed, match="predicts the \*next\* token"):  # no shift at all
        checks.check_sft_loss(lambda lg, ids, m: (F.cross_entropy(lg.transpose(1, 2), ids, reduction="none") * m).sum()
                              / m.sum())
    with pytest.raises(CheckFailed, match="per-conversation means"):
        checks.check_sft_loss(lambda lg, ids, m: torch.stack([loss(lg[b:b + 1], ids[b:b + 1], m[b:b + 1])
                                                              for b in range(len(ids)) if m[b, 1:].any()]).mean())
    with pytest.raises(CheckFailed, match="gradient"):  # the loss on every token leaks gradient outside the mask
        checks.check_sft_loss(lambda lg, ids, m: loss(lg, ids, m) if not lg.requires_grad else
                              loss(lg, ids, torch.ones_like(m)))
    with pytest.raises(CheckFailed, match="one number"):
        checks.check_sft_loss(lambda lg, ids, m: F.cross_entropy(lg[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"))


def test_accuracy_check_passes_a_right_eval_and_catches_wrong_ones():
    from nblib.checks import CheckFailed
    from nblib.checks import sft as checks

    checks.check_per_task_accuracy(lambda problems, replies: sft.accuracy_by_task(problems, replies))
    def graded(ps, rs, same=lambda r, a: r == a):
        marks = {}
        for p, r in zip(ps, rs):
            if p.answer is not None:
                marks.setdefault(p.task, []).append(same(r, p.answer))
        return {t: sum(m) / len(m) for t, m in marks.items()}

    with pytest.raises(CheckFailed, match="spaces and case"):  # no normalising
        checks.check_per_task_accuracy(graded)
    with pytest.raises(CheckFailed, match="spaces and case"):  # the ends stripped, the inside not
        checks.check_per_task_accuracy(lambda ps, rs: graded(ps, rs, lambda r, a: r.strip().lower() == a.lower()))
    with pytest.raises(CheckFailed, match="open request"):  # open requests graded too
        checks.check_per_task_accuracy(lambda ps, rs: {
            t: sum(tasks.normalize(r) == tasks.normalize(p.answer or "") for p, r in zip(ps, rs) if p.task == t)
            / sum(p.task == t for p in ps) for t in {p.task for p in ps}})
    with pytest.raises(CheckFailed, match="accuracy of .add."):  # one accuracy over all tasks
        checks.check_per_task_accuracy(lambda ps, rs: {t: sum(tasks.verify(p, r) for p, r in zip(ps, rs)
                                                              if p.verifiable) / len(ps)
                                                       for t in {p.task for p in ps if p.verifiable}})
    with pytest.raises(CheckFailed, match="dict"):
        checks.check_per_task_accuracy(lambda ps, rs: 0.5)
