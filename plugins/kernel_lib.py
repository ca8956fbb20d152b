"""ctypes access to libmaskrt_kernels.so: the MultilevelRoIAlign CUDA kernel behind a C ABI.

Two entry points per call:
- `host_emulation(...)`: runs the kernel's own per-element code (MultilevelRoIAlignKernel.cuh,
  compiled __host__ __device__) in a host loop on NumPy arrays. No GPU needed: the tests use it to
  check the kernel's arithmetic against independent references.
- `launch(...)`: launches the CUDA kernel on device pointers (bench/gpu_kernel.py, on a GPU).

Never imports torch.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from maskrt.errors import MaskrtError

KERNEL_LIBRARY_NAME = "libmaskrt_kernels.so"
DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}
MAX_LEVELS = 5


@dataclass(frozen=True)
class RoIAlignAttributes:
    """The op's attributes (plugins/multilevel_roi_align.json), with the contract's defaults."""

    output_height: int = 7
    output_width: int = 7
    sampling_ratio: int = 2
    aligned: int = 0
    spatial_scales: tuple[float, ...] = field(default=(0.25, 0.125, 0.0625, 0.03125))
    canonical_scale: float = 224.0
    canonical_level: int = 4
    mode: int = 0


_PARAMS = [ctypes.c_int32] * 9 + [ctypes.POINTER(ctypes.c_int32)] * 2 + [
    ctypes.POINTER(ctypes.c_float), ctypes.c_float, ctypes.c_int32]


class KernelLibrary:
    """A loaded libmaskrt_kernels.so."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise MaskrtError(f"kernel library not found: {path} (run `maskrt plugin build`)")
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        pointer_list = ctypes.POINTER(ctypes.c_void_p)
        self._lib.maskrt_multilevel_roi_align_forward.argtypes = [
            ctypes.c_int32, ctypes.c_void_p, pointer_list, ctypes.c_void_p, *_PARAMS, ctypes.c_void_p]
        self._lib.maskrt_multilevel_roi_align_forward.restype = ctypes.c_int32
        self._lib.maskrt_multilevel_roi_align_host_emulation.argtypes = [
            ctypes.c_int32, ctypes.c_void_p, pointer_list, ctypes.c_void_p, *_PARAMS]
        self._lib.maskrt_multilevel_roi_align_host_emulation.restype = ctypes.c_int32
        self._lib.maskrt_multilevel_roi_align_check.argtypes = list(_PARAMS)
        self._lib.maskrt_multilevel_roi_align_check.restype = ctypes.c_char_p

    @staticmethod
    def _param_args(batch: int, num_rois: int, channels: int, feature_hw: Sequence[tuple[int, int]],
                    attrs: RoIAlignAttributes) -> list:
        levels = len(attrs.spatial_scales)
        heights = (ctypes.c_int32 * MAX_LEVELS)(*[h for h, _ in feature_hw][:MAX_LEVELS])
        widths = (ctypes.c_int32 * MAX_LEVELS)(*[w for _, w in feature_hw][:MAX_LEVELS])
        scales = (ctypes.c_float * MAX_LEVELS)(*list(attrs.spatial_scales)[:MAX_LEVELS])
        return [batch, num_rois, channels, attrs.output_height, attrs.output_width, attrs.sampling_ratio,
                attrs.aligned, attrs.mode, levels, heights, widths, scales, attrs.canonical_scale,
                attrs.canonical_level]

    def check(self, batch: int, num_rois: int, channels: int, feature_hw: Sequence[tuple[int, int]],
              attrs: RoIAlignAttributes) -> str | None:
        """The kernel's validation message for these parameters, or None when valid."""
        message = self._lib.maskrt_multilevel_roi_align_check(
            *self._param_args(batch, num_rois, channels, feature_hw, attrs))
        return None if message is None else message.decode()

    def host_emulation(self, rois: np.ndarray, features: Sequence[np.ndarray],
                       attrs: RoIAlignAttributes) -> np.ndarray:
        """The kernel's arithmetic run on the host.

        rois [B,R,4], features L x [B,C,H_l,W_l], all float32 or all float16
        -> [B,R,C,output_height,output_width] of the same dtype.
        """
        dtype = np.dtype(rois.dtype)
        if dtype not in DTYPE_CODES or any(np.dtype(f.dtype) != dtype for f in features):
            raise MaskrtError("rois and features must all be float32 or all float16")
        if len(features) != len(attrs.spatial_scales):
            raise MaskrtError(f"{len(features)} feature maps but {len(attrs.spatial_scales)} spatial scales")
        rois = np.ascontiguousarray(rois)
        features = [np.ascontiguousarray(f) for f in features]
        batch, num_rois = rois.shape[:2]
        channels = features[0].shape[1]
        output = np.zeros((batch, num_rois, channels, attrs.output_height, attrs.output_width), dtype)
        pointers = (ctypes.c_void_p * MAX_LEVELS)(*[f.ctypes.data for f in features])
        status = self._lib.maskrt_multilevel_roi_align_host_emulation(
            DTYPE_CODES[dtype], rois.ctypes.data, pointers, output.ctypes.data,
            *self._param_args(batch, num_rois, channels, [f.shape[2:] for f in features], attrs))
        if status != 0:
            problem = self.check(batch, num_rois, channels, [f.shape[2:] for f in features], attrs)
            raise MaskrtError(f"MultilevelRoIAlign refused its parameters: {problem or 'bad dtype'}")
        return output

    def launch(self, dtype: np.dtype, rois_ptr: int, feature_ptrs: Sequence[int], output_ptr: int, batch: int,
               num_rois: int, channels: int, feature_hw: Sequence[tuple[int, int]], attrs: RoIAlignAttributes,
               stream: int = 0) -> int:
        """Launches the CUDA kernel on device pointers; returns the cudaError_t (0 = success)."""
        pointers = (ctypes.c_void_p * MAX_LEVELS)(*feature_ptrs)
        return self._lib.maskrt_multilevel_roi_align_forward(
            DTYPE_CODES[np.dtype(dtype)], rois_ptr, pointers, output_ptr,
            *self._param_args(batch, num_rois, channels, feature_hw, attrs), stream or None)
