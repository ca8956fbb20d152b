"""The native CPU RoIAlign (``native/roi_align_cpu.cpp``: the forward, and the backward of the
average mode) and the native CPU NMS (``native/nms_cpu.cpp``), loaded through ctypes.

``roi_align`` (``roi_align.py``) calls ``roi_align_forward`` here for float32 CPU work, and
``roi_align_backward`` for the gradient of float32 CPU average pooling (every training step), and
keeps its pure-PyTorch forward and backward as the fallback: where no C++ compiler is present,
where the build fails, under ``torch.compile`` tracing, or with ``MASKRT_NATIVE_CPU=0``. Both
compute the same numbers (to float32 rounding; tests hold both to one float64 reference).

The library is compiled on first use with the system C++ compiler, like the CPU twin of the
TensorRT plugin (``maskrt.plugins.cpu``, whose compiler and build-folder rules it shares), into
``<build root>/roi-align-cpu-<hash>/``, the hash covering the source, the compiler and the flags:
one build per source version, reused by every later process. No torch headers are involved,
so the build takes seconds. The NMS (``nms.py``'s ``batched_nms`` / ``nms`` for float32 CPU boxes)
is built the same way into ``<build root>/nms-cpu-<hash>/``, with the same fallback rules: the
PyTorch path keeps the same boxes.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from maskrt.errors import MaskrtError
from maskrt.plugins.cpu import build_cached_library, build_root, find_compiler

SOURCE = Path(__file__).resolve().parent / "native" / "roi_align_cpu.cpp"
LIBRARY_NAME = "libmaskrt_roi_align_cpu.so"
COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")
ENV_SWITCH = "MASKRT_NATIVE_CPU"

NMS_SOURCE = Path(__file__).resolve().parent / "native" / "nms_cpu.cpp"
NMS_LIBRARY_NAME = "libmaskrt_nms_cpu.so"
# No contraction of a*b+c into one FMA: the IoU must round as the PyTorch path's separate ops do.
NMS_COMPILE_FLAGS = ("-O2", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC")

_MODE_CODES = {"avg": 0, "max": 1}
# Each library once loaded, by folder name; None where it could not be had (a failed build or no
# compiler is not retried per call).
_libraries: dict[str, ctypes.CDLL | None] = {}


def _build(source: Path = SOURCE, flags: Sequence[str] = COMPILE_FLAGS, folder: str = "roi-align-cpu",
           name: str = LIBRARY_NAME) -> Path:
    compiler = find_compiler()
    digest = hashlib.sha256(source.read_bytes())
    digest.update(compiler.encode())
    digest.update(" ".join(flags).encode())
    target = build_root() / f"{folder}-{digest.hexdigest()[:16]}" / name
    return build_cached_library(compiler, source, flags, target)


def _build_and_load(source: Path, flags: Sequence[str], folder: str, name: str, what: str,
                    declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | None:
    """One native library, built on first use, loaded and its entry point declared (``declare``),
    then kept (``_libraries[folder]``); None where it cannot be had, also kept. No compiler is
    the documented fallback (silent); a failed build or load warns once."""
    if folder in _libraries:
        return _libraries[folder]
    try:
        library = ctypes.CDLL(str(_build(source, flags, folder, name)))
        declare(library)
    except (MaskrtError, OSError) as error:
        if "no C++ compiler" not in str(error):
            warnings.warn(f"maskrt: native CPU {what} unavailable, using the PyTorch path: {error}", stacklevel=3)
        library = None
    _libraries[folder] = library
    return library


def load_library() -> ctypes.CDLL | None:
    """The loaded library (built on first use), or None where it cannot be had (the fallback runs)."""
    return _build_and_load(SOURCE, COMPILE_FLAGS, "roi-align-cpu", LIBRARY_NAME, "RoIAlign", _declare_roi_align)


def _declare_roi_align(library: ctypes.CDLL) -> None:
    entry = library.maskrt_roi_align_forward_cpu
    entry.restype = ctypes.c_int
    entry.argtypes = [
        ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # levels: data, shapes, strides, scales
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,      # rois [K,5], roi levels [K] (or NULL), K
        ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,        # pooled height, width, sampling_ratio
        ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,        # aligned, mode, threads
        ctypes.c_void_p,                                       # output [K,C,ph,pw]
    ]
    backward = library.maskrt_roi_align_backward_cpu
    backward.restype = ctypes.c_int
    backward.argtypes = [
        ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # levels: gradients, shapes, scales
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,      # rois [K,5], roi levels [K] (or NULL), K
        ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,        # pooled height, width, sampling_ratio
        ctypes.c_int32, ctypes.c_int32,                        # aligned, threads
        ctypes.c_void_p,                                       # grad_output [K,C,ph,pw]
    ]


def load_nms_library() -> ctypes.CDLL | None:
    """The loaded NMS library (built on first use), or None where it cannot be had (the fallback runs)."""
    return _build_and_load(NMS_SOURCE, NMS_COMPILE_FLAGS, "nms-cpu", NMS_LIBRARY_NAME, "NMS", _declare_nms)


def _declare_nms(library: ctypes.CDLL) -> None:
    entry = library.maskrt_nms_sorted_cpu
    entry.restype = ctypes.c_int64
    entry.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,  # boxes [N,4], groups [N] (or NULL), N
                      ctypes.c_float, ctypes.c_int64, ctypes.c_void_p]   # iou threshold, max kept, keep [N] uint8


def nms_enabled() -> bool:
    """Whether the native NMS is used: as ``enabled()``, for the NMS library."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or torch.compiler.is_compiling():
        return False
    return load_nms_library() is not None


