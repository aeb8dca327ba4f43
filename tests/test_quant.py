"""nblib.quant: int8 weight-only quantization against float arithmetic, on both model families."""
import pytest
import torch

from nblib import gpt, inference, llama, quant


def test_quantize_int8_rounds_each_row_to_its_own_scale():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [127.0, 1.0, -64.0]])
    q, scale = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (3,)
    assert torch.allclose(scale, torch.tensor([1 / 127, 1e-12 / 127, 1.0]))
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0] and q[2].tolist() == [127, 1, -64]
    # the error of each weight is at most half a step of its row
    w = torch.randn(64, 96)
    q, scale = quant.quantize_int8(w)
    assert ((quant.dequantize(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_computes_x_times_the_dequantized_weight(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40, bias=bias)
    layer = quant.Int8Linear.from_linear(linear)
    x = torch.randn(2, 5, 48)
    reference = torch.nn.functional.linear(x, quant.dequantize(layer.weight, layer.scale), linear.bias)
    torch.testing.assert_close(layer(x), reference, atol=1e-4, rtol=1e-4)
    assert layer(x).shape == (2, 5, 40)


def make(family):
    torch.manual_seed(0)
    if family == "gpt":
        return gpt.GPT(gpt.GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=64)).eval()
    return llama.Llama(llama.LlamaConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_kv_heads=1,
                                         n_embd=64)).eval()


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_quantized_model_is_smaller_close_and_saves_and_loads(family, tmp_path):
    model = make(family)
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        float_logits = model(ids)[0]
        before = inference.weight_bytes(model)
        quant.quantize_model(model)
        q_logits = model(ids)[0]
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert inference.weight_bytes(model) < before  # the embedding stays float: the gain grows with depth
    assert (q_logits - float_logits).abs().max() < 0.05 * float_logits.abs().max()
    path = quant.save_quantized(model, tmp_path / "int8.safetensors")
    loaded = quant.load_quantized(make(family), path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], q_logits)
    with pytest.raises(ValueError, match="config"):
        quant.load_quantized(gpt.GPT(gpt.GPTConfig(vocab_size=61, block_size=32, n_layer=1, n_head=2, n_embd=64)),
                             path)
