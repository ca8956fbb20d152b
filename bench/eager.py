"""Eager CPU inference speed of the model, `model([image])`, with each speed lever on and off,
measured side by side in one run (the variants interleaved round by round).

    .venv/bin/python bench/eager.py [--preset r50_fpn] [--size 512] [--rounds 3] [--threads 2] [--clock wall|cpu]
                                    [--torchvision-python tvenv/bin/python]

Variants:
- before: frozen BN as a separate scale-and-shift after each conv, RoIAlign forward on the
  pure-PyTorch path (the code before the native kernel);
- fold_bn+native RoIAlign: frozen BN folded into the convs (model/backbone.py ``conv_norm``) and
  the native CPU RoIAlign forward (model/ops/native_cpu.py), NCHW activations;
- + native NMS: fold_bn + native RoIAlign + the native NMS (model/ops/native/nms_cpu.cpp), NCHW;
- + channels-last: and channels-last activations (``MaskRCNN.forward_eval`` on the CPU);
- default (+ fused convs): and conv + ReLU / conv + residual add as one oneDNN call
  (``backbone.fused_conv``): the model's default;
- torchvision (stand-in): torchvision's forward estimated from parts that run here (see
  ``TorchvisionStandIn``).
- torchvision: torchvision itself (``maskrcnn_resnet50_fpn``), with ``--torchvision-python``: an
  interpreter of an environment where torchvision loads (torch 2.14.1 + torchvision 0.29.1;
  see ``bench/torchvision_worker.py``), driven round by round beside ours. Every variant then
  runs torchvision's own random weights, converted by ``from_torchvision``, with the score
  threshold at 0 on both sides (100 detections from random weights), and the detections of
  ours and torchvision's are compared.
Otherwise random weights (``build_model``). One random image, the preset's own detection count
(r50_fpn: 100 detections, masks computed for all of them). Prints min / median seconds per
variant and the ratios of medians to ``before`` and to torchvision (itself where given, else
the stand-in).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maskrt.model import backbone, mask_rcnn
from maskrt.model.ops import native_cpu
from maskrt.model.presets import build_model
from torchvision_client import TorchvisionWorker  # bench/, beside this script

_roi_align_module = importlib.import_module("maskrt.model.ops.roi_align")
_nms_module = importlib.import_module("maskrt.model.ops.nms")


@contextlib.contextmanager
def _levers(fold_bn: bool, native: bool, channels_last: bool, native_nms: bool | None = None, fused: bool = False):
    """The speed levers on or off inside the block (native_nms defaults to native)."""
    native_nms = native if native_nms is None else native_nms
    saved = (backbone.FOLD_FROZEN_BN, _roi_align_module._NATIVE_CPU, mask_rcnn.CHANNELS_LAST_CPU,
             _nms_module._NATIVE_CPU, backbone.FUSED_CPU_INFERENCE)
    (backbone.FOLD_FROZEN_BN, _roi_align_module._NATIVE_CPU, mask_rcnn.CHANNELS_LAST_CPU,
     _nms_module._NATIVE_CPU, backbone.FUSED_CPU_INFERENCE) = fold_bn, native, channels_last, native_nms, fused
    try:
        yield
    finally:
        (backbone.FOLD_FROZEN_BN, _roi_align_module._NATIVE_CPU, mask_rcnn.CHANNELS_LAST_CPU,
         _nms_module._NATIVE_CPU, backbone.FUSED_CPU_INFERENCE) = saved


# --- torchvision's forward, estimated from parts that run here --------------------------------
# torchvision does not load with this torch. Its eager forward does the same convolutions and
# matrix products as ours with frozen BN as a separate multiply and add (ours with fold_bn off, on
# NCHW activations); what differs is its C++ ops and its Python post-processing, stood in for:
# - torchvision::roi_align (C++, one thread, NCHW): ONNX Runtime's RoiAlign (C++), one session with
#   1 thread per level, called level by level as MultiScaleRoIAlign does (RoIs gathered per level,
#   results scattered back);
# - torchvision::nms (C++, greedy, IoU per tested pair, every candidate): our native NMS without
#   the early stop at the kept count;
# - paste_masks_in_image: torchvision's algorithm, one F.interpolate and one zero image per mask.
class TorchvisionStandIn:
    def __init__(self, channels: int) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        self._ort, self._helper, self._proto = ort, helper, TensorProto
        self._sessions: dict = {}

    def _session(self, size: int, sampling: int, scale: float):
        key = (size, sampling, scale)
        if key not in self._sessions:
            helper, proto = self._helper, self._proto
            node = helper.make_node("RoiAlign", ["X", "rois", "batch_indices"], ["Y"], mode="avg",
                                    output_height=size, output_width=size, sampling_ratio=sampling,
                                    spatial_scale=scale, coordinate_transformation_mode="output_half_pixel")
            graph = helper.make_graph([node], "roi_align", [
                helper.make_tensor_value_info("X", proto.FLOAT, None),
                helper.make_tensor_value_info("rois", proto.FLOAT, None),
                helper.make_tensor_value_info("batch_indices", proto.INT64, None)],
                [helper.make_tensor_value_info("Y", proto.FLOAT, None)])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
            model.ir_version = 10
            options = self._ort.SessionOptions()
            options.intra_op_num_threads = 1  # torchvision's CPU roi_align runs on one thread
            options.inter_op_num_threads = 1
            self._sessions[key] = self._ort.InferenceSession(model.SerializeToString(), options,
                                                             providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def multilevel_roi_align(self, rois, features, spatial_scales, output_height, output_width, sampling_ratio,
                             aligned, canonical_scale=224.0, canonical_level=4, mode="avg"):
        from maskrt.model.ops import fpn_level

        assert not aligned and mode == "avg" and output_height == output_width and rois.shape[0] == 1
        boxes = rois[0]
        k_min = round(-math.log2(spatial_scales[0]))
        levels = fpn_level(boxes, k_min, k_min + len(features) - 1, canonical_scale, canonical_level) - k_min
        result = features[0].new_zeros((boxes.shape[0], features[0].shape[1], output_height, output_width))
        for level, (feature, scale) in enumerate(zip(features, spatial_scales)):
            index = torch.where(levels == level)[0]
            if index.numel() == 0:
                continue
            session = self._session(output_height, sampling_ratio, float(scale))
            pooled = session.run(None, {"X": feature.contiguous().numpy(), "rois": boxes[index].contiguous().numpy(),
                                        "batch_indices": np.zeros(index.numel(), np.int64)})[0]
            result.index_put_((index,), torch.from_numpy(pooled))
        return result[None]

    @staticmethod
    def nms_padded(boxes, scores, groups, iou_threshold, score_threshold, max_output):
        from maskrt.model.ops import batched_nms

        kept_all = torch.full((boxes.shape[0], max_output), -1, dtype=torch.int64)
        for image in range(boxes.shape[0]):
            candidates = torch.where(scores[image] > score_threshold)[0]
            keep = batched_nms(boxes[image, candidates], scores[image, candidates], groups[image, candidates],
                               iou_threshold)  # all of them, as torchvision's, then the top max_output
            kept = candidates[keep][:max_output]
            kept_all[image, :kept.shape[0]] = kept
        return kept_all

    @staticmethod
    def postprocess(boxes, masks, resized, original, paste_rule="torchvision"):
        from maskrt.model.transform import resize_boxes

        boxes = resize_boxes(boxes, resized, original)
        height, width = original
        size = masks.shape[-1]
        padded = torch.nn.functional.pad(masks, (1, 1, 1, 1))
        scale = (size + 2) / size
        half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
        half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
        center_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
        center_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
        expanded = torch.stack((center_x - half_w, center_y - half_h, center_x + half_w, center_y + half_h), 1)
        pasted = []
        for mask, box in zip(padded, expanded.to(torch.int64)):
            w = max(int(box[2] - box[0] + 1), 1)
            h = max(int(box[3] - box[1] + 1), 1)
            resized_mask = torch.nn.functional.interpolate(mask[None, None], size=(h, w), mode="bilinear",
                                                           align_corners=False)[0, 0]
            image_mask = torch.zeros((height, width), dtype=resized_mask.dtype)
            x0, x1 = max(int(box[0]), 0), min(int(box[2]) + 1, width)
            y0, y1 = max(int(box[1]), 0), min(int(box[3]) + 1, height)
            image_mask[y0:y1, x0:x1] = resized_mask[y0 - int(box[1]):y1 - int(box[1]), x0 - int(box[0]):x1 - int(box[0])]
            pasted.append(image_mask)
        stacked = torch.stack(pasted)[:, None] if pasted else masks.new_zeros((0, 1, height, width))
        return boxes, stacked

    @contextlib.contextmanager
    def active(self):
        """torchvision's ops in place of ours inside the block (with fold_bn, native and channels-last off)."""
        from maskrt.model import ops

        saved = ops.multilevel_roi_align, ops.nms_padded, mask_rcnn.postprocess
        ops.multilevel_roi_align, ops.nms_padded, mask_rcnn.postprocess = (
            self.multilevel_roi_align, self.nms_padded, self.postprocess)
        try:
            with _levers(False, False, False):
                yield
        finally:
            ops.multilevel_roi_align, ops.nms_padded, mask_rcnn.postprocess = saved


