"""A Hugging Face model directory: ``config.json`` + ``model.safetensors`` (lessons 06, 07).

That is the whole format ``from_pretrained`` reads for a small model: a JSON config and
one safetensors file whose tensor names are the module names. ``nblib.gpt`` and
``nblib.llama`` name their modules as Hugging Face does, so each only has to translate
its config; reading and writing the folder happens here, once.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def write_hf_dir(directory: str | Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """Write ``config`` as config.json and ``state`` as model.safetensors into ``directory``.

    Leave tied weights (e.g. ``lm_head.weight``) out of ``state``: safetensors stores each
    tensor once, and Hugging Face re-ties them on load.
    """
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
    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {directory} "
                            "(sharded checkpoints are not supported)")
