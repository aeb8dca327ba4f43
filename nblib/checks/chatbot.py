"""Checks of lesson 15's exercises: the chat model's multiple-choice scorer (15.letter_choice) and the
GSM8K reward (15.gsm8k_reward), each against ``nblib.evals`` and with the usual mistakes named."""
from __future__ import annotations

import functools
import inspect
import textwrap
from pathlib import Path

import torch

from nblib import chat, chatdata, evals, llama
from nblib.chatbpe import chat_bpe
from nblib.checks import CheckFailed, call_learner, course_functions_refused, passed

QUESTIONS = [  # (question, choices): 2 to 5 choices, so that "always four letters" shows
    ("What is 2 + 2?", ["3", "4", "5", "22"]),
    ("Which is a colour?", ["red", "seven"]),
    ("Water boils at sea level at", ["50 C", "100 C", "150 C"]),
    ("Pick the animal.", ["stone", "cloud", "horse", "spoon", "glass"]),
    ("The opposite of hot is", ["warm", "cold", "big"]),
    ("Which planet is closest to the Sun?", ["Venus", "Earth", "Mercury", "Mars"]),
    ("A triangle has how many sides?", ["two", "three", "four", "five"]),
    ("Which word is a verb?", ["run", "blue"]),
    ("Who wrote Hamlet?", ["Shakespeare", "Dickens", "Austen"]),
    ("What comes after Monday?", ["Sunday", "Tuesday", "Friday", "Wednesday", "Saturday"]),
    ("Ice is", ["frozen water", "hot air", "sand", "light"]),
    ("How many legs has a spider?", ["six", "eight", "ten"]),
]


def tiny_chat_model(seed: int) -> llama.Llama:
    """A random chat-vocabulary Llama: its letter logits depend on the whole prompt, so a scorer that
    reads another position or another token than the assistant's first letter gets other answers."""
    torch.manual_seed(seed)
    model = llama.Llama(llama.LlamaConfig(vocab_size=50304, block_size=128, n_layer=1, n_head=2, n_embd=16))
    return model.eval()


def _letter_variants():
    """nblib's scorer with one usual mistake each: name -> fn(model, tokenizer, question, choices)."""
    tok = chat_bpe()

    def logits_of(model, ids):
        return model(torch.tensor([ids[-model.config.block_size:]]))[0][0, -1]

    def prompt(question, choices):
        return chat.render_prompt([{"role": "user", "content": chatdata.mc_question(question, choices)}], tok)

    def no_assistant_token(model, t, q, c):
        return int(logits_of(model, prompt(q, c)[:-1])[evals.letter_ids(t, len(c))].argmax())

    def spaced_letters(model, t, q, c):
        ids = [t.encode(" " + letter)[0] for letter in chatdata.LETTERS[:len(c)]]
        return int(logits_of(model, prompt(q, c))[ids].argmax())

    def four_letters(model, t, q, c):
        return int(logits_of(model, prompt(q, c))[evals.letter_ids(t, 4)].argmax())

    def all_ten_letters(model, t, q, c):
        return int(logits_of(model, prompt(q, c))[evals.letter_ids(t, 10)].argmax())

    def first_position(model, t, q, c):
        return int(model(torch.tensor([prompt(q, c)]))[0][0, 0][evals.letter_ids(t, len(c))].argmax())

    return {"the prompt does not end with <|assistant|> (use chat.render_prompt)": no_assistant_token,
            "the letters were scored as ' A', ' B', ... (with a space) instead of 'A', 'B', ...": spaced_letters,
            "four letters scored whatever the number of choices": four_letters,
            "every letter A-J scored, not only the question's choices": all_ten_letters,
            "the logits of the first position read instead of the last": first_position}


def _cases():
    """(seed, model, question, choices) for every question on each of the two random models."""
    return [(seed, tiny_chat_model(seed), q, c) for seed in (0, 1) for q, c in QUESTIONS]


@functools.lru_cache(maxsize=None)
def _answers(variant: str | None) -> tuple[int, ...]:
    """nblib's answers (``variant`` None) or those of one mistake, on fresh models: computed once per process."""
    tok = chat_bpe()
    fn = evals.letter_choice if variant is None else _letter_variants()[variant]
    return tuple(fn(model, tok, q, list(c)) for _, model, q, c in _cases())


