"""torchvision itself, timed in its own interpreter, for the side-by-side benchmarks.

torchvision does not load beside the torch that maskrt pins (2.13); it does in a separate
environment with torch 2.14.1 and torchvision 0.29.1 (on this workplace's x86 machines:
`python3 -m venv tvenv && tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1`). The
benchmarks (`bench/eager.py --torchvision-python tvenv/bin/python`, `bench/ops.py
--torchvision-python ...`) start this script there and drive it over stdin / stdout, one JSON
line each way, so that its calls interleave with maskrt's round by round. It imports only
torch, torchvision and NumPy (never maskrt).

Requests:
    {"op": "build_maskrcnn", "size": 512, "seed": 0, "weights_out": PATH}
        torchvision's maskrcnn_resnet50_fpn (v1) with random weights (seeded), min_size = max_size
        = size, box_score_thresh 0 (so that 100 detections are kept from random weights);
        writes its state dict to PATH (torch.save of plain tensors, read back with
        weights_only=True) for maskrt's converter.
    {"op": "run_maskrcnn", "image": NPY, "clock": "wall"|"cpu", "out": NPZ or null}
        model([image]) on the float32 CHW image in NPY; replies {"seconds": s}; with "out", the
        detections are written there (boxes, scores, labels, masks).
    {"op": "roi_setup", "inputs": NPZ, "out": NPZ}
        a RoIAlign case: "kind" "single" (feature0, rois [K,5], scale: torchvision.ops.roi_align on
        one map) or "multi" (feature0..feature{L-1}, boxes [K,4] of one image, image_hw:
        torchvision.ops.MultiScaleRoIAlign, the FPN pooler), with grad (the output gradient),
        size and sampling; the forward's output is written to "out".
    {"op": "roi_run", "backward": false|true, "clock": ..., "out": NPZ or absent}
        the case's forward, or forward and backward; replies {"seconds": s}; with "out", the
        gradient of every map is written there (grad0, grad1, ...).
    {"op": "quit"}
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict

import numpy as np
import torch
import torchvision
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.ops import MultiScaleRoIAlign, roi_align


def _clock(name: str):
    return time.perf_counter if name == "wall" else time.process_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = None
    roi: dict = {}
    print(json.dumps({"ready": True, "torch": torch.__version__, "torchvision": torchvision.__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        reply: dict = {}
        if op == "quit":
            break
        if op == "build_maskrcnn":
            torch.manual_seed(int(request["seed"]))
            size = int(request["size"])
            model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=size, max_size=size,
                                          box_score_thresh=0.0).eval()
            torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, request["weights_out"])
        elif op == "run_maskrcnn":
            image = torch.from_numpy(np.load(request["image"]))
            clock = _clock(request["clock"])
            with torch.no_grad():
                start = clock()
                result = model([image])[0]
                reply["seconds"] = clock() - start
            if request.get("out"):
                np.savez(request["out"], **{k: v.numpy() for k, v in result.items()})
        elif op == "roi_setup":
            data = np.load(request["inputs"])
            kind = str(data["kind"])
            features = [torch.from_numpy(data[f"feature{i}"]) for i in range(int(data["levels"]))]
            size, sampling, grad = int(data["size"]), int(data["sampling"]), torch.from_numpy(data["grad"])
            if kind == "single":
                rois, scale = torch.from_numpy(data["rois"]), float(data["scale"])

                def pool(maps, rois=rois, scale=scale, size=size, sampling=sampling):
                    return roi_align(maps[0], rois, size, scale, sampling, False)
            else:
                names = [f"p{i}" for i in range(len(features))]
                pooler = MultiScaleRoIAlign(names, size, sampling)
                boxes, image_hw = torch.from_numpy(data["boxes"]), tuple(int(v) for v in data["image_hw"])

                def pool(maps, names=names, pooler=pooler, boxes=boxes, image_hw=image_hw):
                    return pooler(OrderedDict(zip(names, maps)), [boxes], [image_hw])
            roi = {"features": features, "grad": grad, "pool": pool}
            with torch.no_grad():
                np.savez(request["out"], output=pool(features).numpy())
        elif op == "roi_run":
            leaves = [f.clone().requires_grad_() for f in roi["features"]] if request["backward"] else roi["features"]
            clock = _clock(request["clock"])
            start = clock()
            if request["backward"]:
                roi["pool"](leaves).backward(roi["grad"])
            else:
                with torch.no_grad():
                    roi["pool"](leaves)
            reply["seconds"] = clock() - start
            if request.get("out") and request["backward"]:
                np.savez(request["out"], **{f"grad{i}": leaf.grad.numpy() for i, leaf in enumerate(leaves)})
        else:
            reply["error"] = f"unknown op {op!r}"
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
