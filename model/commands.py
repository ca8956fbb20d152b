"""`maskrt convert` (and `maskrt export --from`): a torchvision or detectron2 checkpoint ->
our model, through the public converters `from_torchvision` / `from_detectron2`.

The converters are strict: every source entry is loaded into the model, used as a setting,
dropped by a stated rule, or the conversion fails with one line naming it. So when a
conversion succeeds, the report below (what was loaded, used, skipped) follows from the
source's key names and those rules alone; `conversion_report` states them.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskrt.errors import MaskrtError

SOURCES = ("torchvision", "detectron2")
# detectron2 entries that are settings, not weights: pixel statistics -> image_mean / image_std,
# the RPN's saved cell anchors -> checked against the anchor settings.
_D2_SETTING_KEYS = re.compile(r"pixel_mean|pixel_std|proposal_generator\.anchor_generator\.cell_anchors\.\d+")


@dataclass
class ConversionReport:
    """What a conversion did with each entry of the source checkpoint."""

    source: str
    path: Path
    entries: int
    loaded: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"read {self.entries} entries from {self.path} ({self.source}): {len(self.loaded)} loaded into "
               f"the model, {len(self.settings)} used as settings, {len(self.skipped)} skipped"]
        if self.settings:
            out.append(f"  used as settings: {', '.join(self.settings)}")
        if self.skipped:
            out.append(f"  skipped: {len(self.skipped)} BatchNorm num_batches_tracked counters "
                       "(a training step count, unused at inference)")
        return out


def conversion_report(source: str, path: Path, keys: list[str]) -> ConversionReport:
    """Sort a successfully converted checkpoint's keys into loaded / settings / skipped, by the
    converters' rules (model/convert.py): `num_batches_tracked` is dropped; for detectron2,
    pixel statistics and cell anchors are settings; every other entry was loaded."""
    report = ConversionReport(source, path, len(keys))
    for key in keys:
        if key.endswith(".num_batches_tracked"):
            report.skipped.append(key)
        elif source == "detectron2" and _D2_SETTING_KEYS.fullmatch(key):
            report.settings.append(key)
        else:
            report.loaded.append(key)
    return report


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a text file (one per line) or a JSON list, background first.

    "__background__" is prepended when the file starts with the first real class."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise MaskrtError(f"cannot read class names {path}: {err}") from None
    if path.suffix == ".json":
        try:
            names = json.loads(text)
        except ValueError as err:
            raise MaskrtError(f"class names {path}: not JSON: {err}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise MaskrtError(f"class names {path}: expected a JSON list of strings")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise MaskrtError(f"class names {path} is empty")
    return names if names[0] == "__background__" else ["__background__", *names]


def convert_checkpoint(source: str, path: str | Path, num_classes: int | None = None,
                       class_names_file: str | None = None, input_format: str = "BGR"
                       ) -> tuple[Any, ConversionReport]:
    """(model, report) for a torchvision `.pth` state dict or a detectron2 `.pkl` / `.pth`."""
    from maskrt.model.convert import (from_detectron2, from_torchvision, read_detectron2_checkpoint,
                                      read_torchvision_state_dict)

    if source not in SOURCES:
        raise MaskrtError(f"unknown checkpoint source {source!r}: choose torchvision or detectron2")
    path = Path(path)
    overrides: dict[str, Any] = {}
    if class_names_file:
        overrides["class_names"] = read_class_names(class_names_file)
        if num_classes is not None and len(overrides["class_names"]) != num_classes:
            raise MaskrtError(f"{class_names_file} names {len(overrides['class_names']) - 1} classes + background, "
                              f"but --num-classes is {num_classes}")
    if source == "torchvision":
        state = read_torchvision_state_dict(path)
        classes = num_classes or (len(overrides["class_names"]) if "class_names" in overrides else 91)
        model = from_torchvision(state, num_classes=classes, **overrides)
        keys = list(state)
    else:
        keys = list(read_detectron2_checkpoint(path))
        model = from_detectron2(path, input_format=input_format, **overrides)  # type: ignore[arg-type]
        if num_classes is not None and model.num_classes != num_classes:
            raise MaskrtError(f"{path} has {model.num_classes - 1} classes + background, "
                              f"not --num-classes {num_classes}")
    if "class_names" in overrides and len(overrides["class_names"]) != model.num_classes:
        raise MaskrtError(f"{class_names_file} names {len(overrides['class_names']) - 1} classes + background; "
                          f"the checkpoint has {model.num_classes - 1} + background")
    return model, conversion_report(source, path, keys)


def convert_command(args: argparse.Namespace) -> int:
    """`maskrt convert --from SOURCE CKPT --out model.safetensors`: convert, report, save."""
    from maskrt.model import save_model

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise MaskrtError(f"--out must end in .safetensors, got {out}")
    model, report = convert_checkpoint(args.source, args.checkpoint, args.num_classes, args.class_names,
                                       args.input_format)
    for line in report.lines():
        print(line)
    save_model(model, out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): r50_fpn, {model.num_classes - 1} classes "
          f"+ background ({', '.join(model.class_names[1:4])}{', ...' if model.num_classes > 4 else ''})")
    return 0
