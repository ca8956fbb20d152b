"""RoIAlign speed: maskrt's roi_align (native CPU forward, pure-PyTorch fallback forward, and
forward+backward on the native kernels or on the PyTorch fallback) next to ONNX Runtime's
RoiAlign (forward; C++, the stand-in for torchvision's kernel, which does not load here) on the
same FPN-sized inputs, measured side by side in one run.

    .venv/bin/python bench/ops.py [--threads 1] [--repeat 5] [--image 800x1344] [--torchvision-python tvenv/bin/python]

Cases (Mask R-CNN, 256 channels; --image 512x512 gives the FPN pooler case of a 512 px image):
- box head: 1000 RoIs, 7x7, sampling 2, on P2 (scale 1/4);
- mask head: 100 RoIs, 14x14, sampling 2, on P2;
- multilevel: 1000 RoIs of log-uniform sizes spread over P2..P5, 7x7 (ours:
  multilevel_roi_align; ORT: one RoiAlign node per level, RoIs split by level beforehand, the
  split not timed).
With --torchvision-python (an interpreter where torchvision loads; bench/torchvision_worker.py),
torchvision itself joins every case: `torchvision.ops.roi_align` (single level) or
`MultiScaleRoIAlign` (the FPN pooler), forward and forward+backward, on the same maps, RoIs and
output gradient, timed in its own process and interleaved round by round with ours; its
forward's output is compared with ours. Every library gets the same number of threads. The timed calls are interleaved (one of each per
round) so that load from other processes falls on all alike; prints min / median of the rounds
and the ratios of medians.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from maskrt.model.ops import fpn_level, multilevel_roi_align, native_cpu, roi_align
from torchvision_client import TorchvisionWorker  # bench/, beside this script

SCALES = [0.25, 0.125, 0.0625, 0.03125]
IMAGE_HW = (800, 1344)
_roi_align_module = importlib.import_module("maskrt.model.ops.roi_align")


@contextlib.contextmanager
def _pure_pytorch():
    """The fallback forward and backward (no native kernel) inside the block."""
    _roi_align_module._NATIVE_CPU = False
    try:
        yield
    finally:
        _roi_align_module._NATIVE_CPU = True


def _timed(fns: dict, repeat: int) -> dict:
    """{name: fn} -> {name: (min, median) seconds}, one call of each per round. A fn that returns
    seconds (torchvision's, timed in its own process) is taken at its word."""
    for fn in fns.values():
        fn()  # warm-up: allocations, ORT's first run, the native library's build
    times: dict = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            reported = fn()
            times[name].append(reported if isinstance(reported, float) else time.perf_counter() - start)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def _torchvision_case(worker: TorchvisionWorker | None, case: dict, ours: torch.Tensor) -> dict:
    """Sets torchvision up with `case` (arrays for bench/torchvision_worker.py's roi_setup), checks
    its forward against `ours`, and returns its timed variants ({} without a worker)."""
    if worker is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="maskrt-ops-") as name:  # the worker keeps the arrays in memory
        folder = Path(name)
        np.savez(folder / "case.npz", **case)
        worker.ask({"op": "roi_setup", "inputs": str(folder / "case.npz"), "out": str(folder / "out.npz")})
        theirs = np.load(folder / "out.npz")["output"]
    difference = float(np.abs(ours.reshape(theirs.shape).numpy() - theirs).max())
    print(f"  torchvision's forward vs ours: largest difference {difference:.2e}")
    return {"tv_fwd": lambda: worker.seconds({"op": "roi_run", "backward": False, "clock": "wall"}),
            "tv_fwd_bwd": lambda: worker.seconds({"op": "roi_run", "backward": True, "clock": "wall"})}


