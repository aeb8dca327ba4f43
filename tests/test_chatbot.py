"""Lesson 15: the chat tokenizer in GPT-2's padded rows, conversations as masked rows, the evals against
hand-computed scores, the GSM8K reward, the packaged slices, and the whole --tiny chain
(pretrain -> mid-training -> SFT -> RL -> evals -> report card) with exact resume."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nblib import chat, chatdata, checkpoint, evals, pretrain, report, stages
from nblib import chat_rl
from nblib.chatbpe import chat_bpe
from nblib.checks import CheckFailed
from nblib.checks import chatbot as checks
from nblib.runlog import log_rows, read_log


# ---------------------------------------------------------------------------- the tokenizer

def test_chat_tokens_live_in_the_padded_rows():
    tok = chat_bpe()
    assert [tok.pad_id, tok.user_id, tok.assistant_id, tok.end_id] == [50257, 50258, 50259, 50260]
    assert tok.vocab_size == 50261 <= 50304  # lesson 14's padded vocabulary holds them
    ids, mask = chat.render([{"role": "user", "content": "Hi <|end|>"}, {"role": "assistant", "content": "Hello!"}], tok)
    assert ids.count(tok.end_id) == 2  # typing "<|end|>" is text, not the token
    assert chat.parse(ids, tok)[0]["content"] == "Hi <|end|>"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<|end|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([50300])


def test_chat_rows_put_the_loss_on_the_assistant_only():
    tok = chat_bpe()
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    rows = stages.ChatRows([conv], tok, seq_len=16)
    x, y = rows.batch([0])
    ids, mask = chat.render(conv, tok)
    n = len(ids) - 1
    assert x[0, :n].tolist() == ids[:-1] and (x[0, n:] == tok.pad_id).all()
    targets = [t for t in y[0].tolist() if t != stages.IGNORE]
    assert tok.decode(targets) == "4<|end|>"  # the answer and the end of the turn, nothing else
    # a conversation cut before the assistant speaks has nothing to learn and is left out
    long = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]
    assert stages.ChatRows([conv, long], tok, seq_len=16).n_windows == 1
    with pytest.raises(ValueError, match="nothing to train"):
        stages.ChatRows([long], tok, seq_len=16)


def test_chat_rows_order_depends_only_on_the_row():
    tok = chat_bpe()
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(7)]
    a, b = stages.ChatRows(convs, tok, 12, seed=3), stages.ChatRows(convs, tok, 12, seed=3)
    assert torch.equal(a.batch(range(20, 26))[0], b.batch(range(20, 26))[0])
    first_pass = {tuple(a.example(k)[0]) for k in range(7)}
    assert len(first_pass) == 7  # a pass is a permutation: every conversation once


# ---------------------------------------------------------------------------- evals against hand values

class TableLM(nn.Module):
    """A bigram 'model' with a known table: log p(next | prev) = log_softmax(table[prev]), so scores can be
    computed by hand. It speaks the model interface the engine uses."""

    def __init__(self, table: torch.Tensor, block_size: int = 64):
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = type("Config", (), {"block_size": block_size})()

    def forward(self, idx, targets=None, cache=None, *, attention_mask=None, reduction="mean", **_):
        logits = self.table[idx]
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction=reduction)
        return logits, loss


class Chars:
    def encode(self, text):
        return [ord(c) for c in text]


def _table(seed=0):
    return torch.randn(128, 128, generator=torch.Generator().manual_seed(seed))


def _by_hand(table, context, continuation):
    logp = table.log_softmax(-1)
    prev = [*context, *continuation]
    return sum(logp[prev[len(context) + i - 1], t].item() for i, t in enumerate(continuation))


def test_continuation_logprobs_by_hand():
    table = _table()
    model, tok = TableLM(table), Chars()
    ctx, conts = tok.encode("abc"), [tok.encode(" d"), tok.encode(" efg"), tok.encode("x")]
    got = evals.continuation_logprobs(model, ctx, conts)
    for g, cont in zip(got, conts):
        assert math.isclose(g, _by_hand(table, ctx, cont), rel_tol=1e-5)
    # a row longer than the context keeps the continuation and the end of the context
    short = TableLM(table, block_size=4)
    assert math.isclose(evals.continuation_logprobs(short, tok.encode("zzabc"), [tok.encode("de")])[0],
                        _by_hand(table, tok.encode("bc"), tok.encode("de")), rel_tol=1e-5)


def test_hellaswag_acc_and_acc_norm_by_hand():
    table = _table(1)
    model, tok = TableLM(table), Chars()
    items = [{"ctx": "The cat", "endings": ["sat.", "ran far away quickly.", "is", "ate a fish."], "label": i}
             for i in range(4)] + [{"ctx": "A man", "endings": ["walks.", "x", "sings a song.", "no"], "label": 2}]
    right = right_norm = 0
    for item in items:
        ends = [" " + e for e in item["endings"]]
        sums = [_by_hand(table, tok.encode(item["ctx"]), tok.encode(e)) for e in ends]
        norms = [s / len(e.encode()) for s, e in zip(sums, ends)]
        right += max(range(4), key=lambda i: sums[i]) == item["label"]
        right_norm += max(range(4), key=lambda i: norms[i]) == item["label"]
    result = evals.hellaswag(model, tok, items)
    assert result["acc"] == right / 5 and result["acc_norm"] == right_norm / 5


def test_centred_accuracy_and_core_like():
    assert evals.centred(0.25, 0.25) == 0.0 and evals.centred(1.0, 0.25) == 1.0
    assert math.isclose(evals.centred(0.625, 0.25), 0.5)


def test_letter_choice_reads_the_letter_logits_after_the_assistant_token():
    tok, model = chat_bpe(), checks.tiny_chat_model(5)
    question, choices = "Pick one.", ["x", "y", "z"]
    prompt = chat.render_prompt([{"role": "user", "content": chatdata.mc_question(question, choices)}], tok)
    assert prompt[-1] == tok.assistant_id
    letters = [tok.encode(c)[0] for c in "ABC"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0][0, -1]
    assert evals.letter_choice(model, tok, question, choices) == int(logits[letters].argmax())


REWARDS = [("so 5 + 7 = 12\n#### 12", "#### 12", 1.0), ("#### 1,200", "x\n#### 1200", 1.0), ("12", "#### 12", 0.0),
           ("#### 13", "#### 12", 0.0), ("#### 12.0 pens", "#### 12", 1.0), ("#### 2 #### 3", "#### 3", 1.0)]


@pytest.mark.parametrize("reply,answer,want", REWARDS)
def test_gsm8k_reward(reply, answer, want):
    assert evals.gsm8k_reward(reply, answer) == want


def test_gsm8k_target_and_solution_format():
    assert chatdata.gsm8k_target("48/2 = <<48/2=24>>24\n#### 1,080") == "1080"
    assert chatdata.gsm8k_solution("48/2 = <<48/2=24>>24\n#### 24") == "48/2 = 24\n#### 24"
    with pytest.raises(ValueError, match="####"):
        chatdata.gsm8k_target("no marker")


def test_gsm8k_eval_counts_what_the_reward_says():
    tok, model = chat_bpe(), checks.tiny_chat_model(2)
    items = [{"question": f"{a} + 1?", "answer": f"#### {a + 1}"} for a in range(3)]
    seen = []

    def reward(reply, answer):
        seen.append(answer)
        return 1.0 if answer == "#### 2" else 0.0   # problem 1 right, every time
    result = evals.gsm8k(model, tok, items, max_new_tokens=4, k=3, reward=reward)
    assert result["pass@1"] == pytest.approx(1 / 3) and result["pass@3"] == pytest.approx(1 / 3)
    assert len(seen) == 3 + 3 * 3   # one greedy reply and k samples per problem
    assert evals.gsm8k(model, tok, items, max_new_tokens=4, k=2, reward=lambda r, a: 1.0)["pass@2"] == 1.0


# ---------------------------------------------------------------------------- the exercises' checks

def _reward_solution(reply, answer):
    """A learner's answer to 15.gsm8k_reward (the lesson's own solution is tested with the notebook)."""
    tail = reply.rpartition("####")[2] if "####" in reply else ""
    found = re.search(r"-?[0-9][0-9,]*(\.[0-9]+)?", tail)
    return float(found is not None and float(found.group().replace(",", "")) == float(chatdata.gsm8k_target(answer)))


def test_checks_pass_an_answer_and_refuse_the_course_functions():
    checks.check_gsm8k_reward(_reward_solution)
    with pytest.raises(CheckFailed, match="course's own"):
        checks.check_gsm8k_reward(evals.gsm8k_reward)
    with pytest.raises(CheckFailed, match="course's own"):
        checks.check_gsm8k_reward(lambda reply, answer: evals.gsm8k_reward(reply, answer))


@pytest.mark.parametrize("mistake", list(checks._letter_variants()))
def test_letter_choice_check_names_each_mistake(mistake):
    fn = checks._letter_variants()[mistake]
    with pytest.raises(CheckFailed) as err:
        checks.check_letter_choice(lambda *a: fn(*a))
    assert "differ" in str(err.value)


WRONG_REWARDS = {
    "last number anywhere": lambda r, a: float(bool(re.findall(r"-?\d+", r)) and
                                               float(re.findall(r"-?\d+", r)[-1]) == float(chatdata.gsm8k_target(a))),
    "string equality": lambda r, a: float("####" in r and r.split("####")[-1].strip() == a.split("####")[-1].strip()),
    "first marker": lambda r, a: evals.gsm8k_reward(r.split("####", 2)[0] + "####" + r.split("####")[1], a)
    if r.count("####") > 1 else evals.gsm8k_reward(r, a),
    "returns a bool": lambda r, a: "####" in r and r.endswith(a.split("####")[-1].strip()) and None,
}


@pytest.mark.parametrize("mistake", list(WRONG_REWARDS))
def test_gsm8k_reward_check_catches_mistakes(mistake):
    with pytest.raises(CheckFailed):
        checks.check_gsm8k_reward(WRONG_REWARDS[mistake])


def test_write_reward_round_trips(tmp_path):
    def my_reward(reply, answer):
        return 1.0 if reply.strip().endswith(chatdata.gsm8k_target(answer)) else 0.0
    path = checks.write_reward(my_reward, tmp_path / "reward.py")
    fn = chat_rl.load_reward(str(path))
    assert fn("#### 5", "#### 5") == 1.0 and fn("#### 4", "#### 5") == 0.0


# ---------------------------------------------------------------------------- the sets

def test_practice_sets_have_the_real_sets_formats():
    for name in chatdata.SETS:
        assert len(chatdata.load(name)) == chatdata.PRACTICE_SIZE and chatdata.load(name) == chatdata.load(name)
    assert all(evals.NUMBER.search(chatdata.gsm8k_target(it["answer"])) for it in chatdata.load("gsm8k-test"))
    for it in chatdata.load("arc-easy-test") + chatdata.load("arc-challenge-test"):
        assert it["answer"] in it["labels"] and len(it["labels"]) == len(it["choices"])
    assert all(0 <= it["answer"] < len(it["choices"]) for it in chatdata.load("mmlu-test"))
    for it in chatdata.load("hellaswag-val"):
        assert len(it["endings"]) == 4 and 0 <= it["label"] < 4 and len(set(it["endings"])) == 4
    for i, it in enumerate(chatdata.load("conversations")):
        chatdata.check_conversation(it, f"item {i}")
    # a word problem's answer is right
    for it in chatdata.load("gsm8k-train")[:50]:
        expr = re.search(r"(\d+) ([+-]) (\d+) = (\d+)", it["answer"]).groups()
        a, op, b, c = int(expr[0]), expr[1], int(expr[2]), int(expr[3])
        assert (a + b if op == "+" else a - b) == c == int(chatdata.gsm8k_target(it["answer"]))


def test_a_missing_or_damaged_prepared_set_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare the sets first"):
        chatdata.load("gsm8k-test", data_dir=tmp_path)
    (tmp_path / "gsm8k-test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\nnot json\n')
    with pytest.raises(ValueError, match="gsm8k-test.jsonl:2 is not valid JSON"):
        chatdata.load("gsm8k-test", data_dir=tmp_path)
    (tmp_path / "gsm8k-test.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        chatdata.load("gsm8k-test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown set"):
        chatdata.load("gsm9k")
    with pytest.raises(ValueError, match="message 0"):
        chatdata.check_conversation({"messages": [{"role": "system", "content": "x"}]}, "line 1")


def test_a_prepared_set_is_read_as_written(tmp_path):
    items = [{"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}]
    (tmp_path / "gsm8k-test.jsonl").write_text(json.dumps(items[0]) + "\n")
    assert chatdata.load("gsm8k-test", data_dir=tmp_path) == items


def test_hub_rows_become_the_course_formats():
    arc = chatdata._from_hub("arc-easy-test", {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                                               "answerKey": "B"})
    assert chatdata.arc_item(arc) == ("Q?", ["a", "b"], 1)
    mmlu = chatdata._from_hub("mmlu-test", {"subject": "law", "question": "Q?", "choices": ["a", "b", "c", "d"],
                                            "answer": 3})
    assert chatdata.mmlu_item(mmlu) == ("Q?", ["a", "b", "c", "d"], 3)
    hs = chatdata._from_hub("hellaswag-val", {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": "2"})
    assert hs["label"] == 2
    talk = chatdata._from_hub("conversations", {"messages": [{"role": "system", "content": "s"},
                                                             {"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "hello"}]})
    assert [m["role"] for m in talk["messages"]] == ["user", "assistant"]


def test_prepare_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match="pip install datasets"):
        chatdata.prepare(tmp_path)


def test_mixtures_hold_no_test_items_and_the_identity():
    ident = chatdata.identity_conversations("Nib", "a learner")
    train_text = json.dumps(chatdata.mixture("mid", "train", generated=400))
    for item in chatdata.load("gsm8k-test"):
        assert item["question"].strip() not in train_text
    for item in chatdata.load("arc-easy-test"):
        assert json.dumps(chatdata.mc_question(item["question"], item["choices"]))[1:-1] not in train_text
    assert len(chatdata.mixture("sft", "val", generated=10)) < len(chatdata.mixture("sft", "train", generated=10))
    assert ident[0]["messages"][1]["content"].startswith("I am Nib")


# ---------------------------------------------------------------------------- the stages, end to end

def _pretrain(out):
    pretrain.main(["--preset", "chat-cpu", "--tiny", "--out", str(out)])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("chain") / "base"
    _pretrain(out)
    return out


@pytest.mark.slow
def test_a_character_model_is_refused(tmp_path):
    pretrain.main(["--preset", "shakespeare-char", "--tiny", "--out", str(tmp_path / "char")])
    with pytest.raises(ValueError, match="GPT-2 tokens"):
        stages.main("mid", ["--preset", "cpu", "--tiny", "--from", str(tmp_path / "char"), "--out", str(tmp_path / "m")])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        stages.main("mid", ["--preset", "cpu", "--tiny", "--from", str(tmp_path / "none"), "--out", str(tmp_path / "m")])


@pytest.mark.slow
def test_a_stage_resumes_to_the_same_losses(base_run, tmp_path):
    args = ["--preset", "cpu", "--tiny", "--from", str(base_run)]
    stages.main("mid", [*args, "--out", str(tmp_path / "whole")])
    assert not stages.main("mid", [*args, "--out", str(tmp_path / "halves"), "--stop-at", "2"])["finished"]
    stages.main("mid", [*args, "--out", str(tmp_path / "halves"), "--resume"])
    losses = lambda d: [r["loss"] for r in log_rows(read_log(d), "train")]  # noqa: E731
    assert losses(tmp_path / "whole") == losses(tmp_path / "halves")
    assert len(losses(tmp_path / "whole")) == 4
    with pytest.raises(pretrain.UsageError, match="holds a run"):
        stages.main("mid", [*args, "--out", str(tmp_path / "whole")])


@pytest.mark.slow
def test_sft_with_an_identity_then_rl_resumed_exactly_then_the_report_card(base_run, tmp_path):
    """The chain after mid-training (which lesson 15 runs in CI, and test_a_stage_resumes tests)."""
    ident = tmp_path / "me.jsonl"
    ident.write_text("".join(json.dumps(c) + "\n" for c in chatdata.identity_conversations("Nib", "a learner")))
    stages.main("sft", ["--preset", "cpu", "--tiny", "--from", str(base_run), "--out", str(tmp_path / "sft"),
                        "--identity", str(ident)])
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert config["data"]["identity"] == str(ident)
    args = ["--preset", "cpu", "--tiny", "--from", str(tmp_path / "sft")]
    summary = chat_rl.main([*args, "--out", str(tmp_path / "whole")])
    assert summary["finished"] and summary["step"] == 3
    rows = log_rows(read_log(tmp_path / "whole"), "rl")
    assert len(rows) == 3 and all(0 <= r["reward"] <= 1 for r in rows)
    assert not chat_rl.main([*args, "--out", str(tmp_path / "halves"), "--stop-at", "2"])["finished"]
    chat_rl.main([*args, "--out", str(tmp_path / "halves"), "--resume"])
    rewards = lambda d: [(r["reward"], r["loss"]) for r in log_rows(read_log(d), "rl")]  # noqa: E731
    assert rewards(tmp_path / "whole") == rewards(tmp_path / "halves")
    report.evaluate_run(base_run, "base", limit=4)
    report.evaluate_run(tmp_path / "sft", "chat", limit=4, gsm8k_k=2)
    card = report.card({"base": base_run, "sft": tmp_path / "sft", "rl": tmp_path / "whole"}, tmp_path / "card")
    assert "| sft |" in card["markdown"] and (tmp_path / "card" / "report.json").is_file()
    saved = json.loads((tmp_path / "card" / "report.json").read_text())
    assert [r["stage"] for r in saved["rows"]] == ["base", "sft", "rl"]
    assert 0 <= saved["rows"][0]["evals"]["hellaswag"]["acc_norm"] <= 1


@pytest.mark.slow
def test_load_run_gives_a_chat_model(base_run):
    model, tok = stages.load_run(base_run)
    assert model.config.vocab_size >= tok.vocab_size and not model.training
    (base_run / "broken").mkdir(exist_ok=True)
    (base_run / "broken" / "ckpt.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        stages.load_run(base_run / "broken")
    assert checkpoint.read_metadata(base_run / "ckpt.safetensors")["step"] == 8


def test_prepare_writes_each_set_once_with_its_sources(tmp_path, monkeypatch):
    import sys
    import types
    rows = {"openai/gsm8k": [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "#### 4"}]}
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name not in rows:
            raise ConnectionError("offline")
        return rows[name]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert chatdata.prepare(tmp_path, ["gsm8k-test"]) == {"gsm8k-test": 2}
    assert chatdata.load("gsm8k-test", tmp_path) == rows["openai/gsm8k"]
    assert "MIT" in (tmp_path / "SOURCES.md").read_text()
    assert chatdata.prepare(tmp_path, ["gsm8k-test"]) == {}      # kept, not downloaded again
    with pytest.raises(RuntimeError, match="needs the network"):
        chatdata.prepare(tmp_path, ["mmlu-test"])
    assert not (tmp_path / "mmlu-test.jsonl").exists()


def test_the_base_evals_run_on_a_gpt2_family_model_too():
    """A Hugging Face GPT-2 loaded with nblib.gpt.from_hf_dir is scored by the same code (lesson 15's command
    for HF's gpt2 on the real HellaSwag); here a random tiny one, checked against its own forward pass."""
    from nblib import gpt
    from nblib.tokenizers import gpt2_tokenizer
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    tok = gpt2_tokenizer()
    ctx, cont = tok.encode("The cat sat"), tok.encode(" on the mat")
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont]))[0][0].log_softmax(-1)
    want = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert math.isclose(evals.continuation_logprobs(model, ctx, [cont])[0], want, rel_tol=1e-5)
    result = evals.hellaswag(model, tok, chatdata.load("hellaswag-val", limit=3))
    assert result["n"] == 3 and 0 <= result["acc_norm"] <= 1