def nms_sorted(boxes: Tensor, groups: Tensor | None, iou_threshold: float, max_keep: int = -1) -> Tensor:
    """Greedy NMS of boxes already sorted by decreasing score, within groups.

    boxes [N,4] float32 CPU, groups [N] int64 or None (one group) -> positions (into the sorted
    order) of the kept boxes, int64 [K] increasing; at most ``max_keep`` (< 0: all), the first ones.
    """
    library = load_nms_library()
    if library is None:
        raise MaskrtError("the native CPU NMS library is not available")
    if boxes.dtype != torch.float32 or boxes.device.type != "cpu" or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise MaskrtError(f"native NMS takes float32 CPU boxes [N,4], got {boxes.dtype} {tuple(boxes.shape)} on {boxes.device}")
    boxes = boxes.contiguous()
    if groups is not None:
        groups = groups.to(torch.int64).contiguous()
    keep = torch.empty(boxes.shape[0], dtype=torch.uint8)
    status = library.maskrt_nms_sorted_cpu(boxes.data_ptr(), None if groups is None else groups.data_ptr(),
                                           boxes.shape[0], float(iou_threshold), int(max_keep), keep.data_ptr())
    if status == -2:
        raise MaskrtError("native NMS: out of memory")
    if status < 0:
        raise MaskrtError(f"native NMS: bad arguments (boxes {tuple(boxes.shape)})")
    return torch.nonzero(keep).flatten()


def enabled() -> bool:
    """Whether the native forward is used: not switched off by ``MASKRT_NATIVE_CPU=0``, not inside
    a torch.compile trace, and the library loads."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or torch.compiler.is_compiling():
        return False
    return load_library() is not None


def _kernel_levels(levels: Tensor | None, count: int) -> Tensor | None:
    """levels as the kernels take them: int32, a level outside the maps (fpn_level of a NaN box) -1."""
    if levels is None:
        return None
    return torch.where((levels >= 0) & (levels < count), levels, -1).to(torch.int32).contiguous()


def _check_status(status: int, what: str, arguments: str) -> None:
    """The RoIAlign kernels' return codes: 0 done, 1 a bad argument, 2 out of memory."""
    if status == 2:
        raise MaskrtError(f"{what}: out of memory")
    if status != 0:
        raise MaskrtError(f"{what}: bad arguments ({arguments})")


def _check_rois(rois: Tensor) -> None:
    if rois.dtype != torch.float32 or rois.dim() != 2 or rois.shape[1] != 5:
        raise MaskrtError(f"native RoIAlign takes float32 rois [K,5], got {rois.dtype} {tuple(rois.shape)}")


