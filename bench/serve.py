"""Triton serving against the in-process Predictor, same model, one run (docs/serving.md).

    .venv/bin/python bench/serve.py                      # exports a seeded edge model at 320x320
    .venv/bin/python bench/serve.py --model m.onnx --sizes 480x640 1080x1920 --rounds 3

For each image size: images/s and p50/p99 latency of the in-process ``Predictor`` called
sequentially, and of `maskrt serve` (Triton, gRPC, dynamic batching) at concurrency 1, 4 and 8
(one gRPC client per thread). The four measurements are interleaved in ``--rounds`` rounds; the
report gives each figure's median over the rounds (and min of p50). Goals (the issue's): batch-1
latency overhead (Triton c1 p50 / in-process p50 - 1) <= 10 %; Triton's c8 throughput >= the
in-process sequential rate. Client and server share the machine's cores: say so with the figures.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def export_edge(folder: Path, size: int) -> Path:
    import torch

    from maskrt.export.onnx_export import export_onnx
    from maskrt.model import build_model

    torch.manual_seed(0)
    names = ["__background__", "circle", "square", "triangle"]
    model = build_model("edge", num_classes=len(names), class_names=names, min_size=size, max_size=size)
    model.eval()
    return export_onnx(model, folder / f"edge{size}.onnx", input_size=(size, size))


def summary(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000.0
    return {"images_per_s": len(ms) / wall_s, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


def run_in_process(predictor, image: np.ndarray, count: int) -> dict[str, float]:
    latencies = []
    began = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        predictor(image)
        latencies.append(time.perf_counter() - t0)
    return summary(latencies, time.perf_counter() - began)


def run_triton(grpc_url: str, image: np.ndarray, concurrency: int, count: int) -> dict[str, float]:
    import tritonclient.grpc as grpcclient

    per_thread = max(1, count // concurrency)
    latencies: list[float] = []
    lock = threading.Lock()
    clients = [grpcclient.InferenceServerClient(grpc_url) for _ in range(concurrency)]
    item = grpcclient.InferInput("image", [1, *image.shape], "UINT8")
    item.set_data_from_numpy(image[None])

    def worker(client) -> None:
        mine = []
        for _ in range(per_thread):
            t0 = time.perf_counter()
            result = client.infer("maskrt", [item], client_timeout=300)
            result.as_numpy("masks_rle")
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    for client in clients:
        client.close()
    return summary(latencies, wall)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=".onnx (default: a seeded untrained edge model exported at --export-size)")
    parser.add_argument("--export-size", type=int, default=320)
    parser.add_argument("--sizes", nargs="+", default=["480x640", "1080x1920"], help="image sizes HxW")
    parser.add_argument("--count", type=int, default=24, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conf", type=float, default=0.0,
                        help="served threshold (default 0: the untrained model's ~0.3 scores fill every slot, "
                        "so the masks and their RLE cost what a full frame of detections costs)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    from maskrt.runtime import Predictor
    from maskrt.runtime.commands import synthetic_shapes_image

    work = Path(tempfile.mkdtemp(prefix="maskrt-bench-serve-"))
    model = Path(args.model) if args.model else export_edge(work, args.export_size)
    predictor = Predictor(model, conf=args.conf)
    http, grpc, metrics = free_ports(3)
    log = work / "serve.out"
    server = subprocess.Popen([sys.executable, "-m", "maskrt", "serve", "--model", str(model), "--conf", str(args.conf),
                               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    report: dict[str, object] = {"model": str(model), "input_size": list(predictor.input_size), "rounds": args.rounds,
                                 "count": args.count, "sizes": {}}
    try:
        deadline = time.monotonic() + 180
        while "ready on Triton" not in log.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"maskrt serve did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.25)
        url = f"127.0.0.1:{grpc}"
        for size in args.sizes:
            h, w = (int(v) for v in size.lower().split("x"))
            image = synthetic_shapes_image(h, w, seed=0)
            detections = len(predictor(image))
            run_in_process(predictor, image, 3)  # warm-up both
            run_triton(url, image, 8, 16)
            rounds: dict[str, list[dict[str, float]]] = {"in-process": [], "triton c1": [], "triton c4": [],
                                                         "triton c8": []}
            for _ in range(args.rounds):  # interleaved: each round measures all four
                rounds["in-process"].append(run_in_process(predictor, image, args.count))
                for c in (1, 4, 8):
                    rounds[f"triton c{c}"].append(run_triton(url, image, c, args.count))
            figures = {}
            for name, runs in rounds.items():
                figures[name] = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
                figures[name]["p50_ms_min"] = float(min(r["p50_ms"] for r in runs))
            base = figures["in-process"]
            figures["batch1_latency_overhead"] = figures["triton c1"]["p50_ms"] / base["p50_ms"] - 1.0
            figures["c8_throughput_vs_sequential"] = figures["triton c8"]["images_per_s"] / base["images_per_s"]
            figures["detections_per_image"] = detections
            report["sizes"][size] = figures  # type: ignore[index]
            print(f"{size} images, {detections} detections each, model input "
                  f"{predictor.input_size[0]}x{predictor.input_size[1]} "
                  f"(medians of {args.rounds} interleaved rounds x {args.count} requests):")
            for name in rounds:
                f = figures[name]
                print(f"  {name:<11} {f['images_per_s']:7.2f} images/s   p50 {f['p50_ms']:8.1f} ms   "
                      f"p99 {f['p99_ms']:8.1f} ms")
            print(f"  batch-1 latency overhead {100 * figures['batch1_latency_overhead']:+.1f} % (goal <= +10 %); "
                  f"c8 throughput {figures['c8_throughput_vs_sequential']:.2f}x the in-process sequential rate "
                  f"(goal >= 1.00x)", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(40)
        except subprocess.TimeoutExpired:
            server.kill()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
