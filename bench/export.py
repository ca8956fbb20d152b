"""ONNX Runtime (CPU) vs PyTorch eager on the same model and the same image, in one run.

    .venv/bin/python bench/export.py [--weights W.safetensors] [--size 256] [--iters 10] [--threads 1]

Without --weights, a seeded `edge` model (random weights, box_score_thresh 0.0 so that the
heads see a full set of detections, the worst case). Two pairs are timed, median per image:
- graph:   `session.run` on the letterboxed [1,3,S,S] input vs eager `model.detect_batch`;
- runtime: `maskrt.runtime.Predictor(bgr)` (letterbox + graph + box undo + mask paste) vs
           eager `model([rgb])` (resize + detect + paste), i.e. what a user calls.
Both sides get the same thread count. The goal (issue "ONNX export"): runtime <= 0.6x eager.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2


def median_ms(function, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="maskrt .safetensors (default: a seeded random edge model)")
    parser.add_argument("--size", type=int, default=256, help="square export size (multiple of 32)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="threads for both torch and ONNX Runtime")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from maskrt.export.calibration import DEFAULT_CALIB_DIR, calibration_files
    from maskrt.export.onnx_export import export_onnx
    from maskrt.model import build_model, load_model
    from maskrt.runtime.predictor import Predictor
    from maskrt.runtime.preprocess import letterbox

    torch.set_num_threads(args.threads)
    size = args.size
    if args.weights:
        model = load_model(args.weights, min_size=size, max_size=size).eval()
    else:
        torch.manual_seed(0)
        model = build_model("edge", 7, min_size=size, max_size=size, box_score_thresh=0.0).eval()
    bgr = cv2.imread(str(calibration_files(DEFAULT_CALIB_DIR)[0]))
    bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_LINEAR)  # a native-size image
    rgb = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float() / 255.0
    letterboxed = letterbox(bgr, (size, size), model.image_mean)[0][None]

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", (size, size))
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        predictor = Predictor(path, backend="onnxruntime")
        # Same thread budget for the runtime's own session.
        predictor_backend = getattr(predictor, "backend", None)
        if predictor_backend is not None and hasattr(predictor_backend, "session"):
            predictor_backend.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        with torch.no_grad():
            images = torch.from_numpy(letterboxed)
            eager_graph = median_ms(lambda: model.detect_batch(images), args.iters)
            eager_full = median_ms(lambda: model([rgb]), args.iters)
        ort_graph = median_ms(lambda: session.run(None, {"images": letterboxed}), args.iters)
        runtime_full = median_ms(lambda: predictor(bgr, conf=0.0), args.iters)
        num_dets = int(session.run(None, {"images": letterboxed})[0][0])

    figures = {
        "size": size, "threads": args.threads, "iters": args.iters, "num_dets": num_dets,
        "weights": args.weights or "seeded random edge",
        "eager_detect_batch_ms": round(eager_graph, 1), "ort_graph_ms": round(ort_graph, 1),
        "graph_ratio": round(ort_graph / eager_graph, 3),
        "eager_model_call_ms": round(eager_full, 1), "runtime_predictor_ms": round(runtime_full, 1),
        "runtime_ratio": round(runtime_full / eager_full, 3),
    }
    print(f"{size}x{size}, {args.threads} thread(s), {num_dets} detections, median of {args.iters}:")
    print(f"  graph   : ONNX Runtime {ort_graph:7.1f} ms  vs eager detect_batch {eager_graph:7.1f} ms  "
          f"-> {figures['graph_ratio']:.2f}x")
    print(f"  runtime : Predictor    {runtime_full:7.1f} ms  vs eager model([img]) {eager_full:7.1f} ms  "
          f"-> {figures['runtime_ratio']:.2f}x  (goal <= 0.6x)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
