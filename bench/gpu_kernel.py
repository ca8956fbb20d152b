"""The MultilevelRoIAlign CUDA kernel on a GPU: contract, torchvision and speed (checks 1, 2, 4 of
`make gpu-check`, bench/gpu_check.py).

Loads libmaskrt_kernels.so (`maskrt plugin build`) through ctypes and launches the kernel with
device memory from torch.cuda or, without torch (under compute-sanitizer), cuda-python.

- `contract`: every RoI kind (zero-size, inverted, out-of-image, huge, sub-pixel, NaN), aligned
  0/1, sampling_ratio 0/2, avg/max, B = 1 and 4, R = 0, float32 and float16, against the CPU twin
  `maskrt.plugins.cpu` (an independent C++ implementation of the contract): max |gpu - cpu| /
  max |cpu| <= TOLERANCE[dtype]. Then against torchvision's CUDA MultiScaleRoIAlign (avg, legacy:
  what it implements) at Mask R-CNN sizes.
- `small`: a few contract cases at small sizes, for compute-sanitizer (no torch needed).
- `speed`: CUDA-event time at Mask R-CNN sizes (box pooler 1000 x 256 x 7x7, mask pooler
  100 x 256 x 14x14, P2-P5 of an 800x1344 input) beside torchvision's CUDA op on the same inputs
  and the DRAM floor (output + RoI bytes over the device-to-device copy bandwidth measured in
  the same run).

    python bench/gpu_kernel.py --lib build/gpu_check/plugins/libmaskrt_kernels.so --suite contract --json out.json
    compute-sanitizer --tool memcheck python bench/gpu_kernel.py --lib ... --suite small --device cuda-python

Exit status 1 when a comparison fails. The comparison and figure code is plain NumPy and runs on
the CPU too (tests/test_gpu_check.py drives it with the kernel's host emulation).
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from maskrt.plugins.kernel_lib import KernelLibrary, RoIAlignAttributes

SCALES = (0.25, 0.125, 0.0625, 0.03125)
# The contract's bounds (plugins/README.md): relative to the largest reference value.
TOLERANCE = {"float32": 1e-5, "float16": 1e-2}
GOAL_VS_TORCHVISION = 0.8  # our time / torchvision's
GOAL_VS_FLOOR = 2.0  # our time / DRAM floor
LEVEL_SIDES = (112.0, 224.0, 448.0)  # sqrt(area) boundaries between P2|P3|P4|P5 (canonical 224 / 4)


@dataclass(frozen=True)
class KernelCase:
    """One launch: shapes, attributes, element type, and whether the special RoIs lead the list."""

    name: str
    dtype: str
    batch: int
    rois: int
    channels: int
    height: int  # network input (the padded batch)
    width: int
    attrs: RoIAlignAttributes
    special_rois: bool = True
    seed: int = 0


def special_rois(height: int, width: int) -> np.ndarray:
    """The RoI kinds the contract names (plugins/README.md, "Empty and degenerate RoIs") -> [K, 4]."""
    h, w = float(height), float(width)
    return np.array([
        [10, 12, 10, 40],                     # zero width
        [5, 30, 60, 30],                      # zero height
        [17, 17, 17, 17],                     # a point
        [80, 60, 20, 10],                     # inverted
        [-60, -40, 30, 25],                   # partly outside, top left
        [w - 30, h - 20, w + 90, h + 70],     # partly outside, bottom right
        [w + 20, 10, w + 200, 150],           # wholly outside
        [-300, -300, w + 300, h + 300],       # larger than the image
        [3.2, 4.7, 3.9, 5.1],                 # under a pixel
        [0, 0, w, h],                         # the whole image
        [np.nan, 5, 40, 50],                  # NaN coordinate: pools nothing (0)
        [111.0, 0, 111.0 + 112.0, 112.0],     # side exactly 112: the P2|P3 boundary
    ], dtype=np.float64)


def random_rois(rng: np.random.Generator, count: int, height: int, width: int,
                away_from_level_boundaries: bool = False) -> np.ndarray:
    """[count, 4] inside the image, sides log-uniform from 8 px to the image side: every level used.

    away_from_level_boundaries: no RoI within 2 % of a level boundary (so that float16
    coordinates or torchvision's own float arithmetic cannot pick another level).
    """
    rows: list[np.ndarray] = []
    while len(rows) < count:
        centre = rng.uniform((0, 0), (width, height))
        side = np.exp(rng.uniform(np.log(8), np.log((width, height))))
        box = np.concatenate([centre - side / 2, centre + side / 2]).clip(0, (width, height, width, height))
        size = math.sqrt(max(box[2] - box[0], 0) * max(box[3] - box[1], 0))
        if size < 1.0:
            continue
        if away_from_level_boundaries and any(abs(size / s - 1.0) < 0.02 for s in LEVEL_SIDES):
            continue
        rows.append(box)
    return np.array(rows, dtype=np.float64).reshape(count, 4)


def random_inputs(batch: int, num_rois: int, channels: int, size: int, dtype: np.dtype, seed: int = 0
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
    """rois [B, R, 4] (sides log-uniform 8..size px: every level used) and P2..P5 of a size x size input."""
    case = KernelCase("random", np.dtype(dtype).name, batch, num_rois, channels, size, size, RoIAlignAttributes(),
                      special_rois=False, seed=seed)
    return make_inputs(case)


def make_inputs(case: KernelCase) -> tuple[np.ndarray, list[np.ndarray]]:
    """rois [B, R, 4] and P2..P5 maps [B, C, H/4.., W/4..] in the case's dtype."""
    rng = np.random.default_rng(case.seed)
    dtype = np.dtype(case.dtype)
    features = [rng.standard_normal((case.batch, case.channels, round(case.height * s), round(case.width * s)),
                                    dtype=np.float32).astype(dtype) for s in case.attrs.spatial_scales]
    rois = np.empty((case.batch, case.rois, 4), np.float64)
    for b in range(case.batch):
        lead = special_rois(case.height, case.width)[:case.rois] if case.special_rois else np.empty((0, 4))
        rois[b, :len(lead)] = lead
        rois[b, len(lead):] = random_rois(rng, case.rois - len(lead), case.height, case.width,
                                          away_from_level_boundaries=not case.special_rois)
    return rois.astype(dtype), features


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| / max |expected| in float64; inf when got has a NaN or inf where expected is finite."""
    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        raise ValueError(f"shape {got.shape} != reference shape {expected.shape}")
    if got.size == 0:
        return 0.0
    difference = np.abs(got - expected)
    if not np.all(np.isfinite(difference)):
        return math.inf
    return float(difference.max() / max(float(np.abs(expected).max()), 1e-30))


def cpu_twin(rois: np.ndarray, features: Sequence[np.ndarray], attrs: RoIAlignAttributes) -> np.ndarray:
    """The CPU twin (plugins/cpu/) on the same inputs: the contract's reference."""
    from maskrt.plugins.cpu import multilevel_roi_align
    return multilevel_roi_align(rois, list(features), attrs.spatial_scales, attrs.output_height,
                                attrs.output_width, attrs.sampling_ratio, bool(attrs.aligned),
                                attrs.canonical_scale, attrs.canonical_level, "max" if attrs.mode else "avg")


# A kernel runner: (rois, features, attrs) -> output array. On the GPU: upload, launch, download;
# in the CPU tests: the kernel's host emulation.
KernelRunner = Callable[[np.ndarray, Sequence[np.ndarray], RoIAlignAttributes], np.ndarray]
# torchvision's MultiScaleRoIAlign on the same inputs -> [B, R, C, oh, ow] (float64 NumPy).
TorchvisionRunner = Callable[[np.ndarray, Sequence[np.ndarray], int, int, tuple[int, int]], np.ndarray]


def contract_cases(small: bool = False) -> list[KernelCase]:
    """Check 1's cases: B 1/4 x aligned 0/1 x sampling 0/2 x avg/max x float32/float16, + R = 0.

    small: 8 cases at small sizes (compute-sanitizer)."""
    cases = []
    height, width, rois, channels = (128, 160, 16, 4) if small else (256, 384, 48, 16)
    seed = 0
    for dtype in ("float32", "float16"):
        for batch in ((2,) if small else (1, 4)):
            for aligned in (0, 1):
                for sampling in (0, 2):
                    for mode in (0, 1):
                        if small and (aligned + mode + sampling // 2) % 2:
                            continue  # half of the combinations, each attribute value still present
                        seed += 1
                        attrs = RoIAlignAttributes(output_height=7 if mode == 0 else 14,
                                                   output_width=7 if mode == 0 else 14,
                                                   sampling_ratio=sampling, aligned=aligned, mode=mode)
                        name = f"b{batch}_aligned{aligned}_sr{sampling}_{'max' if mode else 'avg'}_{dtype}"
                        cases.append(KernelCase(name, dtype, batch, rois, channels, height, width, attrs, True, seed))
        cases.append(KernelCase(f"b2_zero_rois_{dtype}", dtype, 2, 0, channels, height, width,
                                RoIAlignAttributes(), False, 0))
    return cases


def torchvision_cases() -> list[KernelCase]:
    """Check 1 against torchvision: its MultiScaleRoIAlign is avg and legacy (aligned=False) only."""
    cases = []
    for dtype in ("float32", "float16"):
        for batch, sampling in ((1, 2), (4, 0)):
            attrs = RoIAlignAttributes(sampling_ratio=sampling)
            cases.append(KernelCase(f"torchvision_b{batch}_sr{sampling}_{dtype}", dtype, batch, 256, 32, 800, 1344,
                                    attrs, special_rois=False, seed=100 + batch))
    return cases


def compare_with_cpu_twin(case: KernelCase, run_kernel: KernelRunner) -> dict:
    """One contract case: kernel vs CPU twin -> a figure dict."""
    rois, features = make_inputs(case)
    got = run_kernel(rois, features, case.attrs)
    expected = cpu_twin(rois, features, case.attrs)
    error = relative_error(got, expected)
    tolerance = TOLERANCE[case.dtype]
    return {"name": f"kernel vs CPU twin, {case.name}", "value": error, "goal": f"<= {tolerance:g}",
            "unit": "max rel. error", "pass": bool(error <= tolerance), "kind": "correctness"}


def compare_with_torchvision(case: KernelCase, run_kernel: KernelRunner, run_torchvision: TorchvisionRunner) -> dict:
    """Kernel vs torchvision's MultiScaleRoIAlign on the same (dtype-rounded) inputs.

    torchvision computes in float32 here (its Mask R-CNN does so under autocast too: roi_align's
    autocast rule casts to float32); float16 inputs are widened exactly."""
    rois, features = make_inputs(case)
    got = run_kernel(rois, features, case.attrs)
    reference = run_torchvision(rois.astype(np.float32), [f.astype(np.float32) for f in features],
                                case.attrs.output_height, case.attrs.sampling_ratio, (case.height, case.width))
    error = relative_error(got, reference)
    tolerance = TOLERANCE[case.dtype]
    return {"name": f"kernel vs torchvision, {case.name}", "value": error, "goal": f"<= {tolerance:g}",
            "unit": "max rel. error", "pass": bool(error <= tolerance), "kind": "correctness"}


def speed_cases() -> list[KernelCase]:
    """Check 4: Mask R-CNN's poolers at COCO size (one 800x1344 image, C = 256)."""
    cases = []
    for dtype in ("float32", "float16"):
        cases.append(KernelCase(f"box_pooler_1000x256x7x7_{dtype}", dtype, 1, 1000, 256, 800, 1344,
                                RoIAlignAttributes(), special_rois=False, seed=7))
        cases.append(KernelCase(f"mask_pooler_100x256x14x14_{dtype}", dtype, 1, 100, 256, 800, 1344,
                                RoIAlignAttributes(output_height=14, output_width=14), special_rois=False, seed=8))
    return cases


def floor_bytes(case: KernelCase) -> int:
    """Bytes any implementation must move: every output element written once, every RoI read once.

    (Feature reads are not counted: how many a RoI needs depends on its size and on the cache.)"""
    itemsize = np.dtype(case.dtype).itemsize
    outputs = case.batch * case.rois * case.channels * case.attrs.output_height * case.attrs.output_width
    return (outputs + case.batch * case.rois * 4) * itemsize


def speed_figures(case: KernelCase, ours_ms: float, torchvision_ms: float | None, copy_gbps: float) -> list[dict]:
    """Ratios for one speed case: ours / torchvision (goal <= 0.8) and ours / DRAM floor (goal <= 2)."""
    floor_ms = floor_bytes(case) / (copy_gbps * 1e9) * 1e3
    figures = [{"name": f"kernel time, {case.name}", "value": ours_ms, "unit": "ms", "goal": None, "pass": None,
                "kind": "speed"},
               {"name": f"kernel / DRAM floor, {case.name}", "value": ours_ms / floor_ms, "unit": "x",
                "goal": f"<= {GOAL_VS_FLOOR:g}", "pass": bool(ours_ms / floor_ms <= GOAL_VS_FLOOR), "kind": "speed",
                "detail": f"floor {floor_ms * 1e3:.1f} us = {floor_bytes(case) / 1e6:.1f} MB at {copy_gbps:.0f} GB/s"}]
    if torchvision_ms is not None:
        ratio = ours_ms / torchvision_ms
        figures.append({"name": f"kernel / torchvision, {case.name}", "value": ratio, "unit": "x",
                        "goal": f"<= {GOAL_VS_TORCHVISION:g}", "pass": bool(ratio <= GOAL_VS_TORCHVISION),
                        "kind": "speed", "detail": f"torchvision {torchvision_ms * 1e3:.1f} us"})
    return figures


# ---- devices -------------------------------------------------------------------------------------

class TorchDevice:
    """Device memory and timing through torch.cuda."""

    def __init__(self) -> None:
        import torch
        self.torch = torch

    def upload(self, array: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(array)).cuda()

    def empty(self, shape, dtype: np.dtype):
        torch_dtype = self.torch.float16 if np.dtype(dtype) == np.float16 else self.torch.float32
        return self.torch.empty(tuple(shape), dtype=torch_dtype, device="cuda")

    @staticmethod
    def pointer(tensor) -> int:
        return tensor.data_ptr()

    @staticmethod
    def download(tensor) -> np.ndarray:
        return tensor.cpu().numpy()

    def stream(self) -> int:
        return self.torch.cuda.current_stream().cuda_stream

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def _sleep_cycles_per_ms(self) -> float | None:
        """Clock cycles of torch.cuda._sleep per millisecond (measured), or None without _sleep."""
        sleep = getattr(self.torch.cuda, "_sleep", None)
        if sleep is None:
            return None
        start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        sleep(1000)  # warm-up
        start.record()
        sleep(2_000_000)
        end.record()
        end.synchronize()
        return 2_000_000 / max(start.elapsed_time(end), 1e-3)

    def time_ms(self, launch: Callable[[], object], iters: int = 30, warmup: int = 3, repeats: int = 5) -> float:
        """Median over `repeats` of the GPU time per launch (CUDA events around `iters` launches).

        The GPU is first held by a sleep kernel long enough for the CPU to queue all `iters`
        launches, so that the events time the GPU's work and not Python's launch overhead."""
        torch = self.torch
        for _ in range(warmup):
            launch()
        torch.cuda.synchronize()
        wall = time.perf_counter()
        for _ in range(iters):
            launch()
        enqueue_ms = (time.perf_counter() - wall) * 1e3
        torch.cuda.synchronize()
        cycles_per_ms = getattr(self, "_cycles_per_ms", None) or self._sleep_cycles_per_ms()
        self._cycles_per_ms = cycles_per_ms
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if cycles_per_ms:
                torch.cuda._sleep(int(min(2 * enqueue_ms + 1.0, 200.0) * cycles_per_ms))
            start.record()
            for _ in range(iters):
                launch()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / iters)
        return float(np.median(samples))

    def copy_bandwidth_gbps(self, megabytes: int = 512) -> float:
        """Device-to-device copy bandwidth (bytes read + written per second), best of 5, in GB/s."""
        torch = self.torch
        count = megabytes * 2 ** 20 // 4
        source = torch.empty(count, dtype=torch.float32, device="cuda").fill_(1.0)
        target = torch.empty_like(source)
        best_ms = math.inf
        for _ in range(6):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source)
            end.record()
            end.synchronize()
            best_ms = min(best_ms, start.elapsed_time(end))
        del source, target
        return 2 * count * 4 / (best_ms * 1e-3) / 1e9

    def name(self) -> str:
        return self.torch.cuda.get_device_name(0)