def _compare_detections(ours: dict, theirs: dict) -> str:
    """Ours vs torchvision's detections on the same image. Random weights give near-tied scores,
    so the two orders differ: each of our detections is paired with torchvision's of the same
    label whose box is nearest (largest coordinate difference), and its mask compared there."""
    boxes, labels = ours["boxes"].numpy(), ours["labels"].numpy()
    their_boxes, their_labels = theirs["boxes"], theirs["labels"]
    if len(boxes) == 0 or len(their_boxes) == 0:
        return f"{len(boxes)} vs {len(their_boxes)} detections"
    distance = np.abs(boxes[:, None, :] - their_boxes[None, :, :]).max(axis=2)
    distance[labels[:, None] != their_labels[None, :]] = np.inf
    nearest = distance.argmin(axis=1)
    gaps = distance[np.arange(len(boxes)), nearest]
    masks = ours["masks"].numpy()[:, 0] > 0.5
    their_masks = theirs["masks"][nearest][:, 0] > 0.5
    union = np.logical_or(masks, their_masks).sum()
    agreement = np.logical_and(masks, their_masks).sum() / max(int(union), 1)
    return (f"{len(boxes)} vs {len(their_boxes)} detections; each of ours paired with the nearest of the same label: "
            f"largest box difference {gaps.max():.2e} px, mask IoU over all pairs {agreement:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="r50_fpn", help="model preset (r50_fpn or edge)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (min_size = max_size = this)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (min and median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--classes", type=int, default=91, help="classes incl. background")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed seconds; cpu: this process's CPU seconds (all threads), less "
                             "sensitive to other jobs on a shared machine (use with --threads 1)")
    parser.add_argument("--only", action="store_true",
                        help="time only torchvision (or its stand-in) and the default (faster, for repeated runs)")
    parser.add_argument("--torchvision-python", default=None,
                        help="python of an environment where torchvision loads: time torchvision itself "
                             "(r50_fpn only; bench/torchvision_worker.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    image = torch.rand(3, args.size, args.size)
    # torchvision's weights, the image and its detections (~300 MB at 512 px); removed at exit.
    scratch = tempfile.TemporaryDirectory(prefix="maskrt-eager-")
    folder = Path(scratch.name)
    itself = None
    if args.torchvision_python:
        if args.preset != "r50_fpn":
            parser.error("--torchvision-python compares the r50_fpn preset (torchvision's maskrcnn_resnet50_fpn)")
        from maskrt.model.convert import from_torchvision

        itself = TorchvisionWorker(args.torchvision_python, args.threads)
        weights = folder / "torchvision_maskrcnn.pt"
        itself.ask({"op": "build_maskrcnn", "size": args.size, "seed": 0, "weights_out": str(weights)})
        state = torch.load(weights, weights_only=True)
        model = from_torchvision(state, min_size=args.size, max_size=args.size, box_score_thresh=0.0).eval()
        image_file = folder / "image.npy"
        np.save(image_file, image.numpy())
        print(f"torchvision itself: torch {itself.versions['torch']}, torchvision {itself.versions['torchvision']} "
              f"({args.torchvision_python}); its random weights converted by from_torchvision, score threshold 0")
    else:
        model = build_model(args.preset, args.classes, min_size=args.size, max_size=args.size).eval()

    standin = TorchvisionStandIn(channels=256)
    variants = {  # name: a context in which model([image]) runs that variant
        "torchvision (stand-in)": standin.active,
        "before": lambda: _levers(False, False, False),
        "fold_bn+native RoIAlign": lambda: _levers(True, True, False, False),
        "+ native NMS": lambda: _levers(True, True, False, True),
        "+ channels-last": lambda: _levers(True, True, True, True),
        "default (+ fused convs)": lambda: _levers(True, True, True, True, True),
    }
    if itself is not None:
        variants = {"torchvision": None, **variants}
    if args.only:
        keep = ("torchvision", "default (+ fused convs)") if itself else ("torchvision (stand-in)", "default (+ fused convs)")
        variants = {name: variants[name] for name in variants if name in keep}
    print(f"torch {torch.__version__}, threads {args.threads}, preset {args.preset}, {args.size} px, "
          f"{args.rounds} interleaved rounds, {args.clock} clock, native RoIAlign {'available' if native_cpu.enabled() else 'UNAVAILABLE'}")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times: dict[str, list[float]] = {name: [] for name in variants}
    reference = None
    with torch.no_grad():
        for name, variant in variants.items():  # warm-up, and the outputs agree
            if variant is None:  # torchvision itself
                itself.ask({"op": "run_maskrcnn", "image": str(image_file), "clock": args.clock,
                            "out": str(folder / "torchvision.npz")})
                continue
            with variant():
                result = model([image])[0]
            if reference is None:
                reference = result
            else:
                worst = max((float((result[key].float() - reference[key].float()).abs().max())
                             for key in ("boxes", "scores", "masks") if result[key].numel()), default=0.0)
                print(f"  {name}: {len(result['boxes'])} detections, largest difference to the first {worst:.2e}")
        if itself is not None:
            with _levers(True, True, True, True, True):
                print(f"  ours (default) vs torchvision: "
                      f"{_compare_detections(model([image])[0], dict(np.load(folder / 'torchvision.npz')))}")
        for _ in range(args.rounds):
            for name, variant in variants.items():
                if variant is None:
                    times[name].append(itself.seconds({"op": "run_maskrcnn", "image": str(image_file),
                                                       "clock": args.clock, "out": None}))
                    continue
                with variant():
                    start = clock()
                    model([image])
                    times[name].append(clock() - start)
    if itself is not None:
        itself.close()
    torchvision = statistics.median(times["torchvision" if itself else "torchvision (stand-in)"])
    before = statistics.median(times["before"]) if "before" in times else float("nan")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:26s} min {min(values):6.3f} s  median {median:6.3f} s  median/before {median / before:5.2f}  "
              f"median/{'torchvision' if itself else 'stand-in'} {median / torchvision:5.2f}")


if __name__ == "__main__":
    main()
