"""A Triton server as the runtime's backend: ``maskrt infer --server HOST:PORT`` (gRPC).

The server speaks the wire contract of docs/serving.md (``maskrt serve``, or a repository
from ``maskrt export --triton``): the client sends the BGR frame as it is and gets the final
detections back, so it needs neither the model nor ONNX Runtime / TensorRT: a Jetson can send
its camera frames to a GPU server. tritonclient (gRPC) and pycocotools (RLE decoding) are
imported lazily: ``pip install 'maskrt[serve]'``.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from maskrt.errors import MaskrtError
from maskrt.runtime.predictor import DEFAULT_CONF, Detections
from maskrt.runtime.serving import INPUT_NAME, MODEL_NAME, OUTPUT_NAMES, decode_masks, image_problem


def _import_grpc():
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        raise MaskrtError("--server needs tritonclient: pip install 'maskrt[serve]'") from None
    return grpcclient


class TritonPredictor:
    """Detections from a Triton server's ``maskrt`` model, like ``Predictor`` in process.

    server: "HOST:PORT" of Triton's gRPC endpoint. conf: keep detections with score >= conf
    (on top of the server's own threshold). timeout_s: per request.
    """

    def __init__(self, server: str, conf: float = DEFAULT_CONF, model: str = MODEL_NAME,
                 timeout_s: float = 30.0) -> None:
        if not 0.0 <= conf <= 1.0:
            raise MaskrtError(f"conf must be in [0, 1], got {conf}")
        if ":" not in server:
            raise MaskrtError(f"--server must be HOST:PORT (Triton's gRPC port, 8001 by default), got {server!r}")
        grpcclient = _import_grpc()
        from tritonclient.utils import InferenceServerException

        self._errors = InferenceServerException
        self._grpc = grpcclient
        self.server, self.model, self.conf, self.timeout_s = server, model, float(conf), timeout_s
        self.client = grpcclient.InferenceServerClient(url=server)
        try:
            ready = self.client.is_model_ready(model, client_timeout=timeout_s)
            config = self.client.get_model_config(model, as_json=True, client_timeout=timeout_s)["config"]
        except InferenceServerException as err:
            raise MaskrtError(f"cannot reach Triton at {server}: {err.message().splitlines()[0]}") from None
        if not ready:
            raise MaskrtError(f"Triton at {server} has no ready model {model!r}")
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        if "class_names" not in parameters:
            raise MaskrtError(f"model {model!r} at {server} is not a maskrt model (no class_names parameter)")
        self.class_names: tuple[str, ...] = tuple(json.loads(parameters["class_names"]))

    def __call__(self, bgr: np.ndarray, conf: float | None = None) -> Detections:
        """One BGR uint8 image [h,w,3] -> its Detections (full-frame masks decoded)."""
        return self.unpack(self.request(bgr), bgr.shape[:2], conf)

    def request(self, bgr: np.ndarray) -> dict[str, np.ndarray]:
        """Send one BGR image; its item of the contract's outputs (the loop's infer stage)."""
        batch = np.ascontiguousarray(bgr)[None]
        problem = image_problem(batch)
        if problem:
            raise MaskrtError(problem)
        item = self._grpc.InferInput(INPUT_NAME, list(batch.shape), "UINT8")
        item.set_data_from_numpy(batch)
        try:
            result = self.client.infer(self.model, [item], client_timeout=self.timeout_s,
                                       outputs=[self._grpc.InferRequestedOutput(n) for n in OUTPUT_NAMES])
        except self._errors as err:
            raise MaskrtError(f"Triton at {self.server}: {err.message().splitlines()[0]}") from None
        return {name: result.as_numpy(name)[0] for name in OUTPUT_NAMES}

    def batch(self, images: Sequence[np.ndarray], conf: float | None = None) -> list[Detections]:
        return [self(image, conf=conf) for image in images]

    def unpack(self, item: dict[str, np.ndarray], image_size: tuple[int, int], conf: float | None = None) -> Detections:
        """One item of the contract's outputs -> Detections, keeping score >= conf."""
        threshold = self.conf if conf is None else float(conf)
        count = int(item["num_dets"][0])
        scores = item["scores"][:count].astype(np.float32)
        keep = np.flatnonzero(scores >= threshold)
        masks = decode_masks([item["masks_rle"][i] for i in keep], (int(image_size[0]), int(image_size[1])))
        return Detections(boxes=item["boxes"][keep].astype(np.float32), scores=scores[keep],
                          labels=item["labels"][keep].astype(np.int64), masks=masks, class_names=self.class_names)
