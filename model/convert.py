"""Import Mask R-CNN R50-FPN checkpoints from torchvision and detectron2 into our `r50_fpn` model.

Two entry points, both strict (every source key is consumed, dropped by a stated rule, or
reported; every model key is filled or reported, all in one `MaskrtError` line):

- `from_torchvision(state_dict_or_path, num_classes=91, **overrides)`: torchvision's
  `maskrcnn_resnet50_fpn` (v1). Our parameter names are torchvision's, so this is a 1:1 copy,
  plus the legacy names of the published 2019 checkpoint (torchvision renames them in its
  modules' `_load_from_state_dict`; we rename them here).
- `from_detectron2(path, **overrides)`: a detectron2 model-zoo Mask R-CNN R50-FPN `.pkl`
  (read by a restricted unpickler that builds numpy arrays and plain containers, nothing
  else) or a `.pth` holding `{"model": state_dict}`. Names are mapped, the background class
  moves from detectron2's last index to our index 0, and detectron2's BGR 0-255 input
  convention becomes our RGB [0, 1] one by flipping the stem conv's input channels and
  choosing `image_mean` / `image_std`.

docs/convert.md lists what each conversion reproduces and the differences that remain.
"""
from __future__ import annotations

import builtins
import codecs
import logging
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
from torch import Tensor

from maskrt.errors import MaskrtError
from maskrt.model.mask_rcnn import MaskRCNN
from maskrt.model.ops.anchors import detectron2_cell_anchors
from maskrt.model.presets import build_model

log = logging.getLogger(__name__)

# --- class lists ---------------------------------------------------------------------------

# COCO's 80 "thing" categories as (category id, name): the ids have gaps (12, 26, 29, 30, 45,
# 66, 68, 69, 71, 83 are unused), the names are the annotation file's.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
BACKGROUND = "__background__"


def coco91_class_names() -> list[str]:
    """torchvision's 91-entry COCO list: index = COCO category id, unused ids are "N/A"."""
    names = [BACKGROUND] + ["N/A"] * 90
    for category_id, name in COCO_CATEGORIES:
        names[category_id] = name
    return names


def coco80_class_names() -> list[str]:
    """detectron2's contiguous 80 COCO classes, with our background at index 0 (81 entries)."""
    return [BACKGROUND] + [name for _, name in COCO_CATEGORIES]


def coco80_category_ids() -> list[int]:
    """COCO category id of each of the 81 labels of `coco80_class_names` (0 = background)."""
    return [0] + [category_id for category_id, _ in COCO_CATEGORIES]


# --- model settings each source was trained and evaluated with ----------------------------

# torchvision's `maskrcnn_resnet50_fpn` defaults (MaskRCNN / FasterRCNN / MultiScaleRoIAlign).
TORCHVISION_SETTINGS: dict[str, Any] = {
    "stride_in_1x1": False,
    "min_size": 800, "max_size": 1333,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_test": 1000, "rpn_nms_thresh": 0.7,
    "box_score_thresh": 0.05, "box_nms_thresh": 0.5, "box_detections_per_img": 100,
    "roi_aligned": False, "box_sampling_ratio": 2, "mask_sampling_ratio": 2,
}

# detectron2's config defaults + configs/Base-RCNN-FPN.yaml (what the model zoo's
# mask_rcnn_R_50_FPN_{1x,3x} were evaluated with).
DETECTRON2_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)  # MODEL.PIXEL_MEAN, 0-255 scale
DETECTRON2_PIXEL_STD_BGR = (1.0, 1.0, 1.0)  # MODEL.PIXEL_STD
DETECTRON2_SETTINGS: dict[str, Any] = {
    "stride_in_1x1": True,  # RESNETS.STRIDE_IN_1X1 (MSRA weights)
    "min_size": 800, "max_size": 1333,  # INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST
    "rpn_pre_nms_top_n_test": 1000,  # RPN.PRE_NMS_TOPK_TEST, per FPN level
    "rpn_post_nms_top_n_test": 1000,  # RPN.POST_NMS_TOPK_TEST, per image at test time
    "rpn_nms_thresh": 0.7,  # RPN.NMS_THRESH
    "box_score_thresh": 0.05,  # ROI_HEADS.SCORE_THRESH_TEST
    "box_nms_thresh": 0.5,  # ROI_HEADS.NMS_THRESH_TEST
    "box_detections_per_img": 100,  # TEST.DETECTIONS_PER_IMAGE
    "roi_aligned": True,  # POOLER_TYPE "ROIAlignV2" = aligned (half-pixel) RoIAlign
    "box_sampling_ratio": 0, "mask_sampling_ratio": 0,  # POOLER_SAMPLING_RATIO 0 = adaptive
    # detectron2's own inference rules (MaskRCNN's docstring; docs/convert.md cites the source).
    "anchor_rule": "detectron2",  # unrounded cell anchors, level strides (anchor_generator.py)
    "selection_rule": "detectron2",  # proposal_utils.py, fast_rcnn.py, postprocessing.py
    "level_rule": "detectron2",  # poolers.py assign_boxes_to_levels
    "resize_rule": "detectron2",  # ResizeShortestEdge: int(x + 0.5), PIL bilinear
    "paste_rule": "detectron2",  # mask_ops.py paste_masks_in_image
}