def _ort_session(levels: int, out_size: int, sampling: int, threads: int) -> ort.InferenceSession:
    nodes, inputs, outputs = [], [], []
    for level in range(levels):
        x, rois, idx, y = f"X{level}", f"rois{level}", f"batch_indices{level}", f"Y{level}"
        nodes.append(helper.make_node(
            "RoiAlign", [x, rois, idx], [y], mode="avg", output_height=out_size, output_width=out_size,
            sampling_ratio=sampling, spatial_scale=SCALES[level], coordinate_transformation_mode="output_half_pixel",
        ))
        inputs += [helper.make_tensor_value_info(x, TensorProto.FLOAT, None),
                   helper.make_tensor_value_info(rois, TensorProto.FLOAT, None),
                   helper.make_tensor_value_info(idx, TensorProto.INT64, None)]
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    model = helper.make_model(helper.make_graph(nodes, "roi_align", inputs, outputs), opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 10  # ORT 1.31 reads IR <= 13
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _random_rois(rng: np.random.Generator, count: int, min_side: float, max_side: float) -> np.ndarray:
    side = np.exp(rng.uniform(np.log(min_side), np.log(max_side), size=(count, 2)))
    xy = rng.uniform(0, 1, size=(count, 2)) * (np.array(IMAGE_HW[::-1]) - side)
    return np.concatenate([xy, xy + side], axis=1).astype(np.float32)


def _features(channels: int, rng: np.random.Generator) -> list[np.ndarray]:
    h, w = IMAGE_HW
    return [rng.standard_normal((1, channels, int(h * s), int(w * s))).astype(np.float32) for s in SCALES]


def bench_single_level(name: str, count: int, out_size: int, features: list[np.ndarray], rng: np.random.Generator, threads: int,
                       repeat: int, worker: TorchvisionWorker | None = None) -> None:
    # RoIs sized for P2 (sqrt area < 112): what the pooler actually sends there.
    rois = _random_rois(rng, count, 16, 110)
    feature = torch.from_numpy(features[0])
    rois5 = torch.cat([torch.zeros(count, 1), torch.from_numpy(rois)], dim=1)
    session = _ort_session(1, out_size, 2, threads)
    feeds = {"X0": features[0], "rois0": rois, "batch_indices0": np.zeros(count, np.int64)}
    ours = roi_align(feature, rois5, out_size, SCALES[0], 2)
    np.testing.assert_allclose(ours.numpy(), session.run(None, feeds)[0], rtol=1e-4, atol=1e-4)

    leaf = feature.clone().requires_grad_()
    grad = torch.randn(count, feature.shape[1], out_size, out_size)

    def forward() -> None:
        with torch.no_grad():
            roi_align(feature, rois5, out_size, SCALES[0], 2)

    def forward_pytorch() -> None:
        with _pure_pytorch():
            forward()

    def forward_backward() -> None:
        leaf.grad = None
        roi_align(leaf, rois5, out_size, SCALES[0], 2).backward(grad)

    def forward_backward_pytorch() -> None:
        with _pure_pytorch():
            forward_backward()

    torchvision = _torchvision_case(worker, {"kind": "single", "levels": 1, "feature0": features[0], "rois": rois5.numpy(),
                                             "scale": SCALES[0], "grad": grad.numpy(), "size": out_size, "sampling": 2}, ours)
    _report(name, _timed({"fwd": forward, "fwd_pytorch": forward_pytorch, "fwd_bwd": forward_backward,
                          "fwd_bwd_pytorch": forward_backward_pytorch, "ort": lambda: session.run(None, feeds),
                          **torchvision}, repeat))


def bench_multilevel(count: int, features: list[np.ndarray], rng: np.random.Generator, threads: int, repeat: int,
                     worker: TorchvisionWorker | None = None) -> None:
    rois = _random_rois(rng, count, 16, min(700, *IMAGE_HW))
    torch_features = [torch.from_numpy(f) for f in features]
    torch_rois = torch.from_numpy(rois)[None]
    levels = (fpn_level(torch.from_numpy(rois), 2, 5) - 2).numpy()
    session = _ort_session(4, 7, 2, threads)
    feeds = {}
    for level in range(4):
        picked = np.where(levels == level)[0]
        feeds.update({f"X{level}": features[level], f"rois{level}": rois[picked], f"batch_indices{level}": np.zeros(len(picked), np.int64)})
    print(f"  multilevel RoIs per level P2..P5: {np.bincount(levels, minlength=4).tolist()}")
    leaves = [f.clone().requires_grad_() for f in torch_features]
    grad = torch.randn(1, count, features[0].shape[1], 7, 7)

    def forward() -> None:
        with torch.no_grad():
            multilevel_roi_align(torch_rois, torch_features, SCALES, 7, 7, 2, False)

    def forward_pytorch() -> None:
        with _pure_pytorch():
            forward()

    def forward_backward() -> None:
        for leaf in leaves:
            leaf.grad = None
        multilevel_roi_align(torch_rois, leaves, SCALES, 7, 7, 2, False).backward(grad)

    def forward_backward_pytorch() -> None:
        with _pure_pytorch():
            forward_backward()

    with torch.no_grad():
        ours = multilevel_roi_align(torch_rois, torch_features, SCALES, 7, 7, 2, False)
    torchvision = _torchvision_case(worker, {"kind": "multi", "levels": 4, **{f"feature{i}": f for i, f in enumerate(features)},
                                             "boxes": rois, "image_hw": np.array(IMAGE_HW), "grad": grad[0].numpy(),
                                             "size": 7, "sampling": 2}, ours)
    _report(f"multilevel {count}x{features[0].shape[1]}x7x7 P2-P5",
            _timed({"fwd": forward, "fwd_pytorch": forward_pytorch, "fwd_bwd": forward_backward,
                    "fwd_bwd_pytorch": forward_backward_pytorch, "ort": lambda: session.run(None, feeds),
                    **torchvision}, repeat))


def _report(name: str, times: dict) -> None:
    def ms(key: str) -> str:
        return f"{times[key][0] * 1e3:7.1f}/{times[key][1] * 1e3:7.1f}"

    ort_median = times["ort"][1]
    print(f"{name:30s} min/median ms: native fwd {ms('fwd')} | PyTorch fwd {ms('fwd_pytorch')} | ORT fwd {ms('ort')} | "
          f"fwd+bwd native {ms('fwd_bwd')} | fwd+bwd PyTorch {ms('fwd_bwd_pytorch')} || fwd / ORT fwd: native "
          f"{times['fwd'][1] / ort_median:4.2f}, PyTorch {times['fwd_pytorch'][1] / ort_median:4.2f}")
    if "tv_fwd" in times:
        print(f"{'':30s} torchvision itself: fwd {ms('tv_fwd')} | fwd+bwd {ms('tv_fwd_bwd')} || native / torchvision: "
              f"fwd {times['fwd'][1] / times['tv_fwd'][1]:4.2f}, fwd+bwd {times['fwd_bwd'][1] / times['tv_fwd_bwd'][1]:4.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="threads for both torch and ONNX Runtime")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds (min and median reported)")
    parser.add_argument("--channels", type=int, default=256, help="feature channels")
    parser.add_argument("--image", default="800x1344", help="padded image HxW the FPN maps are sized from")
    parser.add_argument("--torchvision-python", default=None,
                        help="python of an environment where torchvision loads: time torchvision itself too "
                             "(bench/torchvision_worker.py)")
    args = parser.parse_args()
    global IMAGE_HW
    IMAGE_HW = tuple(int(v) for v in args.image.split("x"))
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    features = _features(args.channels, rng)
    native = "native CPU forward on" if native_cpu.enabled() else "native CPU forward UNAVAILABLE (PyTorch fallback)"
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, threads {args.threads}, image {args.image}, "
          f"{args.repeat} interleaved rounds, {native}")
    worker = TorchvisionWorker(args.torchvision_python, args.threads) if args.torchvision_python else None
    if worker is not None:
        print(f"torchvision itself: torch {worker.versions['torch']}, torchvision {worker.versions['torchvision']}")
    bench_single_level(f"box  1000x{args.channels}x7x7 P2", 1000, 7, features, rng, args.threads, args.repeat, worker)
    bench_single_level(f"mask  100x{args.channels}x14x14 P2", 100, 14, features, rng, args.threads, args.repeat, worker)
    bench_multilevel(1000, features, rng, args.threads, args.repeat, worker)
    if worker is not None:
        worker.close()


if __name__ == "__main__":
    main()
