"""The CPU twin of the MultilevelRoIAlign plugin, called from Python through ctypes.

``multilevel_roi_align`` runs ``plugins/cpu/MultilevelRoIAlignCpu.cpp`` (plain C++, no CUDA) on
NumPy arrays. The shared library ``libmaskrt_cpu.so`` is compiled on first use with the system
C++ compiler (``g++ -O2 -shared -fPIC``) into a build folder keyed by the hash of the sources,
so an edited source is rebuilt and an unchanged one is reused across processes.

Build folder: ``$MASKRT_BUILD_DIR/cpu-<hash>/`` if that variable is set, else ``build/cpu-<hash>/``
in the source checkout, else ``~/.cache/maskrt/cpu-<hash>/``. ``$MASKRT_CPU_LIB`` names a
prebuilt library to use instead. ``$CXX`` chooses the compiler.

Never imports torch.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from maskrt.errors import MaskrtError

CPU_SOURCE_DIR = Path(__file__).resolve().parent / "cpu"
CPU_SOURCES = ("MultilevelRoIAlignCpu.cpp", "MultilevelRoIAlignCpu.h")
LIBRARY_NAME = "libmaskrt_cpu.so"
# -ffp-contract=off: no multiply-add fused into FMA (aarch64 compilers fuse by default), so the twin
# computes what the kernel (built with --fmad=false) computes, operation for operation.
COMPILE_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off")

# The contract's attribute defaults (plugins/multilevel_roi_align.json; a test checks they agree).
DEFAULT_SPATIAL_SCALES = (0.25, 0.125, 0.0625, 0.03125)
MAX_LEVELS = 5

_DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}
_MODE_CODES = {"avg": 0, "max": 1, 0: 0, 1: 1}
_library: ctypes.CDLL | None = None


def find_compiler() -> str:
    """The C++ compiler to build with: ``$CXX``, else g++, c++ or clang++ on PATH."""
    candidates = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    for name in candidates:
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise MaskrtError(
        "no C++ compiler found (tried $CXX, g++, c++, clang++): install one (e.g. `apt-get install g++`) "
        "to build the MultilevelRoIAlign CPU op, or set MASKRT_CPU_LIB to a prebuilt libmaskrt_cpu.so")


def build_root() -> Path:
    """Where built libraries go: $MASKRT_BUILD_DIR, else build/ in a writable checkout, else ~/.cache/maskrt."""
    if os.environ.get("MASKRT_BUILD_DIR"):
        return Path(os.environ["MASKRT_BUILD_DIR"])
    checkout = CPU_SOURCE_DIR.parent.parent  # plugins/ sits in the repository root in a checkout
    if (checkout / "pyproject.toml").is_file() and os.access(checkout, os.W_OK):
        return checkout / "build"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maskrt"


def source_hash(compiler: str) -> str:
    """16 hex digits over the sources, the compiler and the flags: the build folder's key."""
    digest = hashlib.sha256()
    for name in CPU_SOURCES:
        digest.update(name.encode())
        digest.update((CPU_SOURCE_DIR / name).read_bytes())
    digest.update(compiler.encode())
    digest.update(" ".join(COMPILE_FLAGS).encode())
    return digest.hexdigest()[:16]


def library_path() -> Path:
    """Path of ``libmaskrt_cpu.so``: ``$MASKRT_CPU_LIB``, the cached build, or a fresh build."""
    override = os.environ.get("MASKRT_CPU_LIB")
    if override:
        if not Path(override).is_file():
            raise MaskrtError(f"MASKRT_CPU_LIB names {override}, which does not exist")
        return Path(override)
    compiler = find_compiler()
    return build_cached_library(compiler, CPU_SOURCE_DIR / CPU_SOURCES[0], COMPILE_FLAGS,
                                build_root() / f"cpu-{source_hash(compiler)}" / LIBRARY_NAME)


