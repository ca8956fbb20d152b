"""`maskrt export`: weights -> ONNX graph (arguments declared in maskrt/cli.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from maskrt.errors import MaskrtError


def export_command(args: argparse.Namespace) -> int:
    """Load `--weights`, export to `--out` for `--target` at `--precision`; print a one-line summary."""
    model, triton = getattr(args, "model", None), getattr(args, "triton", None)  # absent: older callers
    if model and not triton:
        raise MaskrtError("--model is for --triton: export --weights to --out, or add --triton REPO")
    if triton and model:
        if args.weights:
            raise MaskrtError("give --weights (export, then the repository) or --model (an existing model), not both")
        from maskrt.export.triton import export_triton_command
        return export_triton_command(args, model)
    missing = [flag for flag, value in (("--weights", args.weights), ("--input-size", args.input_size),
                                        ("--out", args.out)) if not value]
    if missing:
        raise MaskrtError(f"maskrt export needs {', '.join(missing)} (or --triton REPO --model MODEL)")
    from maskrt.export.onnx_export import export_onnx, read_metadata
    from maskrt.model import load_model

    weights = Path(args.weights)
    if not weights.is_file():
        raise MaskrtError(f"weights file {weights} does not exist")
    if args.calib and args.precision != "int8":
        raise MaskrtError("--calib is only used with --precision int8")
    if getattr(args, "source", None):  # a torchvision / detectron2 checkpoint, as `maskrt convert` reads it
        from maskrt.model.commands import convert_checkpoint
        model, report = convert_checkpoint(args.source, weights)
        for line in report.lines():
            print(line)
    else:
        model = load_model(weights)
    out = export_onnx(model, args.out, input_size=tuple(args.input_size), target=args.target,
                      precision=args.precision, batch=args.batch, calib_dir=args.calib)
    import onnx

    graph = onnx.load(str(out), load_external_data=False)
    metadata = read_metadata(graph)
    batch = args.batch if args.batch else "dynamic"
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): target {args.target}, {args.precision}, "
          f"input [{batch},3,{args.input_size[0]},{args.input_size[1]}], "
          f"{len(json.loads(metadata['class_names'])) - 1} classes, opset {metadata['opset']}")
    if triton:
        from maskrt.export.triton import export_triton_command
        return export_triton_command(args, str(out))
    return 0