class CudaPythonDevice:
    """Device memory through cuda-python (cuda.bindings.runtime): no torch (compute-sanitizer runs)."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # older cuda-python
        self.cudart = cudart
        self._allocations: list[int] = []

    def _check(self, result):
        error, *values = result if isinstance(result, tuple) else (result,)
        if int(getattr(error, "value", error)) != 0:  # cudaError_t: an enum in cuda-python
            raise RuntimeError(f"CUDA error {error}")
        return values[0] if len(values) == 1 else values

    def upload(self, array: np.ndarray):
        array = np.ascontiguousarray(array)
        pointer = int(self._check(self.cudart.cudaMalloc(max(array.nbytes, 1))))
        self._allocations.append(pointer)
        if array.nbytes:
            self._check(self.cudart.cudaMemcpy(pointer, array.ctypes.data, array.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return (pointer, array.shape, array.dtype)

    def empty(self, shape, dtype: np.dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        pointer = int(self._check(self.cudart.cudaMalloc(max(nbytes, 1))))
        self._allocations.append(pointer)
        return (pointer, tuple(shape), np.dtype(dtype))

    @staticmethod
    def pointer(buffer) -> int:
        return buffer[0]

    def download(self, buffer) -> np.ndarray:
        pointer, shape, dtype = buffer
        host = np.empty(shape, dtype)
        if host.nbytes:
            self._check(self.cudart.cudaMemcpy(host.ctypes.data, pointer, host.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return host

    @staticmethod
    def stream() -> int:
        return 0

    def synchronize(self) -> None:
        self._check(self.cudart.cudaDeviceSynchronize())

    def free_all(self) -> None:
        for pointer in self._allocations:
            self.cudart.cudaFree(pointer)
        self._allocations.clear()

    def name(self) -> str:
        props = self._check(self.cudart.cudaGetDeviceProperties(0))
        name = props.name
        return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")


def open_device(kind: str = "auto"):
    """'torch' (torch.cuda), 'cuda-python', or 'auto': torch when its CUDA works, else cuda-python."""
    if kind in ("auto", "torch"):
        try:
            import torch
            if torch.cuda.is_available():
                return TorchDevice()
        except ImportError:
            pass
        if kind == "torch":
            raise RuntimeError("torch.cuda is not available")
    return CudaPythonDevice()


def gpu_runner(library: KernelLibrary, device) -> KernelRunner:
    """Upload, launch (checking the launch status), synchronise and download."""

    def run(rois: np.ndarray, features: Sequence[np.ndarray], attrs: RoIAlignAttributes) -> np.ndarray:
        dtype = np.dtype(rois.dtype)
        batch, num_rois = rois.shape[:2]
        channels = features[0].shape[1]
        rois_d = device.upload(rois)
        features_d = [device.upload(f) for f in features]
        out_shape = (batch, num_rois, channels, attrs.output_height, attrs.output_width)
        out_d = device.empty(out_shape, dtype)
        status = library.launch(dtype, device.pointer(rois_d), [device.pointer(f) for f in features_d],
                                device.pointer(out_d), batch, num_rois, channels, [f.shape[2:] for f in features],
                                attrs, device.stream())
        if status != 0:
            raise RuntimeError(f"kernel launch failed: cudaError_t {status}")
        device.synchronize()
        return device.download(out_d)

    return run


def host_emulation_runner(library: KernelLibrary) -> KernelRunner:
    """The kernel's own per-element code run on the CPU (no GPU): the CPU tests' stand-in device."""
    return lambda rois, features, attrs: library.host_emulation(rois, features, attrs)


def torchvision_runner(device: str = "cuda") -> TorchvisionRunner | None:
    """torchvision's MultiScaleRoIAlign on `device`, or None when torchvision (with its ops) does not import."""
    try:
        import torch
        from torchvision.ops import MultiScaleRoIAlign
    except Exception:  # absent, or built for another torch
        return None

    def run(rois, features, output_size, sampling_ratio, image_size):
        pooler = MultiScaleRoIAlign([f"p{i + 2}" for i in range(len(features))], output_size, sampling_ratio)
        maps = {f"p{i + 2}": torch.from_numpy(np.ascontiguousarray(f)).to(device) for i, f in enumerate(features)}
        boxes = [torch.from_numpy(np.ascontiguousarray(r)).to(device) for r in rois]
        pooled = pooler(maps, boxes, [tuple(image_size)] * len(boxes))
        batch, num_rois = rois.shape[:2]
        return pooled.double().cpu().numpy().reshape(batch, num_rois, *pooled.shape[1:])

    return run


