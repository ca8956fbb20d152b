"""Predictor: BGR images in, Detections in the same images' pixels out. Never imports torch.

    predictor = Predictor("model.onnx")            # or "model.engine" for TensorRT
    detections = predictor(cv2.imread("a.jpg"))    # boxes, scores, labels, masks, names
    many = predictor.batch([image1, image2])

The three stages are public (``preprocess``, ``infer``, ``postprocess``) so that
``maskrt bench`` can time them apart.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from maskrt.errors import MaskrtError
from maskrt.runtime.backends import Backend, open_backend
from maskrt.runtime.metadata import ModelInfo, parse_metadata
from maskrt.runtime.masks import MaskCrops, crops_from_full_masks
from maskrt.runtime.postprocess import paste_mask_crops, undo_letterbox_boxes
from maskrt.runtime.preprocess import Letterbox, letterbox_batch

# Default display threshold. Evaluation wants every detection the graph keeps (the graph has
# already applied the model's own box_score_thresh): pass conf=0.0 there.
DEFAULT_CONF = 0.5


class Detections:
    """One image's detections, in that image's pixels.

    boxes float32 [N,4] xyxy; scores float32 [N] (decreasing); labels int64 [N] indexing
    class_names (0 is background, never returned).

    Masks come two ways, both always available: ``mask_crops`` (MaskCrops: each mask's bool
    window and its (x0, y0) origin in the image; what the Predictor makes and what drawing,
    COCO encoding and serving use) and ``masks`` (bool [N,h,w], built from the crops on first
    access and kept). Construct with either ``masks=`` (full frames) or ``mask_crops=``.
    """

    def __init__(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, masks: np.ndarray | None = None,
                 class_names: Sequence[str] = (), *, mask_crops: MaskCrops | None = None) -> None:
        if (masks is None) == (mask_crops is None):
            raise MaskrtError("Detections needs exactly one of masks= (bool [N,h,w]) or mask_crops= (MaskCrops)")
        self.boxes, self.scores, self.labels = boxes, scores, labels
        self.class_names = tuple(class_names)
        self._masks = None if masks is None else np.asarray(masks)
        self._mask_crops = mask_crops

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def __repr__(self) -> str:
        h, w = self.image_size
        names = ", ".join(self.names[:5]) + (" ..." if len(self) > 5 else "")
        return f"Detections({len(self)} in a {h}x{w} image: {names})"

    @property
    def names(self) -> list[str]:
        """The class name of each detection."""
        return [self.class_names[int(label)] for label in self.labels]

    @property
    def image_size(self) -> tuple[int, int]:
        """(h, w) of the image the masks are pasted in."""
        if self._mask_crops is not None:
            return self._mask_crops.image_size
        return int(self._masks.shape[1]), int(self._masks.shape[2])

    @property
    def mask_crops(self) -> MaskCrops:
        """Each mask as its window of the image (see runtime/masks.py); cut from ``masks`` (tight
        bounding rectangles) when the Detections were made from full frames."""
        if self._mask_crops is None:
            self._mask_crops = crops_from_full_masks(self._masks)
        return self._mask_crops

    @property
    def masks(self) -> np.ndarray:
        """bool [N,h,w]: each mask in the whole image (N x h x w bytes; built once, on demand)."""
        if self._masks is None:
            self._masks = self._mask_crops.full()
        return self._masks


class Predictor:
    """A Mask R-CNN exported by maskrt, run by ONNX Runtime or TensorRT.

    model_path: ``.onnx`` or ``.engine``/``.plan`` (with its ``.json`` sidecar).
    backend: "auto" (by file suffix), "onnxruntime" or "tensorrt". device: GPU index.
    providers: ONNX Runtime providers (default CUDA when available, else CPU).
    conf: keep detections with score >= conf (default 0.5; use 0.0 for evaluation).
    plugin: TensorRT plugin library (default $MASKRT_PLUGIN_LIB or build/plugins/).
    threads: ONNX Runtime's intra-op threads (default its own: one per physical core). On a CPU,
    the video loop's other stages share the cores with them (docs/runtime.md).
    """

    def __init__(self, model_path: str | os.PathLike, backend: str = "auto", device: int = 0,
                 providers: Sequence | None = None, conf: float = DEFAULT_CONF, plugin: str | None = None,
                 threads: int | None = None) -> None:
        if not 0.0 <= conf <= 1.0:
            raise MaskrtError(f"conf must be in [0, 1], got {conf}")
        self.conf = float(conf)
        self.backend: Backend = open_backend(model_path, backend, device=device, providers=providers, plugin=plugin,
                                             threads=threads)
        self.info: ModelInfo = parse_metadata(self.backend.metadata, str(model_path))

    @classmethod
    def from_backend(cls, backend: Backend, conf: float = DEFAULT_CONF, source: str = "backend") -> "Predictor":
        """A Predictor around an already open backend (e.g. Triton's graph model called from the
        ``maskrt`` Python model, docs/serving.md); ``source`` names it in error messages."""
        if not 0.0 <= conf <= 1.0:
            raise MaskrtError(f"conf must be in [0, 1], got {conf}")
        predictor = cls.__new__(cls)
        predictor.conf = float(conf)
        predictor.backend = backend
        predictor.info = parse_metadata(backend.metadata, source)
        return predictor

    def close(self) -> None:
        """Release the backend's GPU resources (a TensorRT engine's stream, buffers, engine)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the model input."""
        return self.info.input_size

    @property
    def metadata(self) -> Mapping[str, str]:
        return self.info.raw

    def __call__(self, bgr: np.ndarray, conf: float | None = None) -> Detections:
        """One BGR uint8 image [h,w,3] -> its Detections."""
        return self.batch([bgr], conf=conf)[0]

    def batch(self, images: Sequence[np.ndarray], conf: float | None = None) -> list[Detections]:
        """Several BGR images (any sizes) -> one Detections each, in order."""
        inputs, placements = self.preprocess(images)
        return self.postprocess(self.infer(inputs), placements, conf=conf)

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[Letterbox]]:
        """BGR images -> (float32 [B,3,H,W] letterboxed input, one Letterbox each)."""
        return letterbox_batch(images, self.info.input_size, self.info.image_mean, self.info.resize_rule,
                               self.info.min_size, self.info.max_size)

    def infer(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on [B,3,H,W]. A fixed-batch graph is fed in chunks of its batch, the
        last one padded; a dynamic one in chunks of its largest accepted batch, if it has one."""
        fixed, largest = self.backend.fixed_batch, self.backend.max_batch
        step = fixed or largest
        if step is None or inputs.shape[0] == fixed or (fixed is None and inputs.shape[0] <= step):
            return self.backend.run(inputs)
        chunks = []
        for start in range(0, inputs.shape[0], step):
            chunk = inputs[start:start + step]
            count = chunk.shape[0]
            if fixed is not None and count < fixed:  # pad with copies of the last image; results dropped
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - count, axis=0)])
            outputs = self.backend.run(chunk)
            chunks.append({name: value[:count] for name, value in outputs.items()})
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

    def postprocess(self, outputs: Mapping[str, np.ndarray], placements: Sequence[Letterbox],
                    conf: float | None = None, threads: int = 1) -> list[Detections]:
        """Graph outputs -> Detections per image: keep num_dets and score >= conf, undo the
        letterbox on the boxes, paste the masks in the original image (as crops: each box's
        window only; ``Detections.masks`` builds full frames on demand). ``threads``: threads
        pasting each image's masks (``paste_mask_crops``; the same crops)."""
        threshold = self.conf if conf is None else float(conf)
        results = []
        for i, placed in enumerate(placements):
            count = int(outputs["num_dets"][i])
            scores = np.asarray(outputs["scores"][i, :count], dtype=np.float32)
            keep = np.flatnonzero(scores >= threshold)
            boxes = undo_letterbox_boxes(np.asarray(outputs["boxes"][i, keep]), placed)
            crops = paste_mask_crops(np.asarray(outputs["masks"][i, keep], dtype=np.float32), boxes, placed.orig_size,
                                     rule=self.info.paste_rule, threads=threads)
            results.append(Detections(
                boxes=boxes,
                scores=scores[keep],
                labels=np.asarray(outputs["labels"][i, keep], dtype=np.int64),
                class_names=self.info.class_names,
                mask_crops=crops,
            ))
        return results
