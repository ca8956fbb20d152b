"""`maskrt <verb>`: the command line.

Every verb's arguments are declared here, in one place; each verb's work lives in the
subpackage that owns it and is imported only when that verb runs, so `maskrt infer` never
imports torch and `maskrt --help` is instant.

User mistakes raise `MaskrtError`; `main` prints its one line on stderr and returns 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from maskrt import __version__
from maskrt.errors import MaskrtError


def _input_size(text: str) -> tuple[int, int]:
    """Parse 'HxW' (or a single 'S' for a square) into (H, W)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"input size must be HxW, e.g. 512x512, got {text!r}")
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0 or any(s % 32 for s in sizes):
        raise argparse.ArgumentTypeError(f"input size must be HxW with both multiples of 32, got {text!r}")
    return sizes[0], sizes[1]


# --- verb handlers: each imports its implementation lazily -------------------------------

def _data_synth(args: argparse.Namespace) -> int:
    from maskrt.train.commands import data_synth_command
    return data_synth_command(args)


def _train(args: argparse.Namespace) -> int:
    from maskrt.train.commands import train_command
    return train_command(args)


def _eval(args: argparse.Namespace) -> int:
    from maskrt.train.commands import eval_command
    return eval_command(args)


def _predict(args: argparse.Namespace) -> int:
    from maskrt.train.commands import predict_command
    return predict_command(args)


def _ablate(args: argparse.Namespace) -> int:
    from maskrt.train.commands import ablate_command
    return ablate_command(args)


def _export(args: argparse.Namespace) -> int:
    from maskrt.export.commands import export_command
    return export_command(args)


def _build(args: argparse.Namespace) -> int:
    from maskrt.export.engine import build_command
    return build_command(args)


def _plugin_build(args: argparse.Namespace) -> int:
    from maskrt.plugins.build import plugin_build_command
    return plugin_build_command(args)


def _infer(args: argparse.Namespace) -> int:
    from maskrt.runtime.commands import infer_command
    return infer_command(args)


def _serve(args: argparse.Namespace) -> int:
    from maskrt.runtime.serving import serve_command
    return serve_command(args)


def _bench(args: argparse.Namespace) -> int:
    from maskrt.runtime.commands import bench_command
    return bench_command(args)


def _convert(args: argparse.Namespace) -> int:
    from maskrt.model.commands import convert_command
    return convert_command(args)


def _doctor(args: argparse.Namespace) -> int:
    from maskrt.doctor import doctor_command
    return doctor_command(args)


def _demo(args: argparse.Namespace) -> int:
    from maskrt.demo import demo_command
    return demo_command(args)


# --- the parser ---------------------------------------------------------------------------