_NORM_FIELDS = "(weight|bias|running_mean|running_var)"


# --- shared: reading files, strict loading -------------------------------------------------

def _short_list(items: list[str], limit: int = 6) -> str:
    """`a, b, c (+N more)`: keeps the error one readable line however many keys are off."""
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MaskrtError(f"{path}: not a weights-only checkpoint (torch.load(weights_only=True) "
                          f"refused it: {first_line}); save only the state dict") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MaskrtError(f"{path}: cannot read checkpoint: {first_line}") from None


def _check_file(path: str | Path, suffixes: tuple[str, ...]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MaskrtError(f"checkpoint not found: {path}")
    if path.suffix not in suffixes:
        raise MaskrtError(f"{path}: unsupported checkpoint type {path.suffix or '(none)'!r}; "
                          f"expected one of {', '.join(suffixes)}")
    return path


def _as_tensor(key: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
        # A copy: arrays unpickled from bytes are read-only, which torch tensors cannot share.
        return torch.from_numpy(np.array(value, copy=True, order="C"))
    raise MaskrtError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a numeric array")


def _load_strictly(model: MaskRCNN, state: Mapping[str, Tensor], source: str,
                   unexpected: list[str] | None = None,
                   source_names: Mapping[str, str] | None = None) -> None:
    """Copy `state` into `model`, or raise one MaskrtError line naming every missing key,
    unexpected key and shape mismatch. `unexpected` carries source keys no rule understood;
    `source_names` maps our key -> the source's key, so that problems name what the user
    can find in their file."""
    names = source_names or {}
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = list(unexpected or []) + [names.get(key, key) for key in state if key not in expected]
    mismatched = [f"{names.get(key, key)} {tuple(state[key].shape)} vs model {key} {tuple(expected[key].shape)}"
                  if key in names and names[key] != key else
                  f"{key} {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
                  for key in expected if key in state and state[key].shape != expected[key].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} model key(s): {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_short_list(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_short_list(mismatched, 3)}")
    if problems:
        raise MaskrtError(f"{source} does not match the r50_fpn model: " + "; ".join(problems))
    model.load_state_dict({key: value.to(expected[key].dtype) for key, value in state.items()},
                          strict=True)


def _set_class_metadata(model: MaskRCNN, category_ids: list[int]) -> None:
    model.category_ids = list(category_ids)


# --- torchvision ---------------------------------------------------------------------------

# torchvision < 0.13 names (the published maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth uses them);
# torchvision's FPN, RPNHead and MaskRCNNHeads rename them when loading. Same renames here.
_TORCHVISION_LEGACY_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$"),
     r"backbone.fpn.\1.\2.0.\3"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
)
_TORCHVISION_LEGACY_MASK_FCN = re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$")


def _torchvision_key(key: str) -> str:
    for pattern, replacement in _TORCHVISION_LEGACY_RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    match = _TORCHVISION_LEGACY_MASK_FCN.match(key)
    if match:
        return f"roi_heads.mask_head.{int(match[1]) - 1}.0.{match[2]}"
    return key


def read_torchvision_state_dict(source: Mapping[str, Tensor] | str | Path) -> dict[str, Tensor]:
    """A torchvision state dict from a mapping, a `.pth` (weights only; a `{"model": ...}`
    wrapper as torchvision's reference scripts save is unwrapped) or a `.safetensors` file."""
    if isinstance(source, (str, Path)):
        path = _check_file(source, (".pth", ".pt", ".safetensors"))
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file
            try:
                loaded: Any = load_file(str(path))
            except (SafetensorError, OSError) as error:
                raise MaskrtError(f"{path}: cannot read safetensors file: {error}") from None
        else:
            loaded = _torch_load(path)
        if isinstance(loaded, Mapping) and "model" in loaded and isinstance(loaded["model"], Mapping):
            loaded = loaded["model"]
        name = str(path)
    else:
        loaded, name = source, "state dict"
    if not isinstance(loaded, Mapping):
        raise MaskrtError(f"{name}: expected a state dict (name -> tensor), got {type(loaded).__name__}")
    return {str(key): _as_tensor(str(key), value) for key, value in loaded.items()}


def from_torchvision(state_dict: Mapping[str, Tensor] | str | Path, num_classes: int = 91,
                     **overrides: Any) -> MaskRCNN:
    """Our `r50_fpn` model holding torchvision `maskrcnn_resnet50_fpn` (v1) weights.

    Args:
        state_dict: the state dict, or a path to a `.pth` / `.safetensors` file.
        num_classes: including background (torchvision's COCO models: 91, one slot per COCO
            category id, unused ids named "N/A").
        overrides: MaskRCNN constructor arguments (e.g. `box_score_thresh=0.5`,
            `class_names=[...]`, `category_ids=[...]`), applied over torchvision's defaults.

    `num_batches_tracked` entries (a trainable BatchNorm's counter) are dropped; any other key
    that does not fit raises one MaskrtError line listing all of them.
    """
    source = read_torchvision_state_dict(state_dict)
    renamed: dict[str, Tensor] = {}
    source_names: dict[str, str] = {}
    duplicates: list[str] = []
    dropped: list[str] = []
    for key, value in source.items():
        if key.endswith(".num_batches_tracked"):
            dropped.append(key)
            continue
        our_key = _torchvision_key(key)
        if our_key in renamed:  # both the legacy and the current name: which one is meant?
            duplicates.append(key)
            continue
        renamed[our_key] = value
        source_names[our_key] = key
    if dropped:
        log.info("from_torchvision: dropped %d num_batches_tracked entries", len(dropped))
    class_names = overrides.pop("class_names", None)
    category_ids = overrides.pop("category_ids", None)
    if class_names is None and num_classes == 91:
        class_names = coco91_class_names()
        category_ids = category_ids if category_ids is not None else list(range(91))
    if category_ids is None:
        category_ids = list(range(num_classes))
    if len(category_ids) != num_classes:
        raise MaskrtError(f"category_ids has {len(category_ids)} entries, expected num_classes={num_classes}")
    cls_weight = renamed.get("roi_heads.box_predictor.cls_score.weight")
    if cls_weight is not None and cls_weight.ndim == 2 and cls_weight.shape[0] != num_classes:
        raise MaskrtError(f"the checkpoint has {cls_weight.shape[0]} classes (cls_score rows), "
                          f"not num_classes={num_classes}: pass num_classes={cls_weight.shape[0]}")
    settings = {**TORCHVISION_SETTINGS, **overrides}
    model = build_model("r50_fpn", num_classes, class_names, **settings)
    _load_strictly(model, renamed, "torchvision checkpoint", unexpected=duplicates,
                   source_names=source_names)
    _set_class_metadata(model, category_ids)
    return model.eval()


# --- detectron2: reading .pkl safely -------------------------------------------------------

def _numpy_reconstructors() -> dict[tuple[str, str], Any]:
    """The globals a pickled numpy array needs, under both numpy 1 (`numpy.core`) and numpy 2
    (`numpy._core`) module names, resolved from the installed numpy."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return allowed


# Plain containers (Python 2 pickles say `__builtin__`); `_codecs.encode` is how protocol-2
# pickles written by Python 3 spell bytes; OrderedDict is what state dicts are.
_SAFE_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes", "str", "int",
                  "float", "complex", "bool", "slice")
_ALLOWED_OTHER: dict[tuple[str, str], Any] = {
    **{(module, name): getattr(builtins, name)
       for module in ("builtins", "__builtin__") for name in _SAFE_BUILTINS},
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): codecs.encode,
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only numpy-array and plain-container globals.

    A pickle can call any importable callable while loading (`os.system`, ...); refusing
    every other global in `find_class` means such a file raises before anything runs.
    """

    def __init__(self, file: Any, path: Path) -> None:
        # latin1: detectron2 reads its .pkl files this way, which also decodes Python 2 pickles.
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allowed = {**_numpy_reconstructors(), **_ALLOWED_OTHER}

    def find_class(self, module: str, name: str) -> Any:
        allowed = self._allowed.get((module, name))
        if allowed is None:
            raise MaskrtError(f"{self._path}: refusing to unpickle global {module}.{name}: "
                              "a detectron2 checkpoint holds only numpy arrays")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise MaskrtError(f"{self._path}: refusing a pickle with persistent ids "
                          "(a torch.save file? use .pth for those)")


def load_detectron2_pickle(path: str | Path) -> dict[str, Any]:
    """Read a detectron2 `.pkl` checkpoint with `_ArraysOnlyUnpickler`."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = _ArraysOnlyUnpickler(file, path).load()
    except MaskrtError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError) as error:
        raise MaskrtError(f"{path}: not a readable pickle: {type(error).__name__}: {error}") from None
    if not isinstance(data, dict):
        raise MaskrtError(f"{path}: expected a dict at the top of the pickle, got {type(data).__name__}")
    return data


def read_detectron2_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The `model` state dict of a detectron2 `.pkl` (model-zoo format: `{"model": {name:
    array}, "__author__": ...}`) or `.pth` (`{"model": state_dict}`), as tensors."""
    path = _check_file(path, (".pkl", ".pth", ".pt"))
    data = load_detectron2_pickle(path) if path.suffix == ".pkl" else _torch_load(path)
    if path.suffix != ".pkl" and isinstance(data, Mapping) and "model" not in data \
            and data and all(isinstance(value, Tensor) for value in data.values()):
        data = {"model": data}  # a bare state dict, as detectron2's own loader accepts
    if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
        found = ", ".join(map(str, list(data)[:5])) if isinstance(data, Mapping) else type(data).__name__
        raise MaskrtError(f"{path}: no 'model' state dict (found {found}); Caffe2/Detectron1 "
                          "checkpoints are not supported, only detectron2's own")
    if data.get("matching_heuristics"):
        log.info("%s asks for detectron2's fuzzy name matching; keys are matched exactly here", path)
    return {str(key): _as_tensor(str(key), value) for key, value in data["model"].items()}


# --- detectron2: names and layouts ---------------------------------------------------------

def _background_last_to_first(tensor: Tensor) -> Tensor:
    """cls_score rows [K real classes..., background] -> [background, K real classes...]."""
    return torch.cat([tensor[-1:], tensor[:-1]], dim=0)


def _prepend_zero_class(tensor: Tensor, per_class: int) -> Tensor:
    """Add a zero block of `per_class` rows for our background class 0 in front. detectron2
    predicts no box deltas / mask for the background, and no one reads ours for label 0."""
    return torch.cat([tensor.new_zeros((per_class, *tensor.shape[1:])), tensor], dim=0)


# (detectron2 key pattern, our key from the match, value transform or None)
_Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str], Callable[[Tensor], Tensor] | None]


def _d2_rules(num_real_classes: int, flip_stem_channels: bool) -> list[_Rule]:
    """The name and layout rules of a detectron2 Mask R-CNN R50-FPN state dict."""
    def class_specific(per_class: int) -> Callable[[Tensor], Tensor]:
        def transform(tensor: Tensor) -> Tensor:
            if tensor.shape[0] == per_class and num_real_classes > 1:
                # Class-agnostic regression / mask (CLS_AGNOSTIC_*): the same output for every
                # class is what detectron2 uses, so repeating it per class is exact.
                tensor = tensor.repeat(num_real_classes, *([1] * (tensor.ndim - 1)))
            return _prepend_zero_class(tensor, per_class)
        return transform

    def stem(tensor: Tensor) -> Tensor:
        # Input channels BGR -> RGB: our conv sees R,G,B where detectron2's saw B,G,R.
        return tensor.flip(1) if flip_stem_channels else tensor

    rule = re.compile
    return [
        (rule(r"backbone\.bottom_up\.stem\.conv1\.weight"), lambda m: "backbone.body.conv1.weight", stem),
        (rule(rf"backbone\.bottom_up\.stem\.conv1\.norm\.{_NORM_FIELDS}"),
         lambda m: f"backbone.body.bn1.{m[1]}", None),
        (rule(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([1-3])\.weight"),
         lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight", None),
        (rule(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([1-3])\.norm\.{_NORM_FIELDS}"),
         lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}", None),
        (rule(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.weight"),
         lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight", None),
        (rule(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.norm\.{_NORM_FIELDS}"),
         lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}", None),
        (rule(r"backbone\.fpn_lateral([2-5])\.(weight|bias)"),
         lambda m: f"backbone.fpn.inner_blocks.{int(m[1]) - 2}.0.{m[2]}", None),
        (rule(r"backbone\.fpn_output([2-5])\.(weight|bias)"),
         lambda m: f"backbone.fpn.layer_blocks.{int(m[1]) - 2}.0.{m[2]}", None),
        (rule(r"proposal_generator\.rpn_head\.conv\.(weight|bias)"), lambda m: f"rpn.head.conv.0.0.{m[1]}", None),
        (rule(r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)"),
         lambda m: f"rpn.head.cls_logits.{m[1]}", None),
        (rule(r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)"),
         lambda m: f"rpn.head.bbox_pred.{m[1]}", None),
        (rule(r"roi_heads\.box_head\.fc([12])\.(weight|bias)"),
         lambda m: f"roi_heads.box_head.fc{int(m[1]) + 5}.{m[2]}", None),
        (rule(r"roi_heads\.box_predictor\.cls_score\.(weight|bias)"),
         lambda m: f"roi_heads.box_predictor.cls_score.{m[1]}", _background_last_to_first),
        (rule(r"roi_heads\.box_predictor\.bbox_pred\.(weight|bias)"),
         lambda m: f"roi_heads.box_predictor.bbox_pred.{m[1]}", class_specific(4)),
        (rule(r"roi_heads\.mask_head\.mask_fcn([1-4])\.(weight|bias)"),
         lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}", None),
        (rule(r"roi_heads\.mask_head\.deconv\.(weight|bias)"),
         lambda m: f"roi_heads.mask_predictor.conv5_mask.{m[1]}", None),
        (rule(r"roi_heads\.mask_head\.predictor\.(weight|bias)"),
         lambda m: f"roi_heads.mask_predictor.mask_fcn_logits.{m[1]}", class_specific(1)),
    ]


def _pixel_stat_rgb01(value: Tensor, key: str, input_format: str) -> list[float]:
    """detectron2's `pixel_mean`/`pixel_std` buffer ([3,1,1], 0-255, input order) as our RGB
    [0, 1] `image_mean`/`image_std`."""
    flat = value.reshape(-1).double()
    if flat.numel() != 3:
        raise MaskrtError(f"detectron2 {key} has {flat.numel()} values, expected 3")
    channels = flat.flip(0) if input_format == "BGR" else flat
    return [float(v) / 255.0 for v in channels]


_D2_CELL_ANCHORS = re.compile(r"proposal_generator\.anchor_generator\.cell_anchors\.(\d+)")


def _check_cell_anchors(source: dict[str, Tensor], sizes: list[list[float]],
                        aspect_ratios: list[list[float]], path: str | Path) -> None:
    """Old detectron2 checkpoints saved the RPN's cell anchors. They are read, not ignored:
    they must be the anchors of `sizes` x `aspect_ratios`, else the file was trained with an
    anchor setting the caller has not passed."""
    for key in [key for key in source if _D2_CELL_ANCHORS.fullmatch(key)]:
        level = int(_D2_CELL_ANCHORS.fullmatch(key)[1])  # type: ignore[index]
        saved = source.pop(key).double()
        if level >= len(sizes):
            raise MaskrtError(f"{path}: {key} but the model has {len(sizes)} anchor levels")
        ratios = aspect_ratios[level] if len(aspect_ratios) > 1 else aspect_ratios[0]
        expected = detectron2_cell_anchors(sizes[level], list(ratios)).double()
        if saved.shape != expected.shape or not torch.allclose(saved, expected, atol=1e-3):
            raise MaskrtError(f"{path}: {key} holds anchors {saved.reshape(-1, 4)[:, 2:].mul(2).tolist()} "
                              f"(w, h), not those of sizes {sizes[level]} x aspect ratios {list(ratios)}: "
                              "pass anchor_sizes / aspect_ratios")


def from_detectron2(path: str | Path, input_format: Literal["BGR", "RGB"] = "BGR",
                    **overrides: Any) -> MaskRCNN:
    """Our `r50_fpn` model holding a detectron2 Mask R-CNN R50-FPN checkpoint.

    Args:
        path: `.pkl` (detectron2 model-zoo format, read without running pickled code) or
            `.pth` (`{"model": state_dict}`, read with `torch.load(weights_only=True)`).
        input_format: the checkpoint's INPUT.FORMAT ("BGR" for the model zoo's MSRA models).
            BGR: the stem conv's input channels are flipped so the model takes RGB.
        overrides: MaskRCNN constructor arguments (`class_names`, `category_ids`,
            `box_score_thresh`, ...) applied over detectron2's test settings.

    The number of classes comes from `cls_score` (K real classes + background -> our
    num_classes = K + 1). For K = 80 the classes are COCO's, with their category ids.
    `pixel_mean`/`pixel_std` entries, when the checkpoint has them, set image_mean/image_std;
    otherwise detectron2's defaults (BGR [103.530, 116.280, 123.675], std 1) are used.
    """
    if input_format not in ("BGR", "RGB"):
        raise MaskrtError(f"input_format must be 'BGR' or 'RGB', got {input_format!r}")
    source = read_detectron2_checkpoint(path)
    cls_weight = source.get("roi_heads.box_predictor.cls_score.weight")
    if cls_weight is None or cls_weight.ndim != 2 or cls_weight.shape[0] < 2:
        raise MaskrtError(f"{path}: no usable roi_heads.box_predictor.cls_score.weight; "
                          "not a detectron2 Mask R-CNN checkpoint")
    num_real_classes = int(cls_weight.shape[0]) - 1

    # Pixel statistics: read from the checkpoint when present, else detectron2's defaults.
    default_mean = torch.tensor(DETECTRON2_PIXEL_MEAN_BGR if input_format == "BGR"
                                else DETECTRON2_PIXEL_MEAN_BGR[::-1])
    mean = _pixel_stat_rgb01(source.pop("pixel_mean", default_mean), "pixel_mean", input_format)
    std = _pixel_stat_rgb01(source.pop("pixel_std", torch.tensor(DETECTRON2_PIXEL_STD_BGR)),
                            "pixel_std", input_format)

    # Old files saved the RPN's cell anchors: they must be the anchors the model will use.
    anchor_sizes = overrides.get("anchor_sizes", [[32], [64], [128], [256], [512]])
    aspect_ratios = overrides.get("aspect_ratios", [[0.5, 1.0, 2.0]])
    _check_cell_anchors(source, [list(level) for level in anchor_sizes],
                        [list(level) for level in aspect_ratios], path)
    rules = _d2_rules(num_real_classes, flip_stem_channels=input_format == "BGR")
    ours: dict[str, Tensor] = {}
    source_names: dict[str, str] = {}
    unknown: list[str] = []
    dropped: list[str] = []
    for key, value in source.items():
        if key.endswith(".num_batches_tracked"):  # SyncBN/BN counters: no meaning at inference
            dropped.append(key)
            continue
        for pattern, target, transform in rules:
            match = pattern.fullmatch(key)
            if match:
                our_key = target(match)
                ours[our_key] = transform(value) if transform is not None else value
                source_names[our_key] = key
                break
        else:
            unknown.append(key)
    if dropped:
        log.info("from_detectron2: dropped %d num_batches_tracked entries", len(dropped))

    class_names = overrides.pop("class_names", None)
    category_ids = overrides.pop("category_ids", None)
    if class_names is None and num_real_classes == 80:
        class_names = coco80_class_names()
        category_ids = category_ids if category_ids is not None else coco80_category_ids()
    if category_ids is None:
        category_ids = list(range(num_real_classes + 1))
    if len(category_ids) != num_real_classes + 1:
        raise MaskrtError(f"category_ids has {len(category_ids)} entries, expected "
                          f"{num_real_classes + 1} (background + {num_real_classes} classes)")
    settings = {**DETECTRON2_SETTINGS, "image_mean": mean, "image_std": std, **overrides}
    model = build_model("r50_fpn", num_real_classes + 1, class_names, **settings)
    _load_strictly(model, ours, f"detectron2 checkpoint {path}", unexpected=unknown,
                   source_names=source_names)
    _set_class_metadata(model, category_ids)
    return model.eval()


__all__ = ["from_torchvision", "from_detectron2", "read_torchvision_state_dict",
           "read_detectron2_checkpoint", "load_detectron2_pickle", "coco91_class_names",
           "coco80_class_names", "coco80_category_ids", "COCO_CATEGORIES",
           "TORCHVISION_SETTINGS", "DETECTRON2_SETTINGS"]
