"""A stand-in for the graph model of a ``maskrt export --triton`` repository on a Triton that
has only the Python backend (the one nvidia-pytriton bundles, on a CPU machine): the ONNX graph
``1/model.onnx`` run by ONNX Runtime, with the same inputs and outputs as the
``onnxruntime_onnx`` model it replaces (``num_dets`` as [B, 1]). Written with
``maskrt export --triton REPO --graph-backend python``."""
from __future__ import annotations

from pathlib import Path

import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

from maskrt.runtime.backends import OUTPUT_NAMES
from maskrt.runtime.backends.onnxruntime import OnnxRuntimeBackend


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import json

        folder = Path(args["model_repository"]) / args["model_version"]
        self.backend = OnnxRuntimeBackend(folder / "model.onnx", providers=["CPUExecutionProvider"])
        # A batching config declares num_dets [1] per item; a fixed-batch one (max_batch_size 0) [B].
        self.batched = int(json.loads(args["model_config"]).get("max_batch_size", 0)) > 0

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "images").as_numpy()
            outputs = self.backend.run(images)
            if self.batched:
                outputs["num_dets"] = outputs["num_dets"].reshape(-1, 1)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, outputs[name]) for name in OUTPUT_NAMES]))
        return responses
