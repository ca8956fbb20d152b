"""Inference backends: one small class per engine kind behind one interface.

A backend has ``name``, ``metadata`` (the model's maskrt metadata strings), ``fixed_batch``
(an int when the graph's batch is fixed, else None), ``max_batch`` (the largest batch a
dynamic graph accepts, None for any) and ``run(images) -> outputs``:
images float32 [B,3,H,W] RGB [0,1] letterboxed; outputs ``num_dets`` int32 [B], ``boxes``
float32 [B,D,4], ``scores`` [B,D], ``labels`` int32 [B,D], ``masks`` [B,D,M,M].
Backends are imported lazily so a Jetson without ONNX Runtime (or a PC without TensorRT)
only needs the one it uses.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import numpy as np

from maskrt.errors import MaskrtError

BACKEND_NAMES = ("auto", "onnxruntime", "tensorrt")
ENGINE_SUFFIXES = (".engine", ".plan")
OUTPUT_NAMES = ("num_dets", "boxes", "scores", "labels", "masks")


class Backend(Protocol):
    name: str
    metadata: Mapping[str, str]
    fixed_batch: int | None
    max_batch: int | None

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [B,3,H,W] -> the five named outputs as numpy arrays (see module docstring)."""
        ...


def check_model_file(model_path: str | os.PathLike) -> Path:
    """The model file as a Path, or a one-line MaskrtError when it is missing or empty."""
    path = Path(model_path)
    if not path.exists():
        raise MaskrtError(f"model file not found: {path}")
    if not path.is_file():
        raise MaskrtError(f"model path is not a file: {path}")
    if path.stat().st_size == 0:
        raise MaskrtError(f"model file is empty: {path}")
    return path


def choose_backend(path: Path, backend: str) -> str:
    """'auto' -> 'tensorrt' for .engine/.plan files, 'onnxruntime' for .onnx; check the name."""
    if backend not in BACKEND_NAMES:
        raise MaskrtError(f"unknown backend {backend!r}: choose one of {', '.join(BACKEND_NAMES)}")
    suffix = path.suffix.lower()
    if backend == "auto":
        if suffix in ENGINE_SUFFIXES:
            return "tensorrt"
        if suffix == ".onnx":
            return "onnxruntime"
        raise MaskrtError(f"cannot tell the model kind of {path}: use a .onnx, .engine or .plan file, or pass --backend")
    if backend == "onnxruntime" and suffix in ENGINE_SUFFIXES:
        raise MaskrtError(f"{path} is a TensorRT engine: ONNX Runtime cannot run it (use --backend tensorrt)")
    if backend == "tensorrt" and suffix == ".onnx":
        raise MaskrtError(f"{path} is an ONNX graph: build an engine first (`maskrt build`) or use --backend onnxruntime")
    return backend


def open_backend(model_path: str | os.PathLike, backend: str = "auto", device: int = 0,
                 providers: Sequence[str] | None = None, plugin: str | None = None,
                 threads: int | None = None) -> Backend:
    """Open ``model_path`` with the named backend ('auto' picks by file suffix). ``threads``:
    ONNX Runtime's intra-op threads (None: its default, one per physical core); a TensorRT
    engine has no such setting, so giving it one is an error."""
    if backend not in BACKEND_NAMES:  # checked before the file, so a typo is reported first
        raise MaskrtError(f"unknown backend {backend!r}: choose one of {', '.join(BACKEND_NAMES)}")
    path = check_model_file(model_path)
    kind = choose_backend(path, backend)
    if kind == "onnxruntime":
        from maskrt.runtime.backends.onnxruntime import OnnxRuntimeBackend
        return OnnxRuntimeBackend(path, device=device, providers=providers, threads=threads)
    if threads is not None:
        raise MaskrtError(f"--threads applies to ONNX Runtime models only, not the TensorRT engine {path}")
    from maskrt.runtime.backends.tensorrt import TensorRTBackend
    return TensorRTBackend(path, device=device, plugin=plugin)


def check_outputs(outputs: Mapping[str, np.ndarray], source: str) -> None:
    """Raise a MaskrtError when a graph lacks one of the contract's outputs."""
    missing = [name for name in OUTPUT_NAMES if name not in outputs]
    if missing:
        raise MaskrtError(f"{source} lacks the outputs {', '.join(missing)}: not a maskrt Mask R-CNN export")