def _verb(verbs: argparse._SubParsersAction, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """A verb whose `--help` starts with `help` and ends with `example` (one or more command lines)."""
    return verbs.add_parser(name, help=help, description=help, epilog="example:\n  " + example.replace("\n", "\n  "),
                            formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrt",
        description="Mask R-CNN: train in PyTorch, export to ONNX, build TensorRT engines, run torch-free.",
        epilog="start here: maskrt doctor   (what this machine has; docs/jetson.md for Jetson)\n"
               "example:\n  maskrt demo --out runs/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"maskrt {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>")

    # data
    data = _verb(verbs, "data", "datasets: generate synthetic COCO data",
                 "maskrt data synth --out data/shapes --train 600 --val 100 --size 256")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="<action>")
    synth = _verb(data_verbs, "synth", "write a synthetic COCO instance-segmentation dataset",
                  "maskrt data synth --out data/shapes --train 600 --val 100 --size 256")
    synth.add_argument("--out", required=True, help="output folder (COCO short layout)")
    synth.add_argument("--train", type=int, default=200, help="training images (default: 200)")
    synth.add_argument("--val", type=int, default=50, help="validation images (default: 50)")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    synth.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same images")
    synth.set_defaults(handler=_data_synth)

    # train
    train = _verb(verbs, "train", "train a Mask R-CNN on COCO-format data",
                  "maskrt train --data data/shapes --config edge --minutes 10 --out runs/edge")
    train.add_argument("--data", required=True, help="COCO folder (2017 layout or the short one)")
    train.add_argument("--config", default="edge", choices=["edge", "r50_fpn"],
                       help="model preset: edge (small, fast) or r50_fpn (torchvision's) (default: edge)")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, help="training length in epochs")
    budget.add_argument("--minutes", type=float, help="training length in wall-clock minutes")
    budget.add_argument("--steps", type=int, help="training length in optimiser steps (the same run on a loaded or "
                        "idle machine; the edge preset's 10 minutes on the idle 2-core CPU: 4,190 steps)")
    train.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl")
    train.add_argument("--weights", help="initial weights (maskrt .safetensors)")
    train.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    train.add_argument("--roi-op", default="align", choices=["align", "pool"],
                       help="RoI feature op: RoIAlign or RoIPool (default: align)")
    train.add_argument("--seed", type=int, default=0, help="random seed of weights, data order and sampling")
    train.add_argument("--batch-size", type=int, help="images per step (preset default)")
    train.add_argument("--lr", type=float, help="base learning rate for the effective batch, used as given (default: "
                       "the preset's, scaled to processes x --batch-size: linear for sgd, square root for adamw)")
    train.add_argument("--optimizer", choices=("sgd", "adamw"), help="optimiser (preset default)")
    train.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                       help="autocast precision; auto: on CUDA bf16 (compute capability >= 8.0) else fp16 with a "
                            "GradScaler, on the CPU bf16 where it has native bf16 else fp32; fp16 is CUDA-only")
    train.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: CUDA when present; "
                       "under torchrun, cuda gives rank i GPU LOCAL_RANK)")
    train.add_argument("--workers", type=int, default=None,
                       help="DataLoader processes that decode and augment (default: from the CPU count; 0 below "
                            "8 cores per process)")
    train.add_argument("--repaint", type=float, default=0.0,
                       help="probability of repainting an image's background (each shape: 0.6 x it) with a "
                            "procedural photo-like texture (default: 0, off)")
    train.add_argument("--camera-noise", type=float, default=0.0,
                       help="probability of camera blur + sensor noise on an image (default: 0, off)")
    train.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    train.add_argument("--no-progress", action="store_true",
                       help="no progress bar (in a log the bar is already one line every 10 s)")
    train.epilog += ("\n  torchrun --nproc-per-node 4 -m maskrt train --data coco --epochs 12 --out runs/r50 "
                     "--config r50_fpn --device cuda   (several GPUs; docs/training.md)")
    train.set_defaults(handler=_train)

    # eval
    ev = _verb(verbs, "eval", "COCO bbox and segm AP of a model on a dataset",
               "maskrt eval --weights runs/edge/model.safetensors --data data/shapes\n"
               "maskrt eval --model model.onnx --data data/shapes")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="maskrt weights (.safetensors), evaluated in PyTorch")
    source.add_argument("--model", help="exported model (.onnx), evaluated with the torch-free runtime")
    ev.add_argument("--data", required=True, help="COCO folder (2017 layout or the short one)")
    ev.add_argument("--split", default="val", help="which split of --data to evaluate (default: val)")
    ev.add_argument("--out", help="JSON file for the metrics (default: beside the weights/model)")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N for --weights (auto: CUDA when present)")
    ev.set_defaults(handler=_eval)

    # predict
    pr = _verb(verbs, "predict", "overlay pictures and COCO results for images",
               "maskrt predict --weights runs/edge/model.safetensors data/shapes/val --out runs/pred")
    pr.add_argument("--weights", required=True, help="maskrt weights (.safetensors)")
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument("--out", required=True, help="folder for the overlays and results.json")
    pr.add_argument("--conf", type=float, default=0.5, help="lowest score drawn and written (default: 0.5)")
    pr.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: CUDA when present)")
    pr.set_defaults(handler=_predict)

    # ablate
    ab = _verb(verbs, "ablate", "RoIAlign vs RoIPool: train both, compare mask AP", "maskrt ablate --minutes 4")
    ab.add_argument("--data", help="COCO folder (default: generate a synthetic one)")
    ab.add_argument("--minutes", type=float, default=4.0, help="training budget per model")
    ab.add_argument("--out", default="runs/ablation", help="folder for both runs and report.md (default: runs/ablation)")
    ab.add_argument("--seed", type=int, default=0, help="random seed shared by both runs")
    ab.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N, for training and eval")
    ab.set_defaults(handler=_ablate)

    # convert
    co = _verb(verbs, "convert", "convert a torchvision or detectron2 Mask R-CNN R50-FPN checkpoint to maskrt weights",
               "maskrt convert --from detectron2 model_final_f10217.pkl --out r50_fpn.safetensors\n"
               "maskrt convert --from torchvision maskrcnn_resnet50_fpn_coco.pth --out r50_fpn.safetensors")
    co.add_argument("--from", dest="source", required=True, choices=["torchvision", "detectron2"],
                    help="checkpoint kind: torchvision .pth state dict, or detectron2 model-zoo .pkl (or .pth)")
    co.add_argument("checkpoint", help="the checkpoint file")
    co.add_argument("--out", required=True, help="maskrt weights to write (.safetensors)")
    co.add_argument("--num-classes", type=int,
                    help="classes including background (torchvision default: 91; detectron2: read from the file)")
    co.add_argument("--class-names", metavar="FILE",
                    help="class names, one per line (or a JSON list), background first or left out "
                         "(default: COCO's for COCO-sized heads)")
    co.add_argument("--input-format", default="BGR", choices=["BGR", "RGB"],
                    help="detectron2's INPUT.FORMAT the checkpoint was trained with (default: BGR, the model zoo's)")
    co.set_defaults(handler=_convert)

    # export
    ex = _verb(verbs, "export", "export weights to an ONNX graph (portable or TensorRT target), or a Triton model repository",
               "maskrt export --weights runs/edge/model.safetensors --input-size 256x256 --out model.onnx\n"
               "maskrt export --weights model_final.pkl --from detectron2 --target tensorrt --precision fp16 "
               "--input-size 800x1344 --out model_trt.onnx\n"
               "maskrt export --triton repo --model model.engine")
    ex.add_argument("--weights",
                    help="maskrt weights (.safetensors), or a torchvision / detectron2 checkpoint with --from "
                         "(required unless --triton with --model)")
    ex.add_argument("--from", dest="source", choices=["torchvision", "detectron2"],
                    help="--weights is a torchvision .pth or detectron2 .pkl checkpoint (as `maskrt convert` reads)")
    ex.add_argument("--target", default="onnx", choices=["onnx", "tensorrt"],
                    help="onnx: portable graph for ONNX Runtime; tensorrt: uses our RoIAlign plugin (default: onnx)")
    ex.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                    help="weights and compute of the backbone and heads (default: fp32)")
    ex.add_argument("--calib", help="calibration images folder for int8 (default: calib_data/)")
    ex.add_argument("--input-size", type=_input_size, metavar="HxW",
                    help="graph input size, both multiples of 32, e.g. 512x512 (a single S means SxS); with --weights")
    ex.add_argument("--batch", type=int, default=None,
                    help="fixed batch size (default: dynamic batch)")
    ex.add_argument("--out", help="the .onnx file to write (with --weights)")
    ex.add_argument("--triton", metavar="REPO",
                    help="also write a Triton model repository REPO (graph model + 'maskrt' Python model), e.g. "
                    "`maskrt export --triton repo --model edge.engine`")
    ex.add_argument("--model", help="with --triton: an existing .onnx or .engine/.plan to put in the repository")
    ex.add_argument("--graph-backend", default="auto", choices=["auto", "tensorrt", "onnxruntime", "python"],
                    help="with --triton: Triton backend of the graph model (auto: tensorrt for an engine, "
                    "onnxruntime for ONNX; python: ONNX Runtime in a Python model, for a CPU-only Triton)")
    ex.add_argument("--max-batch", type=int, default=8, help="with --triton: largest batch of the models (default 8)")
    ex.add_argument("--conf", type=float, default=0.5, help="with --triton: score threshold of the served detections")
    ex.add_argument("--plugin", help="with --triton: where the TensorRT plugin library lies on the server "
                    "(for the README's commands; default /opt/maskrt/lib/libmaskrt_plugins.so)")
    ex.set_defaults(handler=_export)

    # build
    bu = _verb(verbs, "build", "build a TensorRT engine from a TensorRT-target ONNX graph",
               "maskrt build --onnx model_trt.onnx --out model.engine")
    bu.add_argument("--onnx", required=True, help="TensorRT-target graph (`maskrt export --target tensorrt`)")
    bu.add_argument("--out", required=True, help="engine file to write (.engine or .plan; metadata goes beside it)")
    bu.add_argument("--plugin", help="libmaskrt_plugins.so (default: the one `maskrt plugin build` made)")
    bu.add_argument("--workspace", type=int, default=2048, help="workspace in MiB")
    bu.add_argument("--dla", type=int, default=None, help="DLA core (Jetson), GPU fallback on")
    bu.add_argument("--max-batch", type=int, default=None, help="largest batch of the optimisation profile")
    bu.add_argument("--version-compatible", action="store_true",
                    help="build a version-compatible engine (BuilderFlag.VERSION_COMPATIBLE): the only kind the lean "
                         "runtime (tensorrt_lean) and the dispatch runtime run, and later TensorRT versions of the "
                         "same major; may run slower")
    bu.add_argument("--exclude-lean-runtime", action="store_true",
                    help="with --version-compatible: leave the lean runtime out of the engine (EXCLUDE_LEAN_RUNTIME), "
                         "for deployments that run it with tensorrt_lean itself")
    bu.set_defaults(handler=_build)

    # plugin
    pl = _verb(verbs, "plugin", "the MultilevelRoIAlign plugin library",
               "maskrt plugin build --tensorrt-include /usr/include/aarch64-linux-gnu --cuda-archs 87")
    pl_verbs = pl.add_subparsers(dest="plugin_verb", metavar="<action>")
    pb = _verb(pl_verbs, "build", "build libmaskrt_plugins.so (CMake + nvcc)",
               "maskrt plugin build --tensorrt-include /usr/include/aarch64-linux-gnu --cuda-archs 87")
    pb.add_argument("--tensorrt-include", help="TensorRT include/ folder (or $TENSORRT_INCLUDE_DIR)")
    pb.add_argument("--cuda-archs", help="CUDA architectures, e.g. '87;90' (default: 75;80;86;87;89;90)")
    pb.add_argument("--build-dir", default="build/plugins", help="CMake build folder (default: build/plugins)")
    pb.add_argument("--cpu-only", action="store_true", help="build only the CPU reference library")
    pb.set_defaults(handler=_plugin_build)

    # infer
    inf = _verb(verbs, "infer", "real-time inference on a camera, video, stream, image or folder",
                "maskrt infer --model model.engine --source 0 --show\n"
                "maskrt infer --server gpu-box:8001 --source 0 --show")
    inf.add_argument("--model", help=".onnx, or .engine/.plan (or use --server)")
    inf.add_argument("--server", metavar="HOST:PORT",
                     help="send the frames to a Triton server's 'maskrt' model over gRPC instead of running a "
                     "model here, e.g. `maskrt infer --server gpu-box:8001 --source 0`")
    inf.add_argument("--shm", action="store_true",
                     help="with --server on this machine: hand each frame to Triton through system shared memory "
                     "instead of the socket, e.g. `maskrt infer --server 127.0.0.1:8001 --shm --source 0`")
    inf.add_argument("--source", required=True, help="0 | /dev/videoN | file.mp4 | rtsp://... | image | dir")
    inf.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                     help="auto: tensorrt for .engine/.plan, onnxruntime for .onnx")
    inf.add_argument("--show", action="store_true", help="show the overlay in a window (q or Esc quits)")
    inf.add_argument("--save", help="out.mp4 or a folder of PNGs")
    inf.add_argument("--conf", type=float, default=0.5, help="lowest score shown (default: 0.5)")
    inf.add_argument("--max-frames", type=int, default=None, help="stop after this many frames (default: all)")
    inf.add_argument("--plugin", help="TensorRT plugin library (default $MASKRT_PLUGIN_LIB or build/plugins/)")
    inf.add_argument("--threads", type=int,
                     help="ONNX Runtime intra-op threads (default: one per core); on a CPU the loop's decoding, "
                     "drawing and encoding share the cores with them (docs/runtime.md)")
    inf.add_argument("--draw-threads", type=int, default=1,
                     help="threads that paste each frame's masks and draw its overlay (default 1); more help only "
                     "where cores are idle, e.g. beside a GPU engine; the pixels are the same")
    inf.set_defaults(handler=_infer)

    # bench
    be = _verb(verbs, "bench", "latency and throughput of a model, pre/infer/post split",
               "maskrt bench --model model.onnx --against-eager runs/edge/model.safetensors")
    be.add_argument("--model", required=True, help=".onnx, or .engine/.plan")
    be.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                    help="auto: tensorrt for .engine/.plan, onnxruntime for .onnx")
    be.add_argument("--iters", type=int, default=50, help="timed iterations (default: 50)")
    be.add_argument("--warmup", type=int, default=5, help="untimed iterations first (default: 5)")
    be.add_argument("--json", help="write the figures to this JSON file")
    be.add_argument("--against-eager", metavar="WEIGHTS", help="also time the PyTorch eager model")
    be.add_argument("--device", default="auto",
                    help="device of the --against-eager model: auto | cpu | cuda | cuda:N (auto: CUDA when present)")
    be.add_argument("--plugin", help="TensorRT plugin library (default $MASKRT_PLUGIN_LIB or build/plugins/)")
    be.add_argument("--source", help="time the pipelined loop on this video, camera index or image at its own "
                                     "resolution, beside the engine alone (e.g. --source clip.mp4)")
    be.add_argument("--draw", action="store_true", help="with --source: also draw overlays and encode them to a "
                                                        "temporary mp4, as `infer --save` does")
    be.add_argument("--conf", type=float, default=0.0, help="with --source: score threshold (default 0.0: every "
                                                            "detection the graph keeps, the worst case)")
    be.add_argument("--rounds", type=int, default=3, help="with --source: interleaved rounds of engine-alone and "
                                                          "loop timing (--iters frames each); medians reported")
    be.add_argument("--threads", type=int,
                    help="ONNX Runtime intra-op threads (default: one per core), for the engine alone and the loop "
                    "alike")
    be.add_argument("--draw-threads", type=int, default=1,
                    help="with --source: threads that paste each frame's masks and draw its overlay (default 1), "
                    "as `infer --draw-threads`")
    be.set_defaults(handler=_bench)

    # doctor
    do = _verb(verbs, "doctor", "check what maskrt needs on this machine; each missing piece comes with its fix",
               "maskrt doctor --backend tensorrt")
    do.add_argument("--backend", action="append", choices=["onnxruntime", "tensorrt"],
                    help="a backend you will run (repeatable): what it needs is a failure when missing, "
                         "and doctor exits 1")
    do.add_argument("--json", action="store_true",
                    help="print {\"checks\": [{name, status, detail, fix}, ...]} instead of the table")
    do.add_argument("--plugin", help="TensorRT plugin library to check (default $MASKRT_PLUGIN_LIB or build/plugins/)")
    do.set_defaults(handler=_doctor)

    # serve
    se = _verb(verbs, "serve", "serve a model on Triton Inference Server (HTTP, gRPC, metrics)",
               "maskrt serve --model edge.onnx --http-port 8000")
    se.add_argument("--model", required=True, help=".onnx, or .engine/.plan, served as Triton model 'maskrt'")
    se.add_argument("--host", default="127.0.0.1",
                    help="address the three endpoints bind to (default 127.0.0.1; 0.0.0.0 for every interface)")
    se.add_argument("--http-port", type=int, default=8000, help="Triton HTTP/REST port (default 8000)")
    se.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port (default 8001)")
    se.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    se.add_argument("--max-batch", type=int, default=8, help="largest batch the dynamic batcher forms (default 8)")
    se.add_argument("--instances", type=int, default=1, help="model instances (processes) serving in parallel")
    se.add_argument("--threads", type=int,
                    help="ONNX Runtime intra-op threads per instance (default: one per core); on a CPU server "
                    "`--instances <cores> --threads 1 --max-batch 1` serves the most images per second, at one "
                    "thread's latency per request (docs/serving.md)")
    se.add_argument("--max-queue-delay-us", type=int, default=0,
                    help="how long (microseconds) the dynamic batcher holds a request to wait for others "
                    "(default 0: requests that queue while the model is busy are batched anyway)")
    se.add_argument("--conf", type=float, default=0.5, help="keep detections with score >= conf (default 0.5)")
    se.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                    help="what runs the graph inside the server (default: by file suffix)")
    se.add_argument("--plugin", help="TensorRT plugin library (default $MASKRT_PLUGIN_LIB or build/plugins/)")
    se.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for Triton to be ready")
    se.add_argument("--log", help="write Triton's log to this file (default: a temporary file)")
    se.set_defaults(handler=_serve)

    # demo
    de = _verb(verbs, "demo", "synthetic data -> train -> eval -> export -> runtime -> report",
               "maskrt demo --out runs/demo --minutes 6")
    de.add_argument("--out", default="runs/demo", help="folder for data, run, graphs and report.md (default: runs/demo)")
    de.add_argument("--minutes", type=float, default=6.0, help="training budget")
    de.add_argument("--seed", type=int, default=0, help="random seed of data and training")
    de.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N for training and the eager eval/bench")
    de.set_defaults(handler=_demo)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        # `maskrt`, `maskrt data`, `maskrt plugin` without an action: show the help.
        parser.parse_args([*(argv or sys.argv[1:]), "--help"])
        return 2
    try:
        return int(handler(args) or 0)
    except MaskrtError as err:
        print(f"maskrt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maskrt: interrupted", file=sys.stderr)
        return 130