def check_letter_choice(letter_choice) -> None:
    """``letter_choice(model, tokenizer, question, choices) -> int`` must pick the same choice as
    ``nblib.evals.letter_choice`` on every question, for two random models."""
    tok = chat_bpe()
    cases = _cases()
    answers = []
    for seed, model, question, choices in cases:
        what = f"letter_choice on {question!r} with {len(choices)} choices (model seed {seed})"
        with course_functions_refused("letter_choice", evals, "letter_choice", "chat_evals",
                                      write_from="chat.render_prompt, chatdata.mc_question and the model's logits"):
            got = call_learner(what, letter_choice, model, tok, question, list(choices))
        if isinstance(got, str) and got in chatdata.LETTERS:
            raise CheckFailed(f"{what}: returned the letter {got!r}; return the choice's index (0 for A, 1 for B, ...)")
        if isinstance(got, bool) or not isinstance(got, int | torch.Tensor) or (torch.is_tensor(got) and got.numel() != 1):
            raise CheckFailed(f"{what}: expected an int (the index of the chosen choice), got {got!r}")
        answers.append(int(got))
    wants = _answers(None)
    wrong = [i for i, (got, want) in enumerate(zip(answers, wants)) if got != want]
    if not wrong:
        passed("letter_choice")
        return
    seed, _, question, choices = cases[wrong[0]]
    got, want = answers[wrong[0]], wants[wrong[0]]
    if got >= len(choices) or got < 0:
        hint = f" (index {got} is not one of the {len(choices)} choices: only the question's letters compete)"
    else:
        named = [name for name in _letter_variants() if list(_answers(name)) == answers]
        hint = f" (your answers are those of a scorer where {named[0]})" if named else ""
    raise CheckFailed(f"letter_choice on {question!r} with {len(choices)} choices (model seed {seed}): expected "
                      f"choice {want} ({chatdata.LETTERS[want]}), got {got}; {len(wrong)} of {len(cases)} answers "
                      f"differ{hint}")


REWARD_CASES = [  # (reply, reference answer, reward)
    ("She has 3 + 4 = 7 apples.\n#### 7", "3+4=7\n#### 7", 1.0),
    ("#### 8", "#### 7", 0.0),
    ("The answer is 7.", "#### 7", 0.0),                         # no marker: not an answer
    ("#### 1,080", "#### 1080", 1.0),                             # thousands separators
    ("#### 1080", "#### 1,080", 1.0),
    ("#### 7.0", "#### 7", 1.0),                                  # the same number
    ("#### 7.5", "#### 7", 0.0),
    ("#### -3", "#### -3", 1.0),
    ("#### 3", "#### -3", 0.0),
    ("First #### 5 then\n#### 12", "#### 12", 1.0),               # the last marker counts
    ("#### 12 then #### 5", "#### 12", 0.0),
    ("#### 42 apples", "#### 42", 1.0),
    ("#### $42", "#### 42", 1.0),
    ("#### forty-two", "#### 42", 0.0),
    ("", "#### 0", 0.0),
    ("####", "#### 0", 0.0),
    ("12 #### 34", "#### 12", 0.0),                               # the number before the marker is not the answer
]


def check_gsm8k_reward(gsm8k_reward) -> None:
    """``gsm8k_reward(reply, answer) -> float``: 1.0 exactly when the first number after the reply's last
    ``####`` equals the number after the answer's ``####``, else 0.0."""
    for reply, answer, want in REWARD_CASES:
        what = f"gsm8k_reward({reply!r}, {answer!r})"
        with course_functions_refused("gsm8k_reward", evals, "gsm8k_reward",
                                      write_from="chatdata.gsm8k_target and a regular expression for the number"):
            got = call_learner(what, gsm8k_reward, reply, answer)
        try:
            got = float(got)
        except (TypeError, ValueError):
            raise CheckFailed(f"{what}: expected a float (1.0 or 0.0), got {got!r}") from None
        if got != want:
            raise CheckFailed(f"{what}: expected {want}, got {got}")
    passed("gsm8k_reward")


_REWARD_HEADER = "# gsm8k_reward: your function, as lesson 15's RL stage runs it\nimport math\nimport re\n\n"


def write_reward(gsm8k_reward, path) -> Path:
    """Write the learner's ``gsm8k_reward`` (its source and the imports it may use) to ``path``, for
    ``python -m nblib.chat_rl --reward FILE.py`` to load (the RL stage runs as its own process)."""
    source = textwrap.dedent(inspect.getsource(gsm8k_reward))
    alias = "" if gsm8k_reward.__name__ == "gsm8k_reward" else f"\ngsm8k_reward = {gsm8k_reward.__name__}\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_REWARD_HEADER + "from nblib import chatdata\n\n" + source + alias)
    return path
