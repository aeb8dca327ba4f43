"""Lesson 15's tokenizer: GPT-2's BPE plus lesson 08's four chat tokens, in the padded rows.

A model pre-trained by lesson 14 on GPT-2 tokens has 50,257 real tokens and an embedding
of 50,304 rows: ``nblib.presets`` pads the vocabulary to a multiple of 128 so the matmuls
tile well. The 47 rows past ``<|endoftext|>`` (id 50256) are never a target in
pre-training. The chat tokens live there::

    <|pad|> 50257   <|user|> 50258   <|assistant|> 50259   <|end|> 50260

so mid-training starts from the base checkpoint as it is: no embedding grows, no
checkpoint changes shape, and the base model's 50,257 tokens keep their ids. The rows
start as the base model left them (near their initialisation, pushed down in the output
layer because they were never the answer); mid-training teaches them.

``ChatBPE`` has the interface of lesson 08's ``nblib.chat.ChatTokenizer`` (``pad_id``,
``user_id``, ``assistant_id``, ``end_id``, ``role_id``, ``is_special``, ``encode``,
``decode``), so lesson 08's template, ``render``, ``render_prompt`` and ``parse`` work on
it unchanged. ``encode`` never produces a special token: a user who types ``<|end|>``
gets its BPE pieces, not the end of their turn.
"""
from __future__ import annotations

from nblib.chat import PAD, USER, ASSISTANT, END, ROLES, SPECIAL_TOKENS
from nblib.tokenizers import ENDOFTEXT, gpt2_tokenizer

GPT2_TOKENS = 50257                 # ids 0..50255 are BPE tokens, 50256 is <|endoftext|>
FORMAT = "nblib-chat-bpe-1"


class ChatBPE:
    """GPT-2's BPE (tiktoken) with ``<|pad|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>`` at 50257-50260."""

    def __init__(self):
        self.bpe = gpt2_tokenizer()
        self.special_ids = {name: GPT2_TOKENS + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.special_names = {i: name for name, i in self.special_ids.items()}
        self.eot_id = self.bpe.eot_token  # 50256: documents in pre-training are separated by it

    pad_id = property(lambda self: self.special_ids[PAD])
    user_id = property(lambda self: self.special_ids[USER])
    assistant_id = property(lambda self: self.special_ids[ASSISTANT])
    end_id = property(lambda self: self.special_ids[END])

    @property
    def vocab_size(self) -> int:
        """The ids in use (50,261): a model needs at least this many rows (the padded 50,304 hold them)."""
        return GPT2_TOKENS + len(SPECIAL_TOKENS)

    def is_special(self, token_id: int) -> bool:
        """``<|endoftext|>`` and the four chat tokens."""
        return int(token_id) >= self.eot_id

    def role_id(self, role: str) -> int:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: the template knows {sorted(ROLES)}")
        return self.special_ids[ROLES[role]]

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``; special-token names in it stay ordinary text."""
        return self.bpe.encode_ordinary(text)

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of ``ids``; special tokens by name (or left out), bytes that are not UTF-8 yet as U+FFFD."""
        out, run = [], []
        for i in (int(i) for i in ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1}): a model's padded "
                                 "rows past the chat tokens are never meant to be sampled")
            if i < self.eot_id:
                run.append(i)
                continue
            out.append(self.bpe.decode(run))
            run = []
            if not skip_special:
                out.append(ENDOFTEXT if i == self.eot_id else self.special_names[i])
        out.append(self.bpe.decode(run))
        return "".join(out)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "base": "gpt2", "special_tokens": dict(self.special_ids)}

    def __eq__(self, other) -> bool:
        return isinstance(other, ChatBPE)

    def __repr__(self) -> str:
        specials = ", ".join(f"{n} {i}" for n, i in self.special_ids.items())
        return f"ChatBPE(GPT-2 BPE, 50,257 tokens + {specials})"


_SHARED: ChatBPE | None = None


def chat_bpe() -> ChatBPE:
    """The one ``ChatBPE`` (building GPT-2's BPE takes a second)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = ChatBPE()
    return _SHARED
