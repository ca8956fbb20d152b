"""The maskrt metadata a model carries (docs/design.md "ONNX graph"): parsed and checked once.

An ONNX model keeps it in ``metadata_props``; a TensorRT engine ``X.engine`` in the sidecar
``X.engine.json`` (a JSON object of the same string values).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping

from maskrt.errors import MaskrtError

# Keys without which the runtime cannot letterbox the input or name the detections.
REQUIRED_KEYS = ("class_names", "input_size", "image_mean")


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about an exported model.

    class_names[0] == "__background__"; input_size is (H, W) of the graph's ``images`` input;
    image_mean / image_std are RGB in [0, 1] (the graph normalises inside; the runtime only
    fills the letterbox padding with image_mean).
    """

    class_names: tuple[str, ...]
    input_size: tuple[int, int]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    category_ids: tuple[int, ...] = ()
    precision: str = "fp32"
    target: str = "onnx"
    paste_rule: str = "torchvision"  # how masks go into the image: "torchvision" | "detectron2"
    # How images are resized into the input: "torchvision" (fit the input) | "detectron2"
    # (ResizeShortestEdge to min_size / max_size, PIL bilinear); min/max_size 0 when not written.
    resize_rule: str = "torchvision"
    min_size: int = 0
    max_size: int = 0
    raw: Mapping[str, str] = field(default_factory=dict)


def _json_value(raw: Mapping[str, str], key: str, source: str) -> object:
    try:
        return json.loads(raw[key])
    except (TypeError, ValueError) as err:
        raise MaskrtError(f"{source}: metadata {key!r} is not valid JSON ({err})") from None


def parse_metadata(raw: Mapping[str, str], source: str) -> ModelInfo:
    """Check and parse a model's metadata strings; ``source`` names the file in error messages."""
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise MaskrtError(
            f"{source} has no maskrt metadata (missing {', '.join(missing)}): export it with `maskrt export`")
    class_names = _json_value(raw, "class_names", source)
    if not isinstance(class_names, list) or len(class_names) < 2 or not all(isinstance(n, str) for n in class_names):
        raise MaskrtError(f"{source}: metadata 'class_names' must be a JSON list of at least two names")
    input_size = _json_value(raw, "input_size", source)
    if (not isinstance(input_size, list) or len(input_size) != 2
            or not all(isinstance(s, int) and s > 0 for s in input_size)):
        raise MaskrtError(f"{source}: metadata 'input_size' must be a JSON list [H, W] of positive ints")
    image_mean = _json_value(raw, "image_mean", source)
    image_std = _json_value(raw, "image_std", source) if "image_std" in raw else [1.0, 1.0, 1.0]
    for key, value in (("image_mean", image_mean), ("image_std", image_std)):
        if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
            raise MaskrtError(f"{source}: metadata {key!r} must be a JSON list of three numbers (RGB)")
    category_ids = _json_value(raw, "category_ids", source) if "category_ids" in raw else []
    # Graphs exported before the key existed were all pasted by torchvision's rule.
    paste_rule = str(raw.get("paste_rule", "torchvision"))
    if paste_rule not in ("torchvision", "detectron2"):
        raise MaskrtError(f"{source}: metadata 'paste_rule' must be 'torchvision' or 'detectron2', got {paste_rule!r}")
    # Graphs exported before the key existed were all letterboxed by the torchvision rule.
    resize_rule = str(raw.get("resize_rule", "torchvision"))
    if resize_rule not in ("torchvision", "detectron2"):
        raise MaskrtError(f"{source}: metadata 'resize_rule' must be 'torchvision' or 'detectron2', got {resize_rule!r}")
    sizes = [_json_value(raw, key, source) if key in raw else 0 for key in ("min_size", "max_size")]
    if not all(isinstance(v, int) and v >= 0 for v in sizes):
        raise MaskrtError(f"{source}: metadata 'min_size' and 'max_size' must be non-negative integers")
    if resize_rule == "detectron2" and not all(sizes):
        raise MaskrtError(f"{source}: metadata resize_rule 'detectron2' needs 'min_size' and 'max_size'")
    return ModelInfo(
        class_names=tuple(class_names),
        input_size=(int(input_size[0]), int(input_size[1])),
        image_mean=tuple(float(v) for v in image_mean),  # type: ignore[arg-type]
        image_std=tuple(float(v) for v in image_std),  # type: ignore[arg-type]
        category_ids=tuple(int(c) for c in category_ids) if isinstance(category_ids, list) else (),
        precision=str(raw.get("precision", "fp32")),
        target=str(raw.get("target", "onnx")),
        paste_rule=paste_rule,
        resize_rule=resize_rule,
        min_size=int(sizes[0]),
        max_size=int(sizes[1]),
        raw=dict(raw),
    )
