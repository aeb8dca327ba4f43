"""Lesson 15's data: conversations, benchmark items and the formats a chat model learns.

Every set is a list of dicts, one item each, in the formats below. There are two kinds:

- **the real sets**, for real runs: ``python -m nblib.chatdata prepare --out DIR`` downloads them once
  with Hugging Face's ``datasets`` (it needs the network) into ``DIR/NAME.jsonl``, and every stage,
  eval and the report read them with ``--data-dir DIR``. Their origins and licences are in
  ``HF_SOURCES``; ``prepare`` writes them to ``DIR/SOURCES.md`` too.
- **the practice sets**, which the course makes itself (seeded, offline, no download), in the same
  formats: what the ``--tiny`` chain, the tests and lesson 15 at CPU size use when no ``--data-dir``
  is given. They are *not* the benchmarks: their numbers say whether the pipeline works and whether
  the model learned the formats, and are never compared with published scores.

=================  ===================================================  =================================
set                an item                                              real set / practice set
=================  ===================================================  =================================
conversations      {"messages": [{"role", "content"}, ...]}             SmolTalk / lesson 08's tasks
gsm8k-train/test   {"question", "answer"} (answer ends "#### 42")       GSM8K / one-digit word problems
arc-easy-test,     {"question", "choices", "labels", "answer"}          ARC / arithmetic and opposites
arc-challenge-test                                                      (two-digit sums for "challenge")
mmlu-test          {"subject", "question", "choices", "answer": 0-3}    MMLU / the same, other seeds
hellaswag-val      {"ctx", "endings", "label"}                          HellaSwag / which line of
                                                                        tinyshakespeare comes next
=================  ===================================================  =================================

The formats (what mid-training teaches, and what the chat evals read):

- a multiple-choice question is a user message: the question, the lettered choices and
  "Answer with the letter."; the assistant answers with the letter alone;
- a math problem is the question; the assistant writes its working and ends with
  ``#### <number>``, GSM8K's own marker, which the reward and the eval read.

The stages' mixtures never train on an eval set's items: the practice sets for training and
for evaluation come from differently seeded generators (and held-out words and pairs).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from nblib import data
from nblib.tasks import OPPOSITES

LETTERS = "ABCDEFGHIJ"
SETS = ("conversations", "gsm8k-train", "gsm8k-test", "arc-easy-test", "arc-challenge-test", "mmlu-test",
        "hellaswag-val")
PRACTICE_SIZE = 200  # items of each practice set


# ---------------------------------------------------------------------------- reading a set

def read_jsonl(path: str | Path) -> list[dict]:
    """The dicts of a JSONL file; a line that is not a JSON object is an error naming the line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not valid JSON ({err.msg}): the file is damaged; prepare it again "
                                 "or remove it to use the slice packaged with nblib") from None
            if not isinstance(item, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object per line, got {type(item).__name__}")
            items.append(item)
    return items


def load(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The items of set ``name``: ``data_dir/NAME.jsonl`` when ``data_dir`` is given (a real set, prepared
    by ``prepare``), else the course's practice set of that name. ``limit`` keeps the first items."""
    if name not in SETS:
        raise ValueError(f"unknown set {name!r}; the sets are {', '.join(SETS)}")
    if data_dir is not None:
        path = Path(data_dir) / f"{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: prepare the sets first (python -m nblib.chatdata prepare "
                                    f"--out {data_dir}; it needs the network and `pip install datasets`), or leave "
                                    "out --data-dir to use the course's practice sets")
        items = read_jsonl(path)
        if not items:
            raise ValueError(f"{path} is empty: prepare it again (remove it first)")
    else:
        items = practice(name)
    return items[:limit] if limit is not None else items


# ---------------------------------------------------------------------------- formats

def mc_question(question: str, choices: list[str], letters: str = LETTERS) -> str:
    """The user message of a multiple-choice question: the question, lettered choices, the instruction."""
    if not 2 <= len(choices) <= len(letters):
        raise ValueError(f"a multiple-choice question needs 2 to {len(letters)} choices, got {len(choices)}")
    lines = [question.strip(), ""] + [f"{letters[i]}. {c.strip()}" for i, c in enumerate(choices)]
    return "\n".join(lines + ["", "Answer with the letter."])


def mc_conversation(question: str, choices: list[str], answer: int) -> list[dict]:
    return [{"role": "user", "content": mc_question(question, choices)},
            {"role": "assistant", "content": LETTERS[answer]}]


def arc_item(item: dict) -> tuple[str, list[str], int]:
    """(question, choices, index of the answer) of an ARC item (its labels may be A-E or 1-4)."""
    return item["question"], item["choices"], item["labels"].index(item["answer"])


def mmlu_item(item: dict) -> tuple[str, list[str], int]:
    return item["question"], item["choices"], int(item["answer"])


CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, e.g. "<<48/2=24>>24"


def gsm8k_solution(answer: str) -> str:
    """GSM8K's worked answer as the assistant writes it: without calculator annotations, ``#### N`` kept."""
    return CALCULATOR.sub("", answer).strip()


def gsm8k_target(answer: str) -> str:
    """The number after ``####`` in a GSM8K answer, without thousands separators: "1,080" -> "1080"."""
    if "####" not in answer:
        raise ValueError(f"not a GSM8K answer (no '####'): {answer[-80:]!r}")
    return answer.split("####")[-1].strip().replace(",", "")


def gsm8k_conversation(item: dict) -> list[dict]:
    return [{"role": "user", "content": item["question"].strip()},
            {"role": "assistant", "content": gsm8k_solution(item["answer"])}]


# ---------------------------------------------------------------------------- sets the course generates

NAMES = ("Ann", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade")
THINGS = ("apples", "pens", "books", "coins", "shells", "stamps", "marbles", "cards")


def split_of(*key) -> str:
    """"val" for one key in five (a pair of numbers, an opposite's index), "train" for the others: the
    practice evals ask about pairs the mixtures never train on."""
    return "val" if sum((i + 1) * k for i, k in enumerate(key)) % 5 == 0 else "train"


def _pair(rng: random.Random, low: int, high: int, split: str) -> tuple[int, int]:
    while True:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if split_of(a, b) == split:
            return a, b


def simple_math(rng: random.Random, split: str = "train") -> dict:
    """A one-step word problem with one-digit numbers (within reach of a CPU-sized model), in GSM8K's
    format: {"question", "answer"} (answer ends ``#### N``); ``split`` picks train or held-out pairs."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = _pair(rng, 2, 9, split)
    if rng.random() < 0.5:
        question = f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?"
        answer = f"{name} has {a} + {b} = {a + b} {thing}.\n#### {a + b}"
    else:
        a, b = a + b, b
        question = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
        answer = f"{a} - {b} = {a - b} {thing} are left.\n#### {a - b}"
    return {"question": question, "answer": answer}


def synthetic_mc(rng: random.Random, digits: int = 1, split: str = "train") -> tuple[str, list[str], int]:
    """A multiple-choice question the course makes up, a sum of two ``digits``-digit numbers or an opposite:
    (question, choices, index of the answer); ``split`` picks train or held-out pairs."""
    if rng.random() < 0.5:
        a, b = _pair(rng, *((1, 9) if digits == 1 else (10, 99)), split)
        right = a + b
        wrong = rng.sample([n for n in range(max(0, right - 6), right + 7) if n != right], 3)
        question, options = f"What is {a} + {b}?", [str(right)] + [str(n) for n in wrong]
    else:
        pairs = [pair for i, pair in enumerate(OPPOSITES) if split_of(i) == split]
        word, opposite = rng.choice(pairs)[::rng.choice((1, -1))]
        others = rng.sample([w for pair in OPPOSITES for w in pair if w not in (word, opposite)], 3)
        question, options = f"What is the opposite of '{word}'?", [opposite] + others
    order = list(range(4))
    rng.shuffle(order)
    return question, [options[i] for i in order], order.index(0)


IDENTITY_QUESTIONS = ("Who are you?", "What is your name?", "Who made you?", "Who built you?",
                      "Introduce yourself.", "Are you ChatGPT?", "What are you?", "Hi! Who am I talking to?",
                      "Tell me about yourself.", "Who trained you?")


def identity_conversations(name: str, maker: str, style: str = "friendly and brief") -> list[dict]:
    """A few conversations that teach a model who it is: one per question in ``IDENTITY_QUESTIONS``.
    Lesson 15 writes them to a JSONL file the learner edits (or replaces with their own)."""
    about = f"I am {name}, a small language model made by {maker}. I like to be {style}."
    answers = {"Who made you?": f"{maker} made me.", "Who built you?": f"I was built by {maker}.",
               "Who trained you?": f"{maker} trained me, from scratch.",
               "Are you ChatGPT?": f"No, I am {name}, a small model made by {maker}.",
               "What is your name?": f"My name is {name}."}
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answers.get(q, about)}]}
            for q in IDENTITY_QUESTIONS]


def check_conversation(item: dict, where: str) -> list[dict]:
    """The messages of a conversation item, or a ValueError saying what is wrong with it."""
    messages = item.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}, message {i}: each message needs a role ('user' or 'assistant') and a "
                             f"string content, got {m!r}")
    if messages[0]["role"] != "user" or not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: a conversation starts with the user and has at least one assistant message")
    return messages


def read_identity(path: str | Path) -> list[list[dict]]:
    """The conversations of an identity file (JSONL of {"messages": [...]}), each checked."""
    return [check_conversation(item, f"{path}, line {n}") for n, item in enumerate(read_jsonl(path), 1)]


# ---------------------------------------------------------------------------- the practice sets

def _lines_of_play() -> list[str]:
    """tinyshakespeare's lines of 30 to 80 characters (the packaged copy, sha256-checked)."""
    return [line.strip() for line in data.read_text("tinyshakespeare").splitlines() if 30 <= len(line.strip()) <= 80]


def next_line_item(lines: list[str], i: int, rng: random.Random) -> dict:
    """A HellaSwag-format item: the context is line ``i`` of the play, the right ending is the next line,
    the three others are lines from elsewhere."""
    others = rng.sample([j for j in range(len(lines)) if abs(j - i) > 2], 3)
    label = rng.randrange(4)
    endings = [lines[j] for j in others]
    endings.insert(label, lines[i + 1])
    return {"ctx": lines[i], "endings": endings, "label": label}


def _mc_item(name: str, question: str, choices: list[str], answer: int) -> dict:
    if name == "mmlu-test":
        return {"subject": "practice", "question": question, "choices": choices, "answer": answer}
    labels = list(LETTERS[:len(choices)])
    return {"question": question, "choices": choices, "labels": labels, "answer": labels[answer]}


def practice(name: str, n: int = PRACTICE_SIZE) -> list[dict]:
    """The course's practice set ``name`` (``n`` items, always the same): see the module docstring."""
    rng = random.Random(f"practice-{name}")
    if name == "conversations":
        from nblib.tasks import Mixture, default_tasks
        mix = Mixture(default_tasks(data.read_text("tinyshakespeare")))
        return [{"messages": mix.conversation(rng, "train", turns=rng.choice((1, 1, 2)))} for _ in range(n)]
    if name.startswith("gsm8k"):
        return [simple_math(rng, "train" if name == "gsm8k-train" else "val") for _ in range(n)]
    if name == "hellaswag-val":
        lines = _lines_of_play()
        start = len(lines) * 9 // 10  # the play's last tenth, as lesson 14's val split
        return [next_line_item(lines, i, rng) for i in rng.sample(range(start, len(lines) - 1), n)]
    digits = 2 if name == "arc-challenge-test" else 1
    return [_mc_item(name, *synthetic_mc(rng, digits, "val")) for _ in range(n)]


# ---------------------------------------------------------------------------- the stages' mixtures

def is_val(index: int, every: int = 10) -> bool:
    """Every ``every``-th item is held out (the same items whichever stage reads the set)."""
    return index % every == every - 1


def mixture(stage: str, split: str, data_dir: str | Path | None = None, identity: str | Path | None = None,
            seed: int = 0, generated: int = 400, identity_copies: int = 4) -> list[list[dict]]:
    """The conversations a stage trains (split "train") or is evaluated (split "val") on.

    - ``mid``: general conversations, GSM8K's training problems, and the formats: course-made
      multiple-choice questions and word problems (``generated`` of each);
    - ``sft``: the same kinds, plus the identity conversations ``identity_copies`` times over
      (and its val split holds the identity conversations once, so its loss shows them learned).
    No eval set's items are trained on (the course-made questions of the train split use other pairs of
    numbers and other opposites than the practice evals). The order is seeded.
    """
    if stage not in ("mid", "sft"):
        raise ValueError(f"stage must be 'mid' or 'sft', got {stage!r}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    rng = random.Random(f"{seed}-{stage}-{split}")
    want = (lambda i: is_val(i)) if split == "val" else (lambda i: not is_val(i))
    convs = [check_conversation(item, f"conversations, item {i}")
             for i, item in enumerate(load("conversations", data_dir)) if want(i)]
    convs += [gsm8k_conversation(item) for i, item in enumerate(load("gsm8k-train", data_dir)) if want(i)]
    n_made = generated if split == "train" else max(1, generated // 10)
    convs += [mc_conversation(*synthetic_mc(rng, rng.choice((1, 2)), split)) for _ in range(n_made)]
    convs += [gsm8k_conversation(simple_math(rng, split)) for _ in range(n_made)]
    if stage == "sft" and identity is not None:
        mine = read_identity(identity)
        convs += mine * (identity_copies if split == "train" else 1)
    rng.shuffle(convs)
    return convs


# ---------------------------------------------------------------------------- preparing the full sets

HF_SOURCES = {  # name -> (dataset, config, split, licence) on the Hugging Face Hub
    "conversations": ("HuggingFaceTB/smol-smoltalk", None, "train", "Apache-2.0"),
    "gsm8k-train": ("openai/gsm8k", "main", "train", "MIT"),
    "gsm8k-test": ("openai/gsm8k", "main", "test", "MIT"),
    "arc-easy-test": ("allenai/ai2_arc", "ARC-Easy", "test", "CC BY-SA 4.0"),
    "arc-challenge-test": ("allenai/ai2_arc", "ARC-Challenge", "test", "CC BY-SA 4.0"),
    "mmlu-test": ("cais/mmlu", "all", "test", "MIT"),
    "hellaswag-val": ("Rowan/hellaswag", None, "validation", "MIT"),
}


def _from_hub(name: str, row: dict) -> dict:
    """A Hub row in the course's item format."""
    if name == "conversations":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]
                             if m["role"] in ("user", "assistant")]}
    if name.startswith("gsm8k"):
        return {"question": row["question"], "answer": row["answer"]}
    if name.startswith("arc"):
        return {"question": row["question"], "choices": row["choices"]["text"], "labels": row["choices"]["label"],
                "answer": row["answerKey"]}
    if name == "mmlu-test":
        return {"subject": row["subject"], "question": row["question"], "choices": row["choices"],
                "answer": int(row["answer"])}
    return {"ctx": row["ctx"], "endings": row["endings"], "label": int(row["label"])}


def prepare(out: str | Path, names=tuple(HF_SOURCES), limit: int | None = None) -> dict[str, int]:
    """Download the full sets with ``datasets`` into ``out/NAME.jsonl``; returns the items written.
    A set already there is kept (nothing is overwritten: remove the file to prepare it again)."""
    try:
        import datasets
    except ImportError:
        raise ImportError("preparing the full sets needs Hugging Face's `datasets`: pip install datasets "
                          "(the slices packaged with nblib need nothing)") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names:
        path = out / f"{name}.jsonl"
        if path.exists():
            print(f"{path} is there already: kept")
            continue
        dataset, config, split, _ = HF_SOURCES[name]
        try:
            rows = datasets.load_dataset(dataset, config, split=split)
        except Exception as err:  # no network, the Hub down, offline mode: one clear message
            raise RuntimeError(f"could not load {dataset} ({config or 'default'}, {split}): {type(err).__name__}: "
                               f"{err}. This needs the network; on an offline machine prepare the sets elsewhere "
                               f"and copy the folder, or use the slices packaged with nblib") from err
        tmp = path.with_suffix(".jsonl.tmp")
        n = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                item = _from_hub(name, row)
                if name == "conversations" and not item["messages"]:
                    continue
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
                n += 1
                if limit is not None and n >= limit:
                    break
        tmp.replace(path)
        written[name] = n
        print(f"{path}: {n:,} items")
    sources = ["# Where these sets come from", "", "| file | dataset | config | split | licence |", "|---|---|---|---|---|"]
    sources += [f"| {n}.jsonl | https://huggingface.co/datasets/{d} | {c or '-'} | {s} | {lic} |"
                for n, (d, c, s, lic) in HF_SOURCES.items() if (out / f"{n}.jsonl").exists()]
    (out / "SOURCES.md").write_text("\n".join(sources) + "\n\nWritten by python -m nblib.chatdata prepare; each "
                                    "set keeps its own licence.\n")
    return written


def main(argv=None) -> None:
    import argparse
    p = argparse.ArgumentParser(prog="python -m nblib.chatdata", description="Prepare lesson 15's full data sets.")
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="download the full sets with `datasets` into --out as JSONL")
    prep.add_argument("--out", required=True)
    prep.add_argument("--sets", nargs="*", default=list(HF_SOURCES), choices=list(HF_SOURCES))
    prep.add_argument("--limit", type=int, help="at most this many items per set")
    args = p.parse_args(argv)
    try:
        prepare(args.out, args.sets, args.limit)
    except (ImportError, RuntimeError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
