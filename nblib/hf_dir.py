"""A Hugging Face model directory: ``config.json`` + ``model.safetensors`` (lessons 06, 07).

That is the whole format ``from_pretrained`` reads for a small model: a JSON config and
one safetensors file whose tensor names are the module names. ``nblib.gpt`` and
``nblib.llama`` name their modules as Hugging Face does, so each only has to translate
its config; reading and writing the folder happens here, once. Both call the folder's
readers and writers ``load_hf(directory)`` and ``save_hf(model, directory)``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MAX_HEADER = 100_000_000  # safetensors refuses longer headers; a bigger "length" is not one
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id")


def check_special_tokens(config) -> None:
    """Refuse a model config whose bos/eos token id is not in its vocabulary (None: no such token)."""
    for key in SPECIAL_TOKENS:
        token = getattr(config, key)
        for t in token if isinstance(token, list) else [token]:  # some Llamas list several end tokens
            if t is not None and not 0 <= t < config.vocab_size:
                raise ValueError(f"{key}={t} is not a token of a {config.vocab_size}-token vocabulary "
                                 f"(0..{config.vocab_size - 1}); use None for a model without one")


def write_hf_dir(directory: str | Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """Write ``config`` as config.json and ``state`` as model.safetensors into ``directory``.

    Leave tied weights (e.g. ``lm_head.weight``) out of ``state``: safetensors stores each
    tensor once, and Hugging Face re-ties them on load.
    """
    # A config.json without bos/eos_token_id gets transformers' defaults (GPT-2's 50256,
    # whatever the vocabulary) and a warning at every load: always say them, null for none.
    missing = [key for key in SPECIAL_TOKENS if key not in config]
    if missing:
        raise ValueError(f"config.json needs {missing}: the model's own ids, or None for a model without "
                         "such a token (otherwise transformers fills in its defaults)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_hf_config(directory: str | Path) -> dict:
    """The config.json of a Hugging Face model directory, as a dict (read before the weights,
    so that an architecture we don't build is refused before any tensor is loaded)."""
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: a Hugging Face model directory needs "
                                "config.json and model.safetensors")
    return json.loads(config_file.read_text())


def read_hf_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face model directory.

    Reads model.safetensors, or an older pytorch_model.bin with ``weights_only=True``
    (tensors only, never pickled code). Sharded checkpoints are not supported.
    """
    directory = Path(directory)
    weights = directory / "model.safetensors"
    if weights.is_file():
        try:
            return load_file(str(weights))
        except SafetensorError as err:
            raise ValueError(f"{weights} {why_unreadable(weights, err, 'the weights of a model')}") from err
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {directory} "
                            "(sharded checkpoints are not supported)")


def why_unreadable(path: str | Path, err: Exception, expected: str) -> str:
    """What is wrong with a file that safetensors refuses, as the end of a sentence that
    starts with its name (safetensors itself only says "incomplete metadata, file not
    fully covered" or "header too large"). ``expected`` says what the file should be.

    A safetensors file is: 8 bytes giving the header's length n (little-endian), n bytes
    of JSON giving each tensor's byte range, then the tensors' bytes.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n) if n <= MAX_HEADER else b""
    not_safetensors = "is not a safetensors file ({}), so not " + expected
    if size < 8 or not header.startswith(b"{"):
        return not_safetensors.format("it does not start with a safetensors header")
    truncated = "is truncated: {} (was a copy or download cut short?). Copy it again or save it again."
    if len(header) < n:
        return truncated.format(f"its {size:,} bytes end inside its {8 + n:,}-byte header")
    try:
        entries = json.loads(header)
        end = 8 + n + max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return not_safetensors.format("its header is not a safetensors header")
    if size < end:
        return truncated.format(f"it has {size:,} bytes, its header announces {end:,}")
    return f"cannot be read as safetensors ({err}), so not {expected}"