def roi_align_forward(features: Sequence[Tensor], spatial_scales: Sequence[float], rois: Tensor, levels: Tensor | None,
                      pooled: tuple[int, int], sampling_ratio: int, aligned: bool, mode: str) -> Tensor:
    """RoIAlign forward of every RoI at its level, in one call.

    features: 1 to 5 maps [N,C,H_l,W_l] float32 on the CPU, any strides (channels-last is the
    fast layout); spatial_scales: one per map; rois [K,5] float32 (batch index, x1, y1, x2, y2);
    levels [K] int (index into features; one outside them gives a zero output) or None (all at
    map 0) -> [K,C,ph,pw] float32, contiguous.
    """
    library = load_library()
    if library is None:
        raise MaskrtError("the native CPU RoIAlign library is not available")
    for feature in features:
        if feature.dtype != torch.float32 or feature.device.type != "cpu" or feature.dim() != 4:
            raise MaskrtError(f"native RoIAlign takes float32 CPU maps [N,C,H,W], got {feature.dtype} "
                              f"{tuple(feature.shape)} on {feature.device}")
    _check_rois(rois)
    count = len(features)
    rois = rois.contiguous()
    levels = _kernel_levels(levels, count)
    channels = features[0].shape[1]
    output = torch.empty((rois.shape[0], channels, pooled[0], pooled[1]), dtype=torch.float32, device=rois.device)
    pointers = (ctypes.c_void_p * count)(*[f.data_ptr() for f in features])
    shapes = (ctypes.c_int64 * (4 * count))(*[v for f in features for v in f.shape])
    strides = (ctypes.c_int64 * (4 * count))(*[v for f in features for v in f.stride()])
    scales = (ctypes.c_float * count)(*[float(s) for s in spatial_scales])
    status = library.maskrt_roi_align_forward_cpu(
        count, pointers, shapes, strides, scales, rois.data_ptr(), None if levels is None else levels.data_ptr(),
        rois.shape[0], pooled[0], pooled[1], int(sampling_ratio), int(aligned), _MODE_CODES[mode],
        torch.get_num_threads(), output.data_ptr())
    _check_status(status, "native RoIAlign", f"maps {[tuple(f.shape) for f in features]}, rois {tuple(rois.shape)}, "
                                             f"output {pooled}, mode {mode!r}")
    return output


def roi_align_backward(grad_output: Tensor, shapes: Sequence[Sequence[int]], spatial_scales: Sequence[float],
                       rois: Tensor, levels: Tensor | None, sampling_ratio: int, aligned: bool) -> list[Tensor]:
    """Gradient of the average-mode ``roi_align_forward`` w.r.t. every map, in one call.

    grad_output [K,C,ph,pw]; shapes: each map's (N, C, H_l, W_l); rois, levels, spatial_scales,
    sampling_ratio, aligned as the forward's -> one float32 gradient [N,C,H_l,W_l] per map,
    contiguous NCHW (the kernel adds C-vectors into channels-last buffers, copied to NCHW at the
    end: the strides the graph op registers, which traced graphs rely on).
    """
    library = load_library()
    if library is None:
        raise MaskrtError("the native CPU RoIAlign library is not available")
    _check_rois(rois)
    if grad_output.dim() != 4 or grad_output.shape[0] != rois.shape[0] or not shapes or any(
            len(shape) != 4 or int(shape[1]) != grad_output.shape[1] for shape in shapes):
        raise MaskrtError(f"native RoIAlign backward: grad_output must be [K,C,ph,pw] with the maps' C for "
                          f"{rois.shape[0]} rois, got {tuple(grad_output.shape)} for maps {[tuple(s) for s in shapes]}")
    count = len(shapes)
    grad_output = grad_output.to(torch.float32).contiguous()
    rois = rois.contiguous()
    levels = _kernel_levels(levels, count)
    grads = [torch.zeros((n, h, w, c), dtype=torch.float32) for n, c, h, w in shapes]
    pointers = (ctypes.c_void_p * count)(*[g.data_ptr() for g in grads])
    flat_shapes = (ctypes.c_int64 * (4 * count))(*[int(v) for shape in shapes for v in shape])
    scales = (ctypes.c_float * count)(*[float(s) for s in spatial_scales])
    status = library.maskrt_roi_align_backward_cpu(
        count, pointers, flat_shapes, scales, rois.data_ptr(), None if levels is None else levels.data_ptr(),
        rois.shape[0], grad_output.shape[2], grad_output.shape[3], int(sampling_ratio), int(aligned),
        torch.get_num_threads(), grad_output.data_ptr())
    _check_status(status, "native RoIAlign backward", f"maps {[tuple(s) for s in shapes]}, rois {tuple(rois.shape)}, "
                                                      f"grad_output {tuple(grad_output.shape)}")
    return [g.permute(0, 3, 1, 2).contiguous() for g in grads]
