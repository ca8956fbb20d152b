"""The ``maskrt`` model of Triton's Python backend: the wire contract of docs/serving.md.

Runs only inside Triton (it imports ``triton_python_backend_utils``). The model's config
parameters say what computes the graph:

- ``model_path`` (+ ``backend``, ``plugin``, ``threads``): a Predictor in this process, as
  ``maskrt serve`` writes it (``threads``: ONNX Runtime's intra-op threads, `--threads`);
- ``graph_model`` (+ ``maskrt_metadata``, ``graph_fixed_batch``): the graph is another model of
  the repository (TensorRT plan or ONNX Runtime), called by BLS, as ``maskrt export --triton``
  writes it; letterbox and postprocessing run here.

Each execute() receives the requests the dynamic batcher grouped: their images (any sizes) go
through one ``Predictor.batch`` call; a malformed request gets its own error response and the
others are answered.
"""
from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

from maskrt.errors import MaskrtError
from maskrt.runtime.backends import OUTPUT_NAMES as GRAPH_OUTPUT_NAMES
from maskrt.runtime.predictor import Predictor
from maskrt.runtime.serving import INPUT_NAME, OUTPUT_NAMES, image_problem, pack_detections


class BlsGraphBackend:
    """The runtime Backend interface over a graph model of the same Triton server (BLS)."""

    name = "triton-bls"

    def __init__(self, model_name: str, metadata: dict[str, str], fixed_batch: int | None,
                 max_batch: int | None) -> None:
        self.model_name = model_name
        self.metadata = metadata
        self.fixed_batch = fixed_batch
        self.max_batch = max_batch

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [B,3,H,W] -> the graph's five outputs, from one BLS request."""
        request = pb_utils.InferenceRequest(
            model_name=self.model_name, requested_output_names=list(GRAPH_OUTPUT_NAMES),
            inputs=[pb_utils.Tensor("images", np.ascontiguousarray(images, dtype=np.float32))])
        response = request.exec()
        if response.has_error():
            raise MaskrtError(f"graph model {self.model_name}: {response.error().message()}")
        outputs = {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in GRAPH_OUTPUT_NAMES}
        outputs["num_dets"] = outputs["num_dets"].reshape(-1)  # [B] or [B,1] by the graph's config
        return outputs


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        conf = float(parameters.get("conf", "0.5"))
        self.slots = int(parameters["detections"])
        if parameters.get("model_path"):
            # `threads`: ONNX Runtime's intra-op threads (`maskrt serve --threads`); open_backend
            # refuses it for a TensorRT engine.
            threads = int(parameters["threads"]) if parameters.get("threads") else None
            self.predictor = Predictor(parameters["model_path"], backend=parameters.get("backend", "auto"), conf=conf,
                                       plugin=parameters.get("plugin") or None, threads=threads)
        else:
            fixed = int(parameters.get("graph_fixed_batch", "0")) or None
            backend = BlsGraphBackend(parameters["graph_model"], json.loads(parameters["maskrt_metadata"]), fixed,
                                      int(parameters.get("graph_max_batch", "0")) or None)
            self.predictor = Predictor.from_backend(backend, conf=conf, source=parameters["graph_model"])

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        images, owners = [], []  # the images of all requests, and (request index, count) each
        for index, request in enumerate(requests):
            batch = pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
            problem = image_problem(batch)
            if problem:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(problem))
                continue
            images.extend(batch[i] for i in range(batch.shape[0]))
            owners.append((index, batch.shape[0]))
        if not owners:
            return responses
        try:
            detections = self.predictor.batch(images)
        except MaskrtError as err:
            for index, _ in owners:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err)))
            return responses
        start = 0
        for index, count in owners:
            packed = [pack_detections(d, self.slots) for d in detections[start:start + count]]
            start += count
            tensors = [pb_utils.Tensor(name, np.stack([p[name] for p in packed])) for name in OUTPUT_NAMES]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses
