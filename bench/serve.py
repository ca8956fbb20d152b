"""Triton serving against the in-process Predictor, same model, same images, one run (docs/serving.md).

    .venv/bin/python bench/serve.py                      # exports a seeded edge model at 320x320
    .venv/bin/python bench/serve.py --model m.onnx --sizes 1080x1920 input --rounds 5

For each image size (``input`` = the model's input size, no resize): images/s, p50/p99 latency
and CPU time per image of

- the in-process ``Predictor`` called sequentially (the baseline),
- `maskrt serve` (Triton, dynamic batching) at concurrency 1 over gRPC and over HTTP (binary
  tensors), and at the ``--concurrency`` levels over gRPC (one client per thread, ``--count``
  requests each; besides the whole run's rate, the steady rate between the last client's first
  answer and the first client's last, which the throughput goal uses);
- the same over gRPC with the frame in Triton's system shared memory (``shm``: a client on the
  server's machine; each client thread has its own registered region), at 1 and the highest level;
- ``TritonPredictor`` (what ``maskrt infer --server`` runs: the request, then the masks decoded
  into crops, i.e. Detections like the in-process Predictor's), without and with ``--shm``, c1.

``--model`` takes a user's model (e.g. a trained one: ``maskrt export --weights ...``); with
none, a seeded untrained edge model is exported, whose noisy masks (~90,000 RLE runs per 1080p
image) are the worst case for the wire contract's RLE. Use ``--conf`` as the model is served.

All of them are measured in every round, one after another (interleaved), ``--rounds`` times;
the report gives each figure's median over the rounds and its min (best) in brackets, and the
1-minute load average seen at each round's start (the machine may be shared: say so). The
batch-1 paths are measured once more per round *paired*: one request of each in turn, the order
rotated, ``--count`` times (``run_paired``); their p50s against the in-process p50 are the
fairest latency comparison on a loaded machine.

It also says where a batch-1 request's time goes: the server's own time for it (Triton's
statistics: queue, compute), the wire contract's packing (COCO RLE of every mask, timed here on
the same detections), and the rest (client serialisation, gRPC/HTTP transport, Triton's front
end); and, for the throughput goal, the CPU time each path spends per image (this process for
the in-process path and the clients; tritonserver and its Python-backend stubs from /proc).
Goals (the issue's): batch-1 latency overhead (Triton gRPC c1 p50 / in-process p50 - 1) <= 10 %;
Triton's steady throughput at concurrency 8 >= the in-process sequential rate. On a CPU server,
one single-threaded instance per core (``--servers 2x1:1`` on 2 cores) is the configuration for
throughput (docs/serving.md).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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


def process_tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of ``root`` and all its live descendants (/proc)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, parent = int(entry), int(fields[1])
        children.setdefault(parent, []).append(pid)
        times[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


def steady_rate(answered: list[list[float]]) -> float | None:
    """Answers per second while every client was in flight: ``answered`` holds each client's
    answer times in order; the window runs from the last client's first answer to the first
    client's last, and the answers after its start and up to its end are counted. None when the
    window is empty (a client with one answer, or none inside)."""
    start, end = max(times[0] for times in answered), min(times[-1] for times in answered)
    inside = sum(1 for times in answered for t in times if start < t <= end)
    return inside / (end - start) if end > start and inside else None


def summary(latencies_s: list[float], wall_s: float, cpu_s: float) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000.0
    return {"images_per_s": len(ms) / wall_s, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "cpu_ms_per_image": 1000.0 * cpu_s / len(ms),
            "cores_used": cpu_s / wall_s}


def run_in_process(predictor, image: np.ndarray, count: int) -> dict[str, float]:
    latencies = []
    cpu0, began = time.process_time(), time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        predictor(image)
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - began
    return summary(latencies, wall, time.process_time() - cpu0)


def time_decoding(predictor, image: np.ndarray, slots: int, count: int = 3) -> tuple[float, float]:
    """Best (min) ms of the client's decoding of this image's ``masks_rle`` into MaskCrops (what
    ``TritonPredictor`` does), and into full-frame masks with pycocotools (what it did before
    2026-11-27), interleaved."""
    from pycocotools import mask as coco_mask

    from maskrt.runtime.masks import rle_strings_to_mask_crops
    from maskrt.runtime.serving import pack_detections

    detections = predictor(image)
    rles = list(pack_detections(detections, slots)["masks_rle"][:len(detections)])
    crops, full = [], []
    for _ in range(count):
        t0 = time.perf_counter()
        rle_strings_to_mask_crops([json.loads(r)["counts"] for r in rles], image.shape[:2])
        t1 = time.perf_counter()
        if rles:  # pycocotools' full-frame masks, as the client decoded them before
            coco_mask.decode([{"size": json.loads(r)["size"], "counts": json.loads(r)["counts"].encode()}
                              for r in rles])
        t2 = time.perf_counter()
        crops.append(t1 - t0)
        full.append(t2 - t1)
    return 1000.0 * min(crops), 1000.0 * min(full)


def time_packing(predictor, image: np.ndarray, slots: int, count: int = 7) -> tuple[float, float]:
    """Best (min) ms of the wire contract's packing of this image's detections (RLE of every mask, all
    at once, as the server does), and of the same RLE strings made one mask at a time with
    ``crop_to_rle`` (what the server did before 2026-11-27), interleaved."""
    from maskrt.runtime.masks import crop_to_rle
    from maskrt.runtime.serving import pack_detections

    detections = predictor(image)
    crops = detections.mask_crops
    packed, one_by_one = [], []
    for _ in range(count):
        t0 = time.perf_counter()
        pack_detections(detections, slots)
        t1 = time.perf_counter()
        for i in range(len(crops)):
            json.dumps(crop_to_rle(crops.crops[i], crops.origins[i], crops.image_size), separators=(",", ":"))
        t2 = time.perf_counter()
        packed.append(t1 - t0)
        one_by_one.append(t2 - t1)
    return 1000.0 * min(packed), 1000.0 * min(one_by_one)  # min: the machine may be shared


class TritonClients:
    """tritonclient gRPC and HTTP clients of one server, and its statistics."""

    def __init__(self, grpc_port: int, http_port: int, server_pid: int) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        self.grpc, self.http = grpcclient, httpclient
        self.grpc_url, self.http_url, self.server_pid = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}", server_pid
        self.admin = grpcclient.InferenceServerClient(self.grpc_url)

    def statistics(self) -> dict[str, float]:
        stats = self.admin.get_inference_statistics("maskrt", as_json=True)["model_stats"][0]
        inference = stats["inference_stats"]
        out = {f"{k}_ns": float(inference[k].get("ns", 0))
               for k in ("success", "queue", "compute_input", "compute_infer", "compute_output")}
        out["requests"] = float(inference["success"].get("count", 0))
        out["executions"] = float(stats.get("execution_count", 0))
        return out

    def caller(self, protocol: str, image: np.ndarray, index: int = 0):
        """(send one request of ``image``, close) for one client. ``protocol``: grpc, http, shm (gRPC,
        the frame copied into this client's registered system shared memory region), predictor or
        predictor-shm (``TritonPredictor``: the request, then the masks decoded into crops)."""
        import tritonclient.utils.shared_memory as shared_memory

        from maskrt.runtime.backends.triton import TritonPredictor

        if protocol.startswith("predictor"):
            remote = TritonPredictor(self.grpc_url, conf=0.0, shm=protocol == "predictor-shm")
            return (lambda: remote(image)), remote.close
        module = self.http if protocol == "http" else self.grpc
        client = module.InferenceServerClient(self.http_url if protocol == "http" else self.grpc_url)
        region = None
        if protocol == "shm":
            name = f"maskrt_bench_{os.getpid()}_{index}"
            region = shared_memory.create_shared_memory_region(name, "/" + name, image.nbytes)
            client.register_system_shared_memory(name, "/" + name, image.nbytes)

        def call() -> None:  # serialising the frame (or copying it into the region) is part of the cost
            item = module.InferInput("image", [1, *image.shape], "UINT8")
            if region is not None:
                shared_memory.set_shared_memory_region(region, [image[None]])
                item.set_shared_memory(name, image.nbytes)
            else:
                item.set_data_from_numpy(image[None])
            client.infer("maskrt", [item]).as_numpy("masks_rle")

        def close() -> None:
            if region is not None:
                client.unregister_system_shared_memory(name)
                shared_memory.destroy_shared_memory_region(region)
            client.close()

        return call, close

    def run(self, protocol: str, image: np.ndarray, concurrency: int, count: int) -> dict[str, float]:
        """``concurrency`` clients (one thread each, ``caller``) send ``count`` requests each.

        Besides the rate over the whole run it gives the steady rate (``steady_images_per_s``):
        the answers that arrived after every client had its first one and before any client had
        its last, over that window. The whole run's rate also holds the start (the first batch
        forms from whoever asked first) and the end (the last requests run while instances that
        have no more work idle), which at a few requests per client weigh as much as the middle."""
        latencies: list[float] = []
        answered: list[list[float]] = [[] for _ in range(concurrency)]  # each client's answer times
        lock = threading.Lock()
        callers = [self.caller(protocol, image, i) for i in range(concurrency)]

        def worker(index: int) -> None:
            call, mine = callers[index][0], []
            for _ in range(count):
                t0 = time.perf_counter()
                call()
                t1 = time.perf_counter()
                mine.append(t1 - t0)
                answered[index].append(t1)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(callers))]
        before = self.statistics()
        server_cpu0, client_cpu0 = process_tree_cpu_s(self.server_pid), time.process_time()
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
        server_cpu = process_tree_cpu_s(self.server_pid) - server_cpu0
        client_cpu = time.process_time() - client_cpu0
        after = self.statistics()
        for _, close in callers:
            close()
        figures = summary(latencies, wall, server_cpu + client_cpu)
        steady = steady_rate(answered) if concurrency > 1 else None
        figures["steady_images_per_s"] = steady if steady is not None else figures["images_per_s"]
        figures["server_cpu_ms_per_image"] = 1000.0 * server_cpu / len(latencies)
        requests = max(after["requests"] - before["requests"], 1.0)
        for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
            figures[f"server_{key}_ms"] = (after[f"{key}_ns"] - before[f"{key}_ns"]) / requests / 1e6
        figures["mean_batch"] = requests / max(after["executions"] - before["executions"], 1.0)
        return figures


def run_paired(calls: dict[str, object], count: int, offset: int) -> dict[str, list[float]]:
    """Batch-1 latencies taken in pairs: ``count`` times, one request of every path in turn (the
    order rotated each time), so each path sees the same load as its neighbours; on a shared
    machine this compares paths more fairly than blocks of requests. Returns seconds per path."""
    names = list(calls)
    out: dict[str, list[float]] = {name: [] for name in names}
    for k in range(count):
        shift = (k + offset) % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            calls[name]()
            out[name].append(time.perf_counter() - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=".onnx (default: a seeded untrained edge model exported at --export-size)")
    parser.add_argument("--export-size", type=int, default=320)
    parser.add_argument("--sizes", nargs="+", default=["1080x1920", "input"],
                        help="image sizes HxW, or 'input' for the model's input size (default: 1080p and input)")
    parser.add_argument("--count", type=int, default=16,
                        help="requests per measurement and client (at concurrency 8: 8 x count in all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 8], help="gRPC levels besides 1")
    parser.add_argument("--conf", type=float, default=0.0,
                        help="served threshold (default 0: the untrained model's ~0.3 scores fill every slot, "
                        "so the masks and their RLE cost what a full frame of detections costs)")
    parser.add_argument("--servers", nargs="+", default=["1", "2x1:1"],
                        help="server configurations, INSTANCES[xTHREADS][:MAX_BATCH] (`maskrt serve --instances "
                        "--threads --max-batch`, e.g. 2x1:1): one server each, all measured in every round "
                        "(default: 1, the defaults; 2x1:1, two single-threaded instances, batches of 1: the "
                        "CPU server's configuration for throughput)")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="`maskrt serve --max-batch` of the servers whose spec gives none")
    parser.add_argument("--max-queue-delay-us", type=int, default=None,
                        help="`maskrt serve --max-queue-delay-us` (default: serve's default)")
    parser.add_argument("--image", help="an image the model knows (e.g. one of its validation images), resized to "
                        "each size (default: a synthetic shapes scene)")
    parser.add_argument("--no-shm", action="store_true", help="leave out the shared-memory paths")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    from maskrt.runtime import Predictor
    from maskrt.runtime.commands import synthetic_shapes_image
    from maskrt.runtime.serving import detections_per_image

    source = None
    if args.image:
        import cv2

        source = cv2.imread(args.image, cv2.IMREAD_COLOR)
        if source is None:
            raise SystemExit(f"cannot read {args.image}")
    work = Path(tempfile.mkdtemp(prefix="maskrt-bench-serve-"))
    model = Path(args.model) if args.model else export_edge(work, args.export_size)
    predictor = Predictor(model, conf=args.conf)
    slots = detections_per_image(predictor.metadata)
    servers, commands, logs, ports = {}, {}, {}, {}
    for spec in args.servers:
        http, grpc, metrics = free_ports(3)
        layout, _, max_batch = spec.partition(":")
        instances, _, threads = layout.partition("x")
        command = [sys.executable, "-m", "maskrt", "serve", "--model", str(model), "--conf", str(args.conf),
                   "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                   "--instances", instances, "--max-batch", max_batch or str(args.max_batch)]
        if threads:
            command += ["--threads", threads]
        if args.max_queue_delay_us is not None:
            command += ["--max-queue-delay-us", str(args.max_queue_delay_us)]
        logs[spec] = work / f"serve{spec}.out"
        servers[spec] = subprocess.Popen(command, stdout=open(logs[spec], "w"), stderr=subprocess.STDOUT)
        commands[spec], ports[spec] = command[3:], (grpc, http)
    first = args.servers[0]
    # (label, server spec, protocol, concurrency): gRPC c1 and the --concurrency levels on every
    # server; on the first also HTTP c1, shared memory at c1 and the top level, and TritonPredictor.
    paths = [("in-process", "", "", 1)]
    for spec in args.servers:
        tag = f"i{spec} " if len(args.servers) > 1 else ""
        paths.append((f"{tag}grpc c1", spec, "grpc", 1))
        if spec == first:
            paths.append((f"{tag}http c1", spec, "http", 1))
        paths += [(f"{tag}grpc c{c}", spec, "grpc", c) for c in args.concurrency]
        if spec == first and not args.no_shm:
            paths += [(f"{tag}shm c1", spec, "shm", 1), (f"{tag}shm c{max(args.concurrency)}", spec, "shm",
                                                          max(args.concurrency))]
        if spec == first:
            paths.append((f"{tag}client c1", spec, "predictor", 1))
            if not args.no_shm:
                paths.append((f"{tag}client shm c1", spec, "predictor-shm", 1))
    report: dict[str, object] = {"model": str(model), "image": args.image, "conf": args.conf, "input_size": list(predictor.input_size), "rounds": args.rounds,
                                 "count": args.count, "servers": commands, "cpus": os.cpu_count(), "sizes": {}}
    try:
        deadline = time.monotonic() + 300
        for spec, server in servers.items():
            while "ready on Triton" not in logs[spec].read_text():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"maskrt serve did not start:\n{logs[spec].read_text()[-2000:]}")
                time.sleep(0.25)
        clients = {spec: TritonClients(*ports[spec], servers[spec].pid) for spec in servers}
        for size in args.sizes:
            h, w = predictor.input_size if size == "input" else (int(v) for v in size.lower().split("x"))
            image = (synthetic_shapes_image(h, w, seed=0) if source is None else
                     cv2.resize(source, (w, h), interpolation=cv2.INTER_LINEAR))
            detections = len(predictor(image))
            run_in_process(predictor, image, 3)  # warm-up
            for spec, client in clients.items():
                client.run("grpc", image, 8, 2)
                client.run("http", image, 1, 2)
                if not args.no_shm:
                    client.run("shm", image, 2, 2)
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name, _, _, _ in paths}
            loads, packing, packing_per_mask, decoding, decoding_full = [], [], [], [], []
            # The batch-1 paths again, request by request in turn (run_paired), on the first server.
            c1_paths = [(name, protocol) for name, spec, protocol, c in paths if c == 1 and spec == first]
            callers = {name: clients[first].caller(protocol, image, 100 + i) for i, (name, protocol) in enumerate(c1_paths)}
            calls = {"in-process": lambda: predictor(image), **{name: callers[name][0] for name, _ in c1_paths}}
            paired: dict[str, list[float]] = {name: [] for name in calls}
            for round_index in range(args.rounds):  # interleaved: each round measures every path
                loads.append(os.getloadavg()[0])
                for name, spec, protocol, concurrency in paths:
                    rounds[name].append(run_in_process(predictor, image, args.count) if not spec else
                                        clients[spec].run(protocol, image, concurrency, args.count))
                packed_ms, per_mask_ms = time_packing(predictor, image, slots)
                packing.append(packed_ms)
                packing_per_mask.append(per_mask_ms)
                for name, values in run_paired(calls, args.count, round_index).items():
                    paired[name].extend(values)
                crops_ms, full_ms = time_decoding(predictor, image, slots)
                decoding.append(crops_ms)
                decoding_full.append(full_ms)
            figures: dict[str, object] = {}
            for name, runs in rounds.items():
                entry = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
                entry["p50_ms_min"] = float(min(r["p50_ms"] for r in runs))
                entry["images_per_s_max"] = float(max(r["images_per_s"] for r in runs))
                entry["steady_images_per_s_max"] = float(max(r.get("steady_images_per_s", r["images_per_s"])
                                                             for r in runs))
                figures[name] = entry
            tag = f"i{first} " if len(args.servers) > 1 else ""
            base, c1 = figures["in-process"], figures[f"{tag}grpc c1"]
            figures["batch1_latency_overhead"] = c1["p50_ms"] / base["p50_ms"] - 1.0
            figures["batch1_latency_overhead_best"] = c1["p50_ms_min"] / base["p50_ms_min"] - 1.0
            c1_names = [name for name, spec, _, c in paths if c == 1 and spec == first]
            figures["batch1_overheads"] = {name: [figures[name]["p50_ms"] / base["p50_ms"] - 1.0,
                                                  figures[name]["p50_ms_min"] / base["p50_ms_min"] - 1.0]
                                           for name in c1_names}
            top = [name for name, _, _, c in paths if c == max(args.concurrency)]
            # The throughput goal is about serving without end (cameras streaming): the steady rate.
            figures["throughput_vs_sequential"] = {name: figures[name]["steady_images_per_s"] / base["images_per_s"]
                                                   for name in top}
            figures["throughput_vs_sequential_best"] = {
                name: figures[name]["steady_images_per_s_max"] / base["images_per_s_max"] for name in top}
            figures["pack_ms"] = float(min(packing))
            figures["rle_per_mask_loop_ms"] = float(min(packing_per_mask))
            for _, close in callers.values():
                close()
            paired_p50 = {name: 1000.0 * float(np.median(values)) for name, values in paired.items()}
            in_process_paired = np.asarray(paired["in-process"])
            figures["paired_p50_ms"] = paired_p50
            figures["paired_overhead"] = {  # [ratio of p50s, median of the per-pair ratios] - 1
                name: [paired_p50[name] / paired_p50["in-process"] - 1.0,
                       float(np.median(np.asarray(paired[name]) / in_process_paired)) - 1.0]
                for name in paired if name != "in-process"}
            figures["decode_crops_ms"] = float(min(decoding))
            figures["decode_full_pycocotools_ms"] = float(min(decoding_full))
            figures["load_average_1m"] = loads
            figures["detections_per_image"] = detections
            report["sizes"][size] = figures  # type: ignore[index]
            print(f"{h}x{w} images ({size}), {detections} detections each, model input "
                  f"{predictor.input_size[0]}x{predictor.input_size[1]}; median [best] of {args.rounds} interleaved "
                  f"rounds x {args.count} requests per client; load average at each round's start: "
                  f"{', '.join(f'{v:.1f}' for v in loads)} on {os.cpu_count()} CPUs")
            print(f"  {'path':<16} {'images/s':>16} {'p50 ms':>16} {'p99 ms':>8} {'CPU ms/image':>13} "
                  f"{'cores':>6} {'server CPU':>11} {'server ms/req':>14} {'queue ms':>9} {'batch':>6}")
            for name, _, _, concurrency in paths:
                f = figures[name]
                best = f"[{f['images_per_s_max']:.2f}]"
                line = (f"  {name:<16} {f['images_per_s']:8.2f} {best:>7} {f['p50_ms']:8.1f} [{f['p50_ms_min']:5.1f}] "
                        f"{f['p99_ms']:8.1f} {f['cpu_ms_per_image']:13.1f} {f['cores_used']:6.2f}")
                if name != "in-process":
                    line += (f" {f['server_cpu_ms_per_image']:11.1f} {f['server_success_ms']:14.1f} "
                             f"{f['server_queue_ms']:9.1f} {f['mean_batch']:6.2f}  in {f['server_compute_input_ms']:.1f}"
                             f" out {f['server_compute_output_ms']:.1f}")
                if concurrency > 1:
                    line += f"  steady {f['steady_images_per_s']:.2f} images/s"
                print(line)
            rest = c1["p50_ms"] - c1["server_success_ms"]
            print(f"  {tag}gRPC c1, where the time goes (ms per request): in-process Predictor {base['p50_ms']:.1f}; "
                  f"server {c1['server_success_ms']:.1f} (queue {c1['server_queue_ms']:.1f}, compute "
                  f"{c1['server_compute_infer_ms']:.1f}, of which packing/RLE, best, {figures['pack_ms']:.1f}); "
                  f"client, transport and front end {rest:.1f} (p50 - server mean)")
            print(f"  packing {detections} masks as COCO RLE (best of 7 x {args.rounds} rounds): "
                  f"{figures['pack_ms']:.1f} ms all at once (the server's), "
                  f"{figures['rle_per_mask_loop_ms']:.1f} ms one mask at a time (crop_to_rle, before)")
            print(f"  decoding {detections} masks_rle in the client (best of 3 x {args.rounds} rounds): "
                  f"{figures['decode_crops_ms']:.1f} ms into crops (TritonPredictor), "
                  f"{figures['decode_full_pycocotools_ms']:.1f} ms into full frames with pycocotools (before)")
            print("  batch-1 p50 overhead vs in-process, median [best p50s]: " + ", ".join(
                f"{name} {100 * v[0]:+.1f} % [{100 * v[1]:+.1f} %]" for name, v in figures["batch1_overheads"].items()))
            print(f"  batch-1, paired ({args.rounds} x {args.count} requests of each path in turn): p50 in-process "
                  f"{paired_p50['in-process']:.1f} ms; " + ", ".join(
                      f"{name} {paired_p50[name]:.1f} ms {100 * v[0]:+.1f} % (per pair {100 * v[1]:+.1f} %)"
                      for name, v in figures["paired_overhead"].items()))
            ratios = ", ".join(f"{name} {figures['throughput_vs_sequential'][name]:.2f}x "
                               f"[{figures['throughput_vs_sequential_best'][name]:.2f}x]" for name in top)
            print(f"  batch-1 latency overhead {100 * figures['batch1_latency_overhead']:+.1f} % "
                  f"[best p50s: {100 * figures['batch1_latency_overhead_best']:+.1f} %] (goal <= +10 %); "
                  f"throughput / in-process sequential rate: {ratios} (goal >= 1.00x)", flush=True)
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            try:
                server.wait(40)
            except subprocess.TimeoutExpired:
                server.kill()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
