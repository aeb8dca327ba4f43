"""int8 weight-only quantization (lesson 16): a quarter of the bytes to read per token.

At batch 1 a decode step reads every weight once, so tokens/s is about memory bandwidth /
bytes of weights. Storing each weight as an int8 with one float scale per output row
(per-channel, symmetric: w ~ q * scale, q in -127 ... 127, scale = max|row| / 127) takes 4x
fewer bytes than float32 (2x fewer than bf16), and the activations stay in float: nothing
but the weights is rounded. A kernel that multiplies by int8 weights directly (llama.cpp's,
gpt-fast's compiled GPU kernels) also reads 4x fewer bytes per token; ``Int8Linear`` here
converts the weights to float in each forward pass, plain PyTorch, so it saves the memory
at rest but not the time (lesson 16 measures both). ``quantize_int8`` / ``dequantize`` are the arithmetic;
``Int8Linear`` a drop-in ``nn.Linear``; ``quantize_model`` swaps every linear layer of a
model; ``save_quantized`` / ``load_quantized`` keep it as safetensors.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nblib import checkpoint


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` for a weight [out, in]: q int8 [out, in], scale float32 [out], w ~ q * scale[:, None]."""
    if w.dim() != 2:
        raise ValueError(f"quantize_int8 takes a 2-D weight [out, in], got shape {tuple(w.shape)}")
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # a row of zeros keeps a tiny scale, not 0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and a float scale per output feature."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantizer=quantize_int8) -> "Int8Linear":
        """``linear`` quantized by ``quantizer`` (lesson 16 plugs in the learner's ``quantize_int8``)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q, scale = quantizer(linear.weight)
        layer.weight, layer.scale = q.to(torch.int8), scale.float()
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x @ q.T) * scale = x @ (q * scale).T: the scale of output row j multiplies output j. The int8
        # weights are converted to x's dtype on the fly: PyTorch has no fused int8 matrix-vector product
        # that is faster on every CPU (its _weight_int8pack_mm is 5x slower than float32 on an AVX2 EPYC)
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_model(model: nn.Module, skip: tuple[str, ...] = (), quantizer=quantize_int8) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an ``Int8Linear``, except modules whose
    name contains one of ``skip``; returns the model. A tied output layer gets its own int8 copy and
    the embedding stays float: an embedding lookup reads one row per token, not the whole table."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(s in full for s in skip):
                setattr(module, child_name, Int8Linear.from_linear(child, quantizer))
    return model


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """The quantized model's tensors as safetensors (int8 weights, float scales)."""
    from safetensors.torch import save_file

    path = Path(path)
    kept, _ = checkpoint._dedupe(model.state_dict())  # a tied tensor once: safetensors refuses shared memory
    save_file({k: v.contiguous() for k, v in kept.items()}, str(path), metadata={"format": "nblib-int8"})
    return path


def load_quantized(model: nn.Module, path: str | Path, skip: tuple[str, ...] = ()) -> nn.Module:
    """A float ``model`` of the same config, quantized alike and given the saved tensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("format") != "nblib-int8":
            raise ValueError(f"{path} is not an int8 model saved by nblib.quant.save_quantized")
    quantize_model(model, skip)
    state = load_file(str(path))
    own = model.state_dict()
    kept = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in own if k not in state and own[k].data_ptr() not in kept]  # a tied table was saved once
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and (own[k].shape, own[k].dtype) != (state[k].shape, state[k].dtype)]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"other shape or dtype {wrong[:3]}): build the model with the config it was saved from")
    model.load_state_dict(state, strict=False)
    return model
