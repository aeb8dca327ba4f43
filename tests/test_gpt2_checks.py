"""The lesson-06 checks for the block and the forward: they pass right code and fail wrong code
with a message that says what is off (compared with Hugging Face's GPT-2, nothing downloaded)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

pytest.importorskip("transformers")

from nblib.checks import CheckFailed  # noqa: E402
from nblib.checks import gpt2 as checks  # noqa: E402
from nblib.gpt import GPT, Block, lm_loss  # noqa: E402


class LearnerBlock(nn.Module):
    """The notebook's given __init__, with a forward that ``variant`` can break."""

    variant = "right"

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.ln_1 = nn.LayerNorm(C, eps=1e-5, bias=config.bias)
        self.attn = nn.ModuleDict(dict(c_attn=nn.Linear(C, 3 * C, bias=config.bias),
                                       c_proj=nn.Linear(C, C, bias=config.bias)))
        self.ln_2 = nn.LayerNorm(C, eps=1e-5, bias=config.bias)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(C, 4 * C, bias=config.bias),
                                      c_proj=nn.Linear(4 * C, C, bias=config.bias)))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.variant != "not causal")
        a = self.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        x2 = x + a
        approximate = "none" if self.variant == "exact gelu" else "tanh"
        m = self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x2)), approximate=approximate))
        if self.variant == "no residual":
            return a + m
        return x2 + m


class LearnerGPT(nn.Module):
    block_class = Block
    variant = "right"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([self.block_class(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(lambda module: GPT._init_weights(self, module))

    def forward(self, idx, targets=None):
        T = idx.size(1)
        x = self.transformer.wte(idx)
        if self.variant != "no positions":
            x = x + self.transformer.wpe(torch.arange(T))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        if self.variant != "no ln_f":
            x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        return logits, None if targets is None else lm_loss(logits, targets)


def _variant(cls, variant):
    return type(cls.__name__, (cls,), {"variant": variant, "__module__": __name__})


def test_right_block_and_model_pass(capsys):
    checks.check_block(LearnerBlock)
    checks.check_gpt2_forward(LearnerGPT)
    assert capsys.readouterr().out.count("passed") == 2


@pytest.mark.parametrize("variant, message", [("no residual", "residual"), ("exact gelu", "off by"),
                                              ("not causal", "off by")])
def test_wrong_block_fails(variant, message):
    with pytest.raises(CheckFailed, match=message):
        checks.check_block(_variant(LearnerBlock, variant))


@pytest.mark.parametrize("variant", ["no positions", "no ln_f"])
def test_wrong_forward_fails(variant):
    with pytest.raises(CheckFailed, match="Hugging Face"):
        checks.check_gpt2_forward(_variant(LearnerGPT, variant))


def test_forward_is_checked_with_course_blocks():
    """An unfinished block does not fail the forward's check: that one runs nblib's blocks."""
    class Unfinished(LearnerBlock):
        def forward(self, x):
            raise NotImplementedError

    Model = type("Model", (LearnerGPT,), {"block_class": Unfinished, "__module__": __name__})
    checks.check_gpt2_forward(Model)
    with pytest.raises(NotImplementedError):
        checks.check_block(Unfinished)


def test_renamed_parameters_are_named():
    class Renamed(LearnerBlock):
        def __init__(self, config):
            super().__init__(config)
            self.ln_first = self.ln_1
            del self.ln_1

    with pytest.raises(CheckFailed, match="ln_1"):
        checks.check_block(Renamed)


def test_course_classes_are_refused():
    with pytest.raises(CheckFailed, match="course's own"):
        checks.check_block(Block)
    with pytest.raises(CheckFailed, match="course's own"):
        checks.check_gpt2_forward(GPT)
