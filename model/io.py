"""Weights on disk: `model.safetensors` with a JSON metadata string under the key "maskrt".

Metadata: {"format": "maskrt", "version", "preset", "num_classes", "class_names",
"category_ids", "config": {constructor kwargs}} (design.md). No pickle anywhere.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from maskrt import __version__
from maskrt.errors import MaskrtError
from maskrt.model.mask_rcnn import MaskRCNN
from maskrt.model.presets import PRESETS, build_model

METADATA_KEY = "maskrt"


def save_model(model: MaskRCNN, path: str | os.PathLike[str]) -> None:
    """Write the weights and metadata atomically (temp file in the same folder + os.replace,
    so a crash mid-write never leaves a truncated file under `path`)."""
    from safetensors.torch import save_file

    if model.preset not in PRESETS:
        raise MaskrtError(f"only models made by build_model/load_model can be saved (preset {model.preset!r})")
    metadata = {"format": "maskrt", "version": __version__, **model.describe()}
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        save_file(tensors, temp_name, metadata={METADATA_KEY: json.dumps(metadata)})
        os.replace(temp_name, target)
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The maskrt metadata of a weights file, or a one-line MaskrtError saying what is wrong."""
    from safetensors import safe_open

    target = Path(path)
    if not target.is_file():
        raise MaskrtError(f"weights file not found: {target}")
    try:
        with safe_open(str(target), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except Exception as err:  # safetensors raises several types for a damaged header
        raise MaskrtError(f"{target} is not a readable safetensors file ({type(err).__name__})") from None
    if raw is None:
        raise MaskrtError(f"{target} is a safetensors file without maskrt metadata (not saved by maskrt)")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError:
        raise MaskrtError(f"{target}: its maskrt metadata is not valid JSON") from None
    if not isinstance(metadata, dict) or metadata.get("format") != "maskrt":
        raise MaskrtError(f"{target}: metadata format is not 'maskrt'")
    for key in ("preset", "num_classes", "config"):
        if key not in metadata:
            raise MaskrtError(f"{target}: maskrt metadata lacks {key!r}")
    return metadata


def resolve_device(name: Any = "auto") -> "torch.device":
    """`auto` | `cpu` | `cuda` | `cuda:N` (or a torch.device) -> torch.device. `auto` is the
    current CUDA device where one is present, else the CPU. A CUDA device that this machine
    lacks is a one-line MaskrtError (the CLI exits 2)."""
    import torch

    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise MaskrtError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise MaskrtError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MaskrtError(f"--device {text}: no CUDA GPU is available to PyTorch here "
                              f"(torch {torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MaskrtError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_model(path: str | os.PathLike[str], device: Any = "cpu", **overrides: Any) -> MaskRCNN:
    """Rebuild the saved model (its preset + stored config + `overrides`, by constructor
    argument name, e.g. box_score_thresh=0.3; `class_names` / `category_ids` also accepted)
    and load its weights onto `device` (see `resolve_device`; the file itself is
    device-free). Returned in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    class_names = overrides.pop("class_names", metadata.get("class_names"))
    category_ids = overrides.pop("category_ids", metadata.get("category_ids"))
    config = {**metadata["config"], **overrides}
    model = build_model(metadata["preset"], int(metadata["num_classes"]), class_names, **config)
    if category_ids is not None:
        if len(category_ids) != model.num_classes:
            raise MaskrtError(f"{len(category_ids)} category ids for {model.num_classes} classes")
        model.category_ids = list(category_ids)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise MaskrtError(f"{path}: cannot read the weights ({err})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise MaskrtError(f"{path}: weights do not fit the {metadata['preset']} model: "
                          f"{str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise MaskrtError(f"{path}: weights do not fit the {metadata['preset']} model "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. "
                          f"{(missing or unexpected)[0]})")
    return model.to(resolve_device(device)).eval()
