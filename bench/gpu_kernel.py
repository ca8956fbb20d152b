"""GPU harness for the MultilevelRoIAlign CUDA kernel (needs an NVIDIA GPU; not run on CPU-only machines).

Loads libmaskrt_kernels.so (`maskrt plugin build`) through ctypes, launches the kernel on random
Mask R-CNN-like inputs with device memory from torch.cuda or, without torch's CUDA, cuda-python,
and:
1. compares with the CPU twin `maskrt.plugins.cpu` (an independent C++ implementation of the
   contract): max |gpu - cpu| / max |cpu| <= 1e-5 for float32, <= 1e-2 for float16;
   and, when torchvision's CUDA ops import, with torchvision.ops.MultiScaleRoIAlign (avg, legacy);
2. times it with CUDA events against torchvision's CUDA MultiScaleRoIAlign when importable,
   beside the memory-bandwidth floor (output + RoI bytes at the GPU's peak DRAM bandwidth).

    python bench/gpu_kernel.py --lib build/plugins/libmaskrt_kernels.so [--json out.json]
    compute-sanitizer --tool memcheck python bench/gpu_kernel.py --iters 1 --warmup 0 --no-torchvision

Exit status 1 when a comparison fails.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from maskrt.plugins.kernel_lib import KernelLibrary, RoIAlignAttributes

SCALES = (0.25, 0.125, 0.0625, 0.03125)
TOLERANCE = {"float32": 1e-5, "float16": 1e-2}


def random_inputs(batch: int, num_rois: int, channels: int, size: int, dtype: np.dtype, seed: int = 0):
    """FPN maps P2..P5 of a size x size input and RoIs of log-uniform sizes (8..size px): every level used."""
    rng = np.random.default_rng(seed)
    features = [rng.standard_normal((batch, channels, int(size * s), int(size * s)), dtype=np.float32).astype(dtype)
                for s in SCALES]
    centres = rng.uniform(0, size, (batch, num_rois, 2))
    sides = np.exp(rng.uniform(np.log(8), np.log(size), (batch, num_rois, 2)))
    rois = np.concatenate([centres - sides / 2, centres + sides / 2], axis=-1).clip(0, size).astype(dtype)
    return rois, features


class TorchDevice:
    """Device memory and timing through torch.cuda."""

    def __init__(self) -> None:
        import torch
        self.torch = torch

    def upload(self, array: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(array)).cuda()

    def empty(self, shape, dtype: np.dtype):
        torch_dtype = self.torch.float16 if np.dtype(dtype) == np.float16 else self.torch.float32
        return self.torch.empty(shape, dtype=torch_dtype, device="cuda")

    @staticmethod
    def pointer(tensor) -> int:
        return tensor.data_ptr()

    @staticmethod
    def download(tensor) -> np.ndarray:
        return tensor.cpu().numpy()

    def stream(self) -> int:
        return self.torch.cuda.current_stream().cuda_stream

    def time_ms(self, launch, iters: int, warmup: int) -> float:
        for _ in range(warmup):
            launch()
        start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            launch()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / max(iters, 1)

    def peak_bandwidth_gbps(self) -> float | None:
        props = self.torch.cuda.get_device_properties(0)
        clock_khz = getattr(props, "memory_clock_rate", None)
        bus_bits = getattr(props, "memory_bus_width", None)
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None

    def name(self) -> str:
        return self.torch.cuda.get_device_name(0)


class CudaPythonDevice:
    """Device memory and timing through cuda-python (cuda.bindings.runtime)."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # older cuda-python
        self.cudart = cudart
        self._buffers: list[tuple[int, tuple, np.dtype]] = []

    def _check(self, result):
        error, *values = result if isinstance(result, tuple) else (result,)
        if int(error) != 0:
            raise RuntimeError(f"CUDA error {error}")
        return values[0] if len(values) == 1 else values

    def upload(self, array: np.ndarray):
        array = np.ascontiguousarray(array)
        pointer = self._check(self.cudart.cudaMalloc(array.nbytes))
        self._check(self.cudart.cudaMemcpy(pointer, array.ctypes.data, array.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return (int(pointer), array.shape, array.dtype)

    def empty(self, shape, dtype: np.dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return (int(self._check(self.cudart.cudaMalloc(max(nbytes, 1)))), tuple(shape), np.dtype(dtype))

    @staticmethod
    def pointer(buffer) -> int:
        return buffer[0]

    def download(self, buffer) -> np.ndarray:
        pointer, shape, dtype = buffer
        host = np.empty(shape, dtype)
        self._check(self.cudart.cudaMemcpy(host.ctypes.data, pointer, host.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return host

    @staticmethod
    def stream() -> int:
        return 0

    def time_ms(self, launch, iters: int, warmup: int) -> float:
        for _ in range(warmup):
            launch()
        start = self._check(self.cudart.cudaEventCreate())
        end = self._check(self.cudart.cudaEventCreate())
        self._check(self.cudart.cudaEventRecord(start, 0))
        for _ in range(iters):
            launch()
        self._check(self.cudart.cudaEventRecord(end, 0))
        self._check(self.cudart.cudaEventSynchronize(end))
        return float(self._check(self.cudart.cudaEventElapsedTime(start, end))) / max(iters, 1)

    def peak_bandwidth_gbps(self) -> float | None:
        attr = self.cudart.cudaDeviceAttr
        try:
            clock_khz = self._check(self.cudart.cudaDeviceGetAttribute(attr.cudaDevAttrMemoryClockRate, 0))
            bus_bits = self._check(self.cudart.cudaDeviceGetAttribute(attr.cudaDevAttrGlobalMemoryBusWidth, 0))
        except (AttributeError, RuntimeError):
            return None
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None

    def name(self) -> str:
        props = self._check(self.cudart.cudaGetDeviceProperties(0))
        return props.name.decode(errors="replace").rstrip("\x00")


def open_device():
    try:
        import torch
        if torch.cuda.is_available():
            return TorchDevice()
    except ImportError:
        pass
    return CudaPythonDevice()


def torchvision_pooler(sampling_ratio: int):
    """torchvision's CUDA MultiScaleRoIAlign, or None when torchvision (with CUDA ops) is missing."""
    try:
        import torch
        from torchvision.ops import MultiScaleRoIAlign
    except Exception:  # torchvision absent or built without this torch's ops
        return None
    pooler = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], output_size=7, sampling_ratio=sampling_ratio)
    return pooler, torch


def run(args: argparse.Namespace) -> dict:
    library = KernelLibrary(args.lib)
    device = open_device()
    report: dict = {"device": device.name(), "batch": args.batch, "rois_per_image": args.rois,
                    "channels": args.channels, "input_size": args.size, "results": []}
    peak = args.peak_gbps or device.peak_bandwidth_gbps()
    attrs = RoIAlignAttributes(output_height=7, output_width=7, sampling_ratio=args.sampling_ratio)
    failures = 0
    for dtype_name in args.dtypes:
        dtype = np.dtype(dtype_name)
        rois, features = random_inputs(args.batch, args.rois, args.channels, args.size, dtype, args.seed)
        rois_d = device.upload(rois)
        features_d = [device.upload(f) for f in features]
        out_shape = (args.batch, args.rois, args.channels, 7, 7)
        out_d = device.empty(out_shape, dtype)
        feature_hw = [f.shape[2:] for f in features]

        def launch() -> None:
            status = library.launch(dtype, device.pointer(rois_d), [device.pointer(f) for f in features_d],
                                    device.pointer(out_d), args.batch, args.rois, args.channels, feature_hw,
                                    attrs, device.stream())
            if status != 0:
                raise RuntimeError(f"kernel launch failed: cudaError_t {status}")

        launch()
        got = device.download(out_d).astype(np.float64)

        from maskrt.plugins.cpu import multilevel_roi_align as cpu_twin
        expected = cpu_twin(rois, features, SCALES, 7, 7, args.sampling_ratio, False, 224.0, 4, "avg")
        expected = expected.astype(np.float64)
        relative = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))
        ok = relative <= TOLERANCE[dtype_name]
        failures += not ok
        entry = {"dtype": dtype_name, "max_relative_error_vs_cpu_twin": relative, "tolerance": TOLERANCE[dtype_name],
                 "ok": ok}

        entry["maskrt_ms"] = device.time_ms(launch, args.iters, args.warmup)
        output_bytes = int(np.prod(out_shape)) * dtype.itemsize
        floor_bytes = output_bytes + rois.nbytes  # every output written once, every RoI read once
        all_bytes = floor_bytes + sum(f.nbytes for f in features)
        if peak:
            entry["bandwidth_floor_ms"] = floor_bytes / (peak * 1e9) * 1e3
            entry["all_features_once_ms"] = all_bytes / (peak * 1e9) * 1e3
            entry["peak_gbps"] = peak

        pooler = None if args.no_torchvision else torchvision_pooler(args.sampling_ratio)
        if pooler is not None:
            module, torch = pooler
            maps = {f"p{i + 2}": torch.from_numpy(f).cuda() for i, f in enumerate(features)}
            boxes = [torch.from_numpy(rois[b]).cuda() for b in range(args.batch)]
            image_shapes = [(args.size, args.size)] * args.batch

            def torchvision_launch():
                return module(maps, boxes, image_shapes)

            reference = torchvision_launch().float().cpu().numpy().reshape(got.shape)
            tv_relative = float(np.abs(got - reference).max() / max(np.abs(reference).max(), 1e-30))
            entry["max_relative_error_vs_torchvision"] = tv_relative
            tv_ok = tv_relative <= TOLERANCE[dtype_name]
            failures += not tv_ok
            entry["ok"] = entry["ok"] and tv_ok
            entry["torchvision_ms"] = device.time_ms(torchvision_launch, args.iters, args.warmup)
        report["results"].append(entry)
        print(json.dumps(entry))
    report["failures"] = failures
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lib", default="build/plugins/libmaskrt_kernels.so")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rois", type=int, default=512, help="RoIs per image")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=800, help="square input side (multiple of 32)")
    parser.add_argument("--sampling-ratio", type=int, default=2)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-gbps", type=float, default=None, help="DRAM bandwidth when it cannot be queried")
    parser.add_argument("--no-torchvision", action="store_true")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
