"""Chat: a tokenizer with special tokens, the chat template, and a chat loop (lesson 08 on).

A chat model is a language model that has learned to continue one particular text
format. Ours (the *template*) writes each message as a role token, the message's
characters and an end token::

    <|user|>What is 12+34?<|end|><|assistant|>46<|end|>

- ``ChatTokenizer``: one token per character of a *fixed* alphabet (newline and the 95
  printable ASCII characters, so every digit is there even though tinyshakespeare has
  almost none) plus four special tokens: ``<|pad|>`` (fills batches; never read by the
  model), ``<|user|>``, ``<|assistant|>`` and ``<|end|>``. ``encode`` turns text into
  character tokens only: typing ``<|end|>`` gives seven characters, never the special
  token, so a user cannot forge a turn. Unknown characters are a ``ValueError`` that names them.
- ``render(conversation, tokenizer) -> (ids, mask)``: the token ids of a conversation
  (a list of ``{"role": "user" | "assistant", "content": str}``) and the *assistant mask*,
  True on the tokens the assistant wrote (its characters and its ``<|end|>``), False on
  role tokens and user messages. Supervised fine-tuning puts the loss on the True tokens only.
- ``render_prompt(conversation, tokenizer)``: the conversation so far plus ``<|assistant|>``,
  the form the model continues to answer (its reply ends when it writes ``<|end|>``).
- ``parse(ids, tokenizer)``: ids back to messages (``render``'s inverse); ``show_mask``
  prints ids with the masked tokens in brackets.
- ``chat(model, tokenizer, ...)``: talk with a model: an input loop when someone can
  type, a scripted conversation when no one can (CI, executed copies).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

PAD, USER, ASSISTANT, END = "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (PAD, USER, ASSISTANT, END)
ROLES = {"user": USER, "assistant": ASSISTANT}
# Newline and printable ASCII (space to ~): fixed, not read from a corpus, so that the
# digits, '+' and '=' exist even though tinyshakespeare has almost none of them.
CHARS = "\n" + "".join(chr(i) for i in range(32, 127))
FORMAT = "nblib-chat-tokenizer-1"


class ChatTokenizer:
    """Characters as tokens, plus the chat's special tokens (which come first: ``<|pad|>`` is 0).

    ``encode`` maps text to character ids and refuses characters it does not know (a
    ``ValueError`` naming them); it never produces a special token. ``decode`` writes
    special tokens by their names (``skip_special=True`` leaves them out).
    """

    def __init__(self, chars: str = CHARS, special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
        special_tokens = tuple(special_tokens)
        for name in SPECIAL_TOKENS:
            if name not in special_tokens:
                raise ValueError(f"special_tokens must include {name!r}; got {special_tokens}")
        if len(set(chars)) != len(chars):
            raise ValueError("chars has repeated characters")
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"repeated special tokens: {special_tokens}")
        self.special_tokens = special_tokens
        self.chars = chars
        self.itos = list(special_tokens) + list(chars)
        self.stoi = {ch: i + len(special_tokens) for i, ch in enumerate(chars)}
        self.special_ids = {name: i for i, name in enumerate(special_tokens)}

    # ids of the special tokens
    @property
    def pad_id(self) -> int:
        return self.special_ids[PAD]

    @property
    def user_id(self) -> int:
        return self.special_ids[USER]

    @property
    def assistant_id(self) -> int:
        return self.special_ids[ASSISTANT]

    @property
    def end_id(self) -> int:
        return self.special_ids[END]

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def is_special(self, token_id: int) -> bool:
        return 0 <= int(token_id) < len(self.special_tokens)

    def role_id(self, role: str) -> int:
        """The token that starts a message of ``role`` ("user" or "assistant")."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: the template knows {sorted(ROLES)}")
        return self.special_ids[ROLES[role]]

    def encode(self, text: str) -> list[int]:
        """Character ids of ``text`` (special-token names in the text stay plain characters)."""
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError:
            unknown = sorted({ch for ch in text if ch not in self.stoi})
            where = text.index(unknown[0])
            raise ValueError(f"characters the tokenizer does not know: {[c for c in unknown[:10]]} (first at "
                             f"position {where} of {text[max(0, where - 10):where + 10]!r}); it knows newline "
                             "and printable ASCII") from None

    def decode(self, ids, skip_special: bool = False) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise ValueError(f"token id {i} is outside the vocabulary (0..{len(self.itos) - 1})")
            if skip_special and i < len(self.special_tokens):
                continue
            out.append(self.itos[i])
        return "".join(out)

    # saving and loading
    def to_dict(self) -> dict:
        return {"format": FORMAT, "chars": self.chars, "special_tokens": list(self.special_tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> "ChatTokenizer":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a chat tokenizer: format {d.get('format')!r}, expected {FORMAT!r}")
        return cls(d["chars"], tuple(d["special_tokens"]))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ChatTokenizer":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); it should be a saved ChatTokenizer") from err
        return cls.from_dict(d)

    def __eq__(self, other) -> bool:
        return isinstance(other, ChatTokenizer) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"ChatTokenizer({len(self.chars)} characters + {list(self.special_tokens)}, vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------- the template

def _check_message(i: int, message) -> tuple[str, str]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
    if not isinstance(message["content"], str):
        raise ValueError(f"message {i}: content must be a string, got {type(message['content']).__name__}")
    return message["role"], message["content"]


def render(conversation: list[dict], tokenizer: ChatTokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of ``conversation`` and its assistant mask (same length).

    Each message is ``role token, content characters, <|end|>``. The mask is True on the
    assistant's content and its ``<|end|>`` (what the model must learn to write, including
    when to stop), False on role tokens and on user messages (given, never predicted).
    """
    ids, mask = [], []
    for i, message in enumerate(conversation):
        role, content = _check_message(i, message)
        ids.append(tokenizer.role_id(role))
        mask.append(False)
        body = tokenizer.encode(content) + [tokenizer.end_id]
        ids.extend(body)
        mask.extend([role == "assistant"] * len(body))
    return ids, mask


def render_prompt(conversation: list[dict], tokenizer: ChatTokenizer) -> list[int]:
    """The ids a model continues to reply: the conversation (ending with a user message) + ``<|assistant|>``."""
    if not conversation or conversation[-1].get("role") != "user":
        raise ValueError("render_prompt needs a conversation that ends with a user message")
    ids, _ = render(conversation, tokenizer)
    return ids + [tokenizer.assistant_id]


def parse(ids, tokenizer: ChatTokenizer, allow_unfinished: bool = False) -> list[dict]:
    """Messages from token ids (``render``'s inverse). Padding before or after is skipped.

    A message that is still open at the end (no ``<|end|>`` yet, as in a prompt or a
    reply cut short) is a ``ValueError`` unless ``allow_unfinished=True``, which returns it
    as it is. Text outside a message, padding inside one, or a role token inside a
    message is a ``ValueError`` that says where.
    """
    ids = [int(i) for i in ids]
    while ids and ids[0] == tokenizer.pad_id:
        ids.pop(0)
    while ids and ids[-1] == tokenizer.pad_id:
        ids.pop()
    roles = {tokenizer.role_id(r): r for r in ROLES}
    messages, role, content = [], None, []
    for pos, i in enumerate(ids):
        if role is None:
            if i not in roles:
                raise ValueError(f"position {pos}: expected a role token ({', '.join(ROLES.values())}), "
                                 f"got {tokenizer.decode([i])!r}")
            role, content = roles[i], []
        elif i == tokenizer.end_id:
            messages.append({"role": role, "content": tokenizer.decode(content)})
            role = None
        elif tokenizer.is_special(i):
            raise ValueError(f"position {pos}: {tokenizer.decode([i])} inside a {role} message that has not ended")
        else:
            content.append(i)
    if role is not None:
        if not allow_unfinished:
            raise ValueError(f"the last {role} message has no {END} (pass allow_unfinished=True to keep it)")
        messages.append({"role": role, "content": tokenizer.decode(content)})
    return messages


def show_mask(ids, mask, tokenizer: ChatTokenizer, open_: str = "[", close: str = "]") -> str:
    """The decoded tokens with every run of masked tokens between ``open_`` and ``close``:
    ``<|user|>Hi<|end|><|assistant|>[Hail!<|end|>]``."""
    out, inside = [], False
    for i, m in zip(ids, mask):
        if bool(m) != inside:
            out.append(open_ if m else close)
            inside = bool(m)
        out.append(tokenizer.decode([i]))
    return "".join(out) + (close if inside else "")


def reply_text(completion, tokenizer: ChatTokenizer) -> str:
    """The text of a generated reply: characters up to the first special token, first line only, stripped.

    The same rule reads the base model's and the fine-tuned model's replies, so that
    accuracy compares what they answered, and format compliance (did the reply end with
    ``<|end|>``?) is measured separately.
    """
    chars = []
    for i in completion:
        i = int(i)
        if tokenizer.is_special(i):
            break
        chars.append(i)
    return tokenizer.decode(chars).split("\n", 1)[0].strip()


# ---------------------------------------------------------------------------- chatting

def can_ask() -> bool:
    """True when someone can type answers: a notebook that allows input, or a terminal.

    False when a notebook runs without stdin (nbclient, nbval, the course's recorder and
    grader run notebooks that way, FAST mode included), so those use a script.
    """
    try:
        from IPython import get_ipython
        shell = get_ipython()
    except ImportError:
        shell = None
    kernel = getattr(shell, "kernel", None) if shell is not None else None
    if kernel is not None:
        return bool(getattr(kernel, "_allow_stdin", True))
    return sys.stdin is not None and sys.stdin.isatty()


def _fit(conversation: list[dict], tokenizer: ChatTokenizer, room: int) -> list[dict]:
    """The latest turns of ``conversation`` whose prompt fits in ``room`` tokens (oldest dropped first)."""
    conv = list(conversation)
    while len(conv) > 1 and len(render_prompt(conv, tokenizer)) > room:
        conv = conv[2:] if len(conv) > 2 and conv[0]["role"] == "user" else conv[1:]
    if len(render_prompt(conv, tokenizer)) > room:
        raise ValueError(f"the message is too long: the model reads at most {room} tokens before its reply")
    return conv


def respond(model, tokenizer: ChatTokenizer, conversation: list[dict], max_new_tokens: int = 80,
            temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None) -> dict:
    """The model's next assistant message for ``conversation`` (which ends with a user message).

    Returns ``{"role": "assistant", "content": text, "finished": bool}``: ``finished`` says
    whether the model ended its turn with ``<|end|>`` within ``max_new_tokens``.
    """
    from nblib import engine

    block = model.config.block_size
    if not 0 < max_new_tokens < block:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be between 1 and the model's block_size={block} - 1")
    conv = _fit(conversation, tokenizer, block - max_new_tokens)
    prompt = render_prompt(conv, tokenizer)
    out = engine.generate(model, [prompt], max_new_tokens, temperature=temperature, top_k=top_k,
                          stop_tokens=[tokenizer.end_id], pad_id=tokenizer.pad_id, generator=generator)
    completion = out.completions()[0]
    finished = bool(out.finished[0]) and not any(tokenizer.is_special(i) for i in completion)
    return {"role": "assistant", "content": reply_text(completion, tokenizer), "finished": finished}


def chat(model, tokenizer: ChatTokenizer, script: list[str] | None = None, *, interactive: bool | None = None,
         max_new_tokens: int = 80, temperature: float = 0.0, top_k: int | None = None,
         generator: torch.Generator | None = None, input_fn=input, print_fn=print) -> list[dict]:
    """Talk with ``model``; returns the conversation.

    ``interactive=None`` asks ``can_ask()``: in a notebook or terminal where you can type,
    each line you enter is a user message and the model answers (an empty line, ``quit``
    or ``bye`` ends the chat, ``/reset`` forgets the conversation so far); elsewhere the
    user messages of ``script`` are sent one by one. The conversation keeps every turn;
    the prompt keeps as many of the latest turns as fit the model's context.
    ``temperature=0`` answers greedily (the same reply every time).
    """
    if interactive is None:
        interactive = can_ask()
    if not interactive and script is None:
        raise ValueError("no one can type here (a notebook run without input, as in CI): pass script=[...]")
    conversation: list[dict] = []
    if interactive:
        print_fn("Chat with the model: type a message and press Enter; an empty line, 'quit' or 'bye' ends it, "
                 "'/reset' starts over.")
    messages = iter(script or [])
    while True:
        if interactive:
            try:
                text = input_fn("you: ")
            except (EOFError, KeyboardInterrupt):
                break
        else:
            text = next(messages, None)
            if text is None:
                break
            print_fn(f"you: {text}")
        if text is None or text.strip().lower() in ("", "quit", "bye", "exit"):
            break
        if text.strip() == "/reset":
            conversation = []
            print_fn("(conversation cleared)")
            continue
        try:
            tokenizer.encode(text)
        except ValueError as err:
            print_fn(f"(the model cannot read that: {err})")
            continue
        conversation.append({"role": "user", "content": text})
        try:
            reply = respond(model, tokenizer, conversation, max_new_tokens, temperature, top_k, generator)
        except ValueError as err:
            conversation.pop()
            print_fn(f"({err})")
            continue
        conversation.append({"role": "assistant", "content": reply["content"]})
        print_fn(f"model: {reply['content']}" + ("" if reply["finished"] else "  [did not end its turn]"))
    return conversation
