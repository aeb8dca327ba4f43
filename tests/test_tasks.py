"""Task generators and verifiers; held-out problems are disjoint from training ones by construction."""
import random
import re

import pytest

from nblib import chat, data, sft, tasks

TEXT = data.read_text("tinyshakespeare")
TASKS = {t.name: t for t in tasks.default_tasks(TEXT)}
TOK = chat.ChatTokenizer()


def test_normalize_and_verify():
    p = tasks.Problem("add", "What is 1+2?", "3", "3")
    assert tasks.verify(p, " 3 ") and tasks.verify(p, "3") and not tasks.verify(p, "4") and not tasks.verify(p, "")
    assert tasks.normalize("  Night\t Day ") == "night day"
    with pytest.raises(ValueError, match="open-ended"):
        tasks.verify(tasks.Problem("say", "Say hi.", "Hi."), "Hi.")


@pytest.mark.parametrize("a, b, right, buggy", [(12, 34, "46", "46"), (58, 67, "125", "115"), (99, 99, "198", "188"),
                                                 (15, 15, "30", "20"), (50, 50, "100", "100"), (19, 80, "99", "99"),
                                                 (5, 7, "12", "12"), (195, 7, "202", "192")])
def test_addition_answers_and_the_buggy_teacher(a, b, right, buggy):
    assert tasks.add_answer(a, b) == right and tasks.add_answer(a, b, drop_carries=True) == buggy
    assert tasks.Addition.has_carry(a, b) == (right != buggy)


def test_buggy_teacher_demonstrates_wrong_answers_but_verifies_against_the_truth():
    task = tasks.Addition(drop_carries=True)
    p = task.problem(58, 67)
    assert p.reply == "115" and p.answer == "125"
    assert tasks.verify(p, "125") and not tasks.verify(p, p.reply)
    rng = random.Random(0)
    problems = [task.sample(rng) for _ in range(300)]
    wrong = sum(p.reply != p.answer for p in problems)
    assert 0.2 < wrong / len(problems) < 0.8  # a good share of pairs carry


def test_a_teacher_that_forgets_carries_sometimes():
    rng = random.Random(1)
    teacher = tasks.Addition(drop_carries=0.7)   # built once: its pair list is what costs, not a draw
    problems = [teacher.sample(rng) for _ in range(4000)]
    carry = [tasks.Addition.has_carry(*map(int, re.findall(r"\d+", p.prompt))) for p in problems]
    dropped = [p.reply != p.answer for p, c in zip(problems, carry) if c]
    share = sum(dropped) / len(dropped)
    assert abs(share - 0.7) < 4 * (0.7 * 0.3 / len(dropped)) ** 0.5, share
    assert all(p.reply == p.answer for p, c in zip(problems, carry) if not c)   # nothing to forget
    # the other teachers draw exactly as before: the same problems in the same order
    for p_always, p_never in zip(*[[t.sample(r) for _ in range(50)] for t, r in (
            (tasks.Addition(drop_carries=True), random.Random(2)), (tasks.Addition(), random.Random(2)))]):
        assert p_always.prompt == p_never.prompt and p_always.answer == p_never.answer
    with pytest.raises(ValueError, match="probability"):
        tasks.Addition(drop_carries=1.5)


def test_addition_split_is_by_unordered_pair_and_disjoint():
    task = TASKS["add"]
    train, val = set(task.pairs("train")), set(task.pairs("val"))
    assert not train & val and len(train) + len(val) == 90 * 90
    assert 0.05 < len(val) / 8100 < 0.15
    assert all((b, a) in val for a, b in val)  # 45+23 is held out with 23+45
    rng = random.Random(1)
    for _ in range(200):
        p = task.sample(rng, "val")
        a, b = map(int, p.prompt.replace("What is ", "").replace("Add ", "").replace(" and ", "+")
                   .rstrip("?.=").rstrip("=?").split("+"))
        assert (a, b) in val and p.answer == str(a + b)


def word_of(task, prompt):
    """The word a word-task prompt asks about, read back through the task's templates."""
    for template in task.templates:
        pattern = re.escape(template).replace(r"\{w\}", "([a-z]+)").replace(r"\{c\}", "[a-z]")
        m = re.fullmatch(pattern, prompt)
        if m:
            return m.group(1)
    raise AssertionError(f"{prompt!r} matches no template of {task.name}")