# ---- suites --------------------------------------------------------------------------------------

def run_contract(run_kernel: KernelRunner, run_torchvision: TorchvisionRunner | None, small: bool = False,
                 emit: Callable[[dict], None] = lambda figure: None) -> list[dict]:
    """Check 1: every contract case vs the CPU twin, then (when given) vs torchvision."""
    figures = []
    for case in contract_cases(small):
        figures.append(compare_with_cpu_twin(case, run_kernel))
        emit(figures[-1])
    if run_torchvision is not None and not small:
        for case in torchvision_cases():
            figures.append(compare_with_torchvision(case, run_kernel, run_torchvision))
            emit(figures[-1])
    return figures


def run_speed(library: KernelLibrary, device: TorchDevice, emit: Callable[[dict], None] = lambda figure: None
              ) -> list[dict]:
    """Check 4 on the GPU: copy bandwidth, then per case ours vs torchvision (interleaved) vs the floor."""
    torch = device.torch
    copy_gbps = device.copy_bandwidth_gbps()
    figures = [{"name": "device-to-device copy bandwidth", "value": copy_gbps, "unit": "GB/s", "goal": None,
                "pass": None, "kind": "speed"}]
    emit(figures[-1])
    try:
        from torchvision.ops import MultiScaleRoIAlign
    except Exception:
        MultiScaleRoIAlign = None
    for case in speed_cases():
        rois, features = make_inputs(case)
        rois_d = device.upload(rois)
        features_d = [device.upload(f) for f in features]
        out_d = device.empty((case.batch, case.rois, case.channels, case.attrs.output_height,
                              case.attrs.output_width), np.dtype(case.dtype))
        feature_hw = [f.shape[2:] for f in features]
        feature_ptrs = [device.pointer(f) for f in features_d]

        def ours() -> None:
            library.launch(np.dtype(case.dtype), device.pointer(rois_d), feature_ptrs, device.pointer(out_d),
                           case.batch, case.rois, case.channels, feature_hw, case.attrs, device.stream())

        status = library.launch(np.dtype(case.dtype), device.pointer(rois_d), feature_ptrs, device.pointer(out_d),
                                case.batch, case.rois, case.channels, feature_hw, case.attrs, device.stream())
        if status != 0:
            raise RuntimeError(f"kernel launch failed: cudaError_t {status}")
        theirs = None
        if MultiScaleRoIAlign is not None:
            pooler = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], case.attrs.output_height, case.attrs.sampling_ratio)
            maps = {f"p{i + 2}": f for i, f in enumerate(features_d)}
            boxes = [rois_d[b] for b in range(case.batch)]
            shapes = [(case.height, case.width)] * case.batch

            def theirs() -> None:
                pooler(maps, boxes, shapes)

        # Interleaved: ours, theirs, ours, theirs, ...; the median of each.
        ours_samples, theirs_samples = [], []
        for _ in range(3):
            ours_samples.append(device.time_ms(ours, repeats=3))
            if theirs is not None:
                theirs_samples.append(device.time_ms(theirs, repeats=3))
        torch.cuda.synchronize()
        for figure in speed_figures(case, float(np.median(ours_samples)),
                                    float(np.median(theirs_samples)) if theirs_samples else None, copy_gbps):
            figures.append(figure)
            emit(figure)
        del rois_d, features_d, out_d
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lib", default="build/gpu_check/plugins/libmaskrt_kernels.so",
                        help="libmaskrt_kernels.so (maskrt plugin build)")
    parser.add_argument("--suite", choices=["contract", "small", "speed"], default="contract",
                        help="contract: check 1; small: a few contract cases (compute-sanitizer); speed: check 4")
    parser.add_argument("--device", choices=["auto", "torch", "cuda-python"], default="auto",
                        help="device memory through torch.cuda or cuda-python (no torch: for compute-sanitizer)")
    parser.add_argument("--no-torchvision", action="store_true", help="skip the torchvision comparison")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    library = KernelLibrary(args.lib)
    device = open_device(args.device)
    figures: list[dict] = []

    def emit(figure: dict) -> None:
        print(json.dumps(figure), flush=True)

    if args.suite == "speed":
        if not isinstance(device, TorchDevice):
            parser.error("--suite speed needs torch.cuda")
        figures = run_speed(library, device, emit)
    else:
        run_torchvision = None if args.no_torchvision or args.suite == "small" else torchvision_runner()
        figures = run_contract(gpu_runner(library, device), run_torchvision, args.suite == "small", emit)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device.name(), "figures": figures}, indent=2))
    return 1 if any(f["pass"] is False and f["kind"] == "correctness" for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
