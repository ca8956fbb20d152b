"""ONNX Runtime backend: CUDA provider when present, else CPU; maskrt custom ops on demand."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from maskrt.errors import MaskrtError
from maskrt.runtime.backends import OUTPUT_NAMES

# A TensorRT-target graph carries MultilevelRoIAlign nodes in domain "maskrt"; ONNX Runtime
# runs them only with the CPU reference kernels of maskrt.plugins.ort registered.
CUSTOM_OP_MARKER = b"MultilevelRoIAlign"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def default_providers(device: int = 0) -> list:
    """CUDA (on ``device``) then CPU when this ONNX Runtime has CUDA, else just CPU."""
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """Runs an exported ``.onnx`` graph with ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, path: Path, device: int = 0, providers: Sequence | None = None,
                 threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MaskrtError("ONNX Runtime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from None
        self.path = Path(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: warnings about providers are noise here
        # ORT's intra-op threads spin-wait between operators by default, burning the cores that
        # the video loop's other stages (decode, letterbox, drawing, encoding) run on. Measured on
        # the 2-core machine (shared): engine alone 2.45 vs 1.57 images/s, 1080p loop 1.52 vs
        # 1.22 FPS without spinning (docs/runtime.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # threads: intra-op threads (default ORT's, one per physical core). `maskrt serve
        # --threads 1 --instances 2` runs two single-threaded graphs side by side instead of one
        # graph on two threads: less CPU per image on a CPU server (docs/serving.md).
        if threads is not None:
            if threads < 1:
                raise MaskrtError(f"ONNX Runtime threads must be at least 1, got {threads}")
            options.intra_op_num_threads = int(threads)
        with open(self.path, "rb") as handle:
            needs_custom_ops = CUSTOM_OP_MARKER in handle.read()
        model: str | bytes = str(self.path)
        if needs_custom_ops:
            model = self._register_custom_ops(options, model)
        chosen = list(providers) if providers else default_providers(device)
        try:
            self.session = ort.InferenceSession(model, sess_options=options, providers=chosen)
        except Exception as err:  # ORT raises its own pybind types: report one line
            raise MaskrtError(f"cannot load {self.path} with ONNX Runtime: {_first_line(err)}") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != "images":
            raise MaskrtError(f"{self.path} must have one input named 'images', has {[i.name for i in inputs]}")
        batch_dim = inputs[0].shape[0]
        self.fixed_batch: int | None = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.max_batch: int | None = None  # ONNX Runtime takes any batch of a dynamic graph
        output_names = [o.name for o in self.session.get_outputs()]
        missing = [name for name in OUTPUT_NAMES if name not in output_names]
        if missing:
            raise MaskrtError(f"{self.path} lacks the outputs {', '.join(missing)}: not a maskrt Mask R-CNN export")
        self.providers = self.session.get_providers()

    @staticmethod
    def _register_custom_ops(options: object, model: str) -> str | bytes:
        """Register the maskrt ops with ``options``; return what to give the session (the path, or
        the graph rewritten for the onnxruntime-extensions fallback: maskrt.plugins.ort decides)."""
        try:
            from maskrt.plugins.ort import prepare_model, register_custom_ops
        except ImportError as err:
            raise MaskrtError(
                f"the model has maskrt::MultilevelRoIAlign nodes but maskrt.plugins.ort is unavailable ({err}); "
                "export with --target onnx for ONNX Runtime") from None
        register_custom_ops(options)
        return prepare_model(model)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [B,3,H,W] -> {num_dets, boxes, scores, labels, masks} (numpy)."""
        try:
            values = self.session.run(list(OUTPUT_NAMES), {"images": np.ascontiguousarray(images, dtype=np.float32)})
        except Exception as err:
            raise MaskrtError(f"ONNX Runtime failed on {self.path}: {_first_line(err)}") from None
        return dict(zip(OUTPUT_NAMES, values))