def build_cached_library(compiler: str, source: Path, flags: Sequence[str], target: Path) -> Path:
    """Compile ``source`` into the shared library ``target`` unless it is already there.

    ``target``'s folder is named by a hash of what went into it, so an edited source is never
    served by a stale library. Shared by the CPU twin and the model's native RoIAlign forward.
    """
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent processes never load half a file.
    handle, temporary = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".so", dir=target.parent)
    os.close(handle)
    result = subprocess.run([compiler, *flags, "-o", temporary, str(source)], capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(temporary)
        first_error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
        raise MaskrtError(f"building {target.name} with {compiler} failed: {first_error[:300]}")
    os.replace(temporary, target)
    return target


def load_library() -> ctypes.CDLL:
    """The loaded CPU library with its C signatures declared (loaded once per process)."""
    global _library
    if _library is not None:
        return _library
    library = ctypes.CDLL(str(library_path()))
    entry = library.maskrt_multilevel_roi_align_cpu
    entry.restype = ctypes.c_int
    entry.argtypes = [
        ctypes.c_void_p,                    # rois
        ctypes.POINTER(ctypes.c_void_p),    # features
        ctypes.POINTER(ctypes.c_int64),     # heights
        ctypes.POINTER(ctypes.c_int64),     # widths
        ctypes.c_int32,                     # num_levels
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # batch, num_rois, channels
        ctypes.POINTER(ctypes.c_float),     # spatial_scales
        ctypes.c_int32, ctypes.c_int32,     # output_height, output_width
        ctypes.c_int32, ctypes.c_int32,     # sampling_ratio, aligned
        ctypes.c_float, ctypes.c_int32,     # canonical_scale, canonical_level
        ctypes.c_int32, ctypes.c_int32,     # mode, dtype
        ctypes.c_void_p,                    # output
    ]
    library.maskrt_cpu_error_string.restype = ctypes.c_char_p
    library.maskrt_cpu_error_string.argtypes = [ctypes.c_int]
    library.maskrt_cpu_roi_level.restype = ctypes.c_int32
    library.maskrt_cpu_roi_level.argtypes = [ctypes.c_float] * 4 + [
        ctypes.POINTER(ctypes.c_float), ctypes.c_int32, ctypes.c_float, ctypes.c_int32]
    _library = library
    return library


def _check_scales(spatial_scales: Sequence[float]) -> None:
    scales = [float(s) for s in spatial_scales]
    if not 1 <= len(scales) <= MAX_LEVELS:
        raise MaskrtError(f"spatial_scales must have 1..{MAX_LEVELS} entries, got {len(scales)}")
    for index, scale in enumerate(scales):
        mantissa, _ = np.frexp(scale)
        if not (scale > 0 and mantissa == 0.5):
            raise MaskrtError(f"spatial_scales[{index}] = {scale} is not a positive power of two")
        if index and scale != scales[index - 1] / 2:
            raise MaskrtError(f"spatial_scales must halve from one level to the next (finest first), got {scales}")


def multilevel_roi_align(
    rois: np.ndarray,
    features: Sequence[np.ndarray],
    spatial_scales: Sequence[float] = DEFAULT_SPATIAL_SCALES,
    output_height: int = 7,
    output_width: int = 7,
    sampling_ratio: int = 2,
    aligned: bool | int = False,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
    mode: str | int = "avg",
) -> np.ndarray:
    """Pool each RoI from the FPN level its size selects (the maskrt::MultilevelRoIAlign contract).

    rois: [B,R,4] x1, y1, x2, y2 in input-image pixels; features: L maps [B,C,H_l,W_l], finest
    first, L = len(spatial_scales). Returns [B,R,C,output_height,output_width]. All float16 in ->
    float16 out (computed in float32); anything else is computed and returned as float32.
    ``sampling_ratio <= 0`` is adaptive; ``mode`` is "avg"/"max" (or 0/1 as in the ONNX node).
    """
    rois = np.asarray(rois)
    features = [np.asarray(f) for f in features]
    if rois.ndim != 3 or rois.shape[-1] != 4:
        raise MaskrtError(f"rois must be [B,R,4], got shape {list(rois.shape)}")
    _check_scales(spatial_scales)
    if len(features) != len(spatial_scales):
        raise MaskrtError(f"{len(features)} feature maps but {len(spatial_scales)} spatial_scales")
    batch, num_rois = rois.shape[0], rois.shape[1]
    for index, feature in enumerate(features):
        if feature.ndim != 4:
            raise MaskrtError(f"features[{index}] must be [B,C,H,W], got shape {list(feature.shape)}")
        if feature.shape[0] != batch or feature.shape[1] != features[0].shape[1]:
            raise MaskrtError(f"features[{index}] has shape {list(feature.shape)}: B must be {batch} (as rois) "
                              f"and C {features[0].shape[1]} (as features[0])")
        if min(feature.shape[2:]) < 1:
            raise MaskrtError(f"features[{index}] has an empty map: shape {list(feature.shape)}")
    if mode not in _MODE_CODES:
        raise MaskrtError(f"mode must be 'avg' or 'max' (0 or 1), got {mode!r}")
    if int(output_height) < 1 or int(output_width) < 1:
        raise MaskrtError(f"output size must be >= 1, got {output_height}x{output_width}")
    if int(aligned) not in (0, 1):
        raise MaskrtError(f"aligned must be 0 or 1, got {aligned!r}")
    if not float(canonical_scale) > 0:
        raise MaskrtError(f"canonical_scale must be > 0, got {canonical_scale}")

    all_half = rois.dtype == np.float16 and all(f.dtype == np.float16 for f in features)
    dtype = np.dtype(np.float16 if all_half else np.float32)
    rois = np.ascontiguousarray(rois, dtype=dtype)
    features = [np.ascontiguousarray(f, dtype=dtype) for f in features]
    channels = features[0].shape[1]
    output = np.empty((batch, num_rois, channels, int(output_height), int(output_width)), dtype=dtype)

    levels = len(features)
    feature_pointers = (ctypes.c_void_p * levels)(*[f.ctypes.data for f in features])
    heights = (ctypes.c_int64 * levels)(*[f.shape[2] for f in features])
    widths = (ctypes.c_int64 * levels)(*[f.shape[3] for f in features])
    scales = (ctypes.c_float * levels)(*[float(s) for s in spatial_scales])
    library = load_library()
    status = library.maskrt_multilevel_roi_align_cpu(
        rois.ctypes.data, feature_pointers, heights, widths, levels, batch, num_rois, channels, scales,
        int(output_height), int(output_width), int(sampling_ratio), int(aligned), float(canonical_scale),
        int(canonical_level), _MODE_CODES[mode], _DTYPE_CODES[dtype], output.ctypes.data)
    if status != 0:
        raise MaskrtError(f"MultilevelRoIAlign CPU op: {library.maskrt_cpu_error_string(status).decode()}")
    return output


def roi_levels(
    rois: np.ndarray,
    spatial_scales: Sequence[float] = DEFAULT_SPATIAL_SCALES,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
) -> np.ndarray:
    """[..., 4] boxes -> [...] int32: the 0-based feature input each RoI pools from (C++ rule)."""
    _check_scales(spatial_scales)
    boxes = np.asarray(rois, dtype=np.float32).reshape(-1, 4)
    scales = (ctypes.c_float * len(spatial_scales))(*[float(s) for s in spatial_scales])
    library = load_library()
    levels = [library.maskrt_cpu_roi_level(*[float(v) for v in box], scales, len(spatial_scales),
                                           float(canonical_scale), int(canonical_level)) for box in boxes]
    return np.asarray(levels, dtype=np.int32).reshape(np.shape(rois)[:-1])
