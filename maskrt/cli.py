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


def _bench(args: argparse.Namespace) -> int:
    from maskrt.runtime.commands import bench_command
    return bench_command(args)


def _demo(args: argparse.Namespace) -> int:
    from maskrt.demo import demo_command
    return demo_command(args)


# --- the parser ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrt",
        description="Mask R-CNN: train in PyTorch, export to ONNX, build TensorRT engines, run torch-free.",
    )
    parser.add_argument("--version", action="version", version=f"maskrt {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>")

    # data
    data = verbs.add_parser("data", help="datasets: generate synthetic COCO data")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="<action>")
    synth = data_verbs.add_parser("synth", help="write a synthetic COCO instance-segmentation dataset")
    synth.add_argument("--out", required=True, help="output folder (COCO short layout)")
    synth.add_argument("--train", type=int, default=200, help="training images")
    synth.add_argument("--val", type=int, default=50, help="validation images")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=_data_synth)

    # train
    train = verbs.add_parser("train", help="train a Mask R-CNN on COCO-format data")
    train.add_argument("--data", required=True, help="COCO folder (2017 layout or the short one)")
    train.add_argument("--config", default="edge", choices=["edge", "r50_fpn"], help="model preset")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, help="training length in epochs")
    budget.add_argument("--minutes", type=float, help="training length in wall-clock minutes")
    train.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl")
    train.add_argument("--weights", help="initial weights (maskrt .safetensors)")
    train.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    train.add_argument("--roi-op", default="align", choices=["align", "pool"], help="RoI feature op")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--batch-size", type=int, help="images per step (preset default)")
    train.add_argument("--lr", type=float, help="base learning rate (preset default)")
    train.add_argument("--optimizer", choices=("sgd", "adamw"), help="optimiser (preset default)")
    train.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                       help="forward in bf16 autocast or fp32; auto: bf16 where the CPU has native bf16")
    train.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)

    # eval
    ev = verbs.add_parser("eval", help="COCO bbox and segm AP of a model on a dataset")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="maskrt weights (.safetensors), evaluated in PyTorch")
    source.add_argument("--model", help="exported model (.onnx), evaluated with the torch-free runtime")
    ev.add_argument("--data", required=True)
    ev.add_argument("--split", default="val")
    ev.add_argument("--out", help="JSON file for the metrics (default: beside the weights/model)")
    ev.set_defaults(handler=_eval)

    # predict
    pr = verbs.add_parser("predict", help="overlay pictures and COCO results for images")
    pr.add_argument("--weights", required=True)
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument("--out", required=True)
    pr.add_argument("--conf", type=float, default=0.5)
    pr.set_defaults(handler=_predict)

    # ablate
    ab = verbs.add_parser("ablate", help="RoIAlign vs RoIPool: train both, compare mask AP")
    ab.add_argument("--data", help="COCO folder (default: generate a synthetic one)")
    ab.add_argument("--minutes", type=float, default=4.0, help="training budget per model")
    ab.add_argument("--out", default="runs/ablation")
    ab.add_argument("--seed", type=int, default=0)
    ab.set_defaults(handler=_ablate)

    # export
    ex = verbs.add_parser("export", help="export weights to an ONNX graph (portable or TensorRT target)")
    ex.add_argument("--weights", required=True)
    ex.add_argument("--target", default="onnx", choices=["onnx", "tensorrt"])
    ex.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    ex.add_argument("--calib", help="calibration images folder for int8 (default: calib_data/)")
    ex.add_argument("--input-size", type=_input_size, required=True, metavar="HxW")
    ex.add_argument("--batch", type=int, default=None,
                    help="fixed batch size (default: dynamic batch)")
    ex.add_argument("--out", required=True)
    ex.set_defaults(handler=_export)

    # build
    bu = verbs.add_parser("build", help="build a TensorRT engine from a TensorRT-target ONNX graph")
    bu.add_argument("--onnx", required=True)
    bu.add_argument("--out", required=True)
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
    pl = verbs.add_parser("plugin", help="the MultilevelRoIAlign plugin library")
    pl_verbs = pl.add_subparsers(dest="plugin_verb", metavar="<action>")
    pb = pl_verbs.add_parser("build", help="build libmaskrt_plugins.so (CMake + nvcc)")
    pb.add_argument("--tensorrt-include", help="TensorRT include/ folder (or $TENSORRT_INCLUDE_DIR)")
    pb.add_argument("--cuda-archs", help="CUDA architectures, e.g. '87;90' (default: 75;80;86;87;89;90)")
    pb.add_argument("--build-dir", default="build/plugins")
    pb.add_argument("--cpu-only", action="store_true", help="build only the CPU reference library")
    pb.set_defaults(handler=_plugin_build)

    # infer
    inf = verbs.add_parser("infer", help="real-time inference on a camera, video, stream, image or folder")
    inf.add_argument("--model", required=True, help=".onnx, or .engine/.plan")
    inf.add_argument("--source", required=True, help="0 | /dev/videoN | file.mp4 | rtsp://... | image | dir")
    inf.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    inf.add_argument("--show", action="store_true")
    inf.add_argument("--save", help="out.mp4 or a folder of PNGs")
    inf.add_argument("--conf", type=float, default=0.5)
    inf.add_argument("--max-frames", type=int, default=None)
    inf.add_argument("--plugin", help="TensorRT plugin library (default $MASKRT_PLUGIN_LIB or build/plugins/)")
    inf.set_defaults(handler=_infer)

    # bench
    be = verbs.add_parser("bench", help="latency and throughput of a model, pre/infer/post split")
    be.add_argument("--model", required=True)
    be.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    be.add_argument("--iters", type=int, default=50)
    be.add_argument("--warmup", type=int, default=5)
    be.add_argument("--json", help="write the figures to this JSON file")
    be.add_argument("--against-eager", metavar="WEIGHTS", help="also time the PyTorch eager model")
    be.add_argument("--plugin", help="TensorRT plugin library (default $MASKRT_PLUGIN_LIB or build/plugins/)")
    be.add_argument("--source", help="time the pipelined loop on this video, camera index or image at its own "
                                     "resolution, beside the engine alone (e.g. --source clip.mp4)")
    be.add_argument("--draw", action="store_true", help="with --source: also draw overlays and encode them to a "
                                                        "temporary mp4, as `infer --save` does")
    be.add_argument("--conf", type=float, default=0.0, help="with --source: score threshold (default 0.0: every "
                                                            "detection the graph keeps, the worst case)")
    be.add_argument("--rounds", type=int, default=3, help="with --source: interleaved rounds of engine-alone and "
                                                          "loop timing (--iters frames each); medians reported")
    be.set_defaults(handler=_bench)

    # demo
    de = verbs.add_parser("demo", help="synthetic data -> train -> eval -> export -> runtime -> report")
    de.add_argument("--out", default="runs/demo")
    de.add_argument("--minutes", type=float, default=6.0, help="training budget")
    de.add_argument("--seed", type=int, default=0)
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