def test_word_tasks_share_one_word_split_and_never_train_on_a_val_word():
    words = TASKS["reverse"].words
    assert TASKS["spell"].words is words and TASKS["count"].words is words
    train, val = set(words("train")), set(words("val"))
    assert not train & val and len(val) > 100 and len(train) > 4 * len(val) * 0.8
    rng = random.Random(2)
    for name in ("reverse", "spell", "count"):
        for split, allowed in (("train", train), ("val", val)):
            for _ in range(100):
                p = TASKS[name].sample(rng, split)
                word = word_of(TASKS[name], p.prompt)
                assert word in allowed, (name, split, p)


def test_word_task_answers():
    assert TASKS["reverse"].make("night").answer == "thgin"
    assert TASKS["spell"].make("night").answer == "n-i-g-h-t"
    count = TASKS["count"]
    assert count.make("banana", letter="a").answer == "3" and count.make("banana", letter="z").answer == "0"
    rng = random.Random(3)
    answers = [count.sample(rng).answer for _ in range(300)]
    assert "0" in answers and "1" in answers and "2" in answers


def test_opposites_are_symmetric_and_val_uses_an_unseen_phrasing():
    task = TASKS["opposite"]
    assert all(task.table[task.table[w]] == w for w in task.table)
    rng = random.Random(4)
    val = [task.sample(rng, "val") for _ in range(50)]
    assert all(p.prompt.startswith("Tell me") for p in val)
    assert not any(p.prompt.startswith("Tell me") for p in (task.sample(rng, "train") for _ in range(200)))
    assert {p.answer for p in val} <= set(task.table.values())


def test_say_lines_come_from_the_role_and_the_splits_do_not_share_lines():
    task = TASKS["say"]
    assert "a king" in task.roles and "Romeo" in task.roles
    for role in task.roles:
        assert not set(task.lines["train"][role]) & set(task.lines["val"][role])
    rng = random.Random(5)
    p = task.sample(rng, "val")
    assert not p.verifiable and p.reply in [l for lines in task.lines["val"].values() for l in lines]
    assert all(16 <= len(l) <= 48 for lines in task.lines["train"].values() for l in lines)


def test_every_problem_renders_with_the_chat_tokenizer():
    mix = tasks.Mixture(list(TASKS.values()))
    rng = random.Random(6)
    for split in tasks.SPLITS:
        for _ in range(300):
            conv = mix.conversation(rng, split, turns=2)
            ids, mask = chat.render(conv, TOK)
            assert chat.parse(ids, TOK) == conv and any(mask)


def test_mixture_weights_and_errors():
    mix = tasks.Mixture([TASKS["add"], TASKS["opposite"]], [3, 1])
    rng = random.Random(7)
    names = [mix.sample(rng).task for _ in range(2000)]
    assert 0.7 < names.count("add") / 2000 < 0.8
    with pytest.raises(ValueError, match="weight"):
        tasks.Mixture([TASKS["add"]], [0])
    with pytest.raises(ValueError, match="unique"):
        tasks.Mixture([TASKS["add"], tasks.Addition()])
    with pytest.raises(ValueError, match="split"):
        TASKS["add"].sample(rng, "test")


def test_eval_sets_are_fixed_distinct_and_held_out():
    for name, task in TASKS.items():
        a, b = tasks.eval_set(task, 40, seed=0), tasks.eval_set(task, 40, seed=0)
        assert a == b and len({(p.prompt, p.reply) for p in a}) == len(a) == 40, name
    train_prompts = {TASKS["add"].sample(random.Random(i)).prompt for i in range(3000)}
    assert not train_prompts & {p.prompt for p in tasks.eval_set(TASKS["add"], 200)}


def test_fewshot_conversation_and_accuracy_by_task():
    add = TASKS["add"]
    shots = [add.problem(11, 22), add.problem(30, 40)]
    q = add.problem(12, 34)
    conv = tasks.fewshot(q, shots)
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant", "user"]
    assert conv[-1]["content"] == q.prompt and conv[1]["content"] == "33"
    problems = [q, add.problem(50, 50), TASKS["reverse"].make("dog"), TASKS["say"].make("a king", "Hail!")]
    acc = sft.accuracy_by_task(problems, ["46", "99", " GOD ", "whatever"])
    assert acc == {"add": 0.5, "reverse": 1.0}
