"""Training loop: SGD with momentum (or AdamW) and weight decay, warm-up then cosine (or step) decay
fitted to the budget, seeded data order, atomic checkpoints, exact resume.

Budget. `epochs` fixes the number of steps; `minutes` fixes wall-clock time. Either way the
learning rate is a function of the *fraction of the budget used* (steps done / total steps,
or elapsed / budgeted seconds), so a time budget still gets a whole warm-up + decay.

Determinism. The data order of epoch e is a permutation drawn from (seed, e); the
augmentation of the item at (epoch, position) and the model's own sampling (RPN / RoI
samplers use torch's RNG) at step s are seeded from (seed, step). A run resumed from a
checkpoint therefore takes the same steps as one that never stopped.

Checkpoint (every `checkpoint_every` steps and at the end), in OUT:
  model.safetensors        weights + maskrt metadata (`save_model`), loadable on its own;
  train_state.safetensors  optimiser state, `<parameter name>::<field>` (momentum_buffer, or
                           AdamW's exp_avg / exp_avg_sq / step);
  train_state.json         step, epoch, position, lr, elapsed seconds, seed, the config.
Each file is written to a temp name and moved into place with os.replace, JSON last: a run
killed at any moment (SIGKILL included) resumes from the last complete checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from maskrt.errors import MaskrtError
from maskrt.model.transform import resized_size
from maskrt.train.coco import CocoDataset, Sample
from maskrt.train.transforms import resize, train_augment

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"

# Preset training defaults (images per step, base lr, optimiser). Edge, from scratch in a
# 10-minute budget: AdamW lr 2e-3 beat the best SGD setting (batch 2, lr 0.04, itself the best
# of a batch / lr sweep) by +2.9 segm AP on the same data. In a short budget more, larger
# updates win (an image costs about the same at any batch size). See docs/training.md.
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "edge": {"batch_size": 2, "lr": 0.002, "optimizer": "adamw"},
    "r50_fpn": {"batch_size": 2, "lr": 0.01, "optimizer": "sgd"},
}

# Training-only model settings per preset (they change neither the architecture nor
# inference). For edge: the RPN keeps 300 boxes per level before NMS and 200 after while
# training (inference keeps the preset's own numbers); this halves the CPU time of a step
# (the RPN's NMS over ~2000 boxes per image was a quarter of it), measured 2.7 -> 1.3 CPU-s
# per 4-image step at 256 px.
TRAIN_MODEL_OVERRIDES: dict[str, dict[str, Any]] = {
    "edge": {"rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 200},
    "r50_fpn": {},
}


@dataclass
class TrainConfig:
    """Everything a run depends on. `model_overrides` go to `build_model` (constructor names,
    e.g. min_size / max_size); the other fields are the optimiser, schedule and data knobs."""

    data: str
    out: str
    preset: str = "edge"
    epochs: float | None = None
    minutes: float | None = None
    weights: str | None = None
    resume: bool = False
    roi_op: str = "align"
    seed: int = 0
    batch_size: int | None = None
    lr: float | None = None
    checkpoint_every: int = 50
    progress: bool = True
    optimizer: str | None = None  # "sgd" (momentum) | "adamw"; preset default
    momentum: float = 0.9  # SGD momentum, AdamW beta1
    weight_decay: float | None = None  # SGD: 1e-4 (L2); AdamW: 0.05 (decoupled)
    warmup_fraction: float = 0.05  # of the budget
    # "wall": --minutes are wall-clock minutes. "process_cpu": they are this process's CPU
    # seconds / cpu_per_wall_second, so that runs on a machine shared with other jobs get the
    # work an unloaded 2-core machine does in that time (used for the measurements in
    # docs/training.md; torch keeps ~1.5 cores busy per wall second there).
    budget_clock: str = "wall"
    cpu_per_wall_second: float = 1.5
    warmup_start_factor: float = 0.001
    schedule: str = "cosine"  # or "step": x0.1 at 70 % and 90 % of the budget
    final_lr_factor: float = 0.01  # cosine ends at lr * this
    clip_grad_norm: float = 10.0
    log_every: int = 10
    augment: bool = True
    scale_range: tuple[float, float] = (0.6, 1.5)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # "bf16": forward under CPU autocast to bfloat16 (weights, gradients, optimiser and losses
    # stay float32); "fp32"; "auto": bf16 where the CPU has native bf16 dot products
    # (AVX512-BF16 / AMX), else fp32. Resolved once, in __post_init__.
    precision: str = "auto"

    def __post_init__(self) -> None:
        defaults = PRESET_DEFAULTS.get(self.preset)
        if defaults is None:
            raise MaskrtError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESET_DEFAULTS)}")
        if self.batch_size is None:
            self.batch_size = int(defaults["batch_size"])
        if self.lr is None:
            self.lr = float(defaults["lr"])
        if self.optimizer is None:
            self.optimizer = str(defaults["optimizer"])
        if self.optimizer not in ("sgd", "adamw"):
            raise MaskrtError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.weight_decay is None:
            self.weight_decay = 1e-4 if self.optimizer == "sgd" else 0.05
        if self.epochs is None and self.minutes is None and not self.resume:
            raise MaskrtError("give a training budget: --epochs N or --minutes M")  # --resume reuses the stored one
        if (self.epochs is not None and self.epochs <= 0) or (self.minutes is not None and self.minutes <= 0):
            raise MaskrtError("the training budget (--epochs / --minutes) must be positive")
        if self.batch_size < 1 or self.lr <= 0 or self.checkpoint_every < 1:
            raise MaskrtError("--batch-size and --checkpoint-every must be >= 1 and --lr > 0")
        if self.roi_op not in ("align", "pool"):
            raise MaskrtError(f"--roi-op must be align or pool, got {self.roi_op!r}")
        if self.budget_clock not in ("wall", "process_cpu"):
            raise MaskrtError(f"budget_clock must be wall or process_cpu, got {self.budget_clock!r}")
        if self.schedule not in ("cosine", "step"):
            raise MaskrtError(f"schedule must be cosine or step, got {self.schedule!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise MaskrtError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.precision == "auto":
            self.precision = "bf16" if cpu_has_native_bf16() else "fp32"
        self.scale_range = tuple(self.scale_range)  # JSON round trip gives a list

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        return cls(data=args.data, out=args.out, preset=args.config, epochs=args.epochs, minutes=args.minutes,
                   weights=args.weights, resume=args.resume, roi_op=args.roi_op, seed=args.seed,
                   batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                   checkpoint_every=args.checkpoint_every, precision=args.precision,
                   progress=not args.no_progress)


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16), read
    from /proc/cpuinfo. Without them oneDNN converts bf16 in software: no gain is expected
    there (not measured), so "auto" stays float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# --- schedule -----------------------------------------------------------------------------

def lr_at(fraction: float, config: TrainConfig) -> float:
    """Learning rate after `fraction` (0..1) of the budget: linear warm-up from
    lr * warmup_start_factor over warmup_fraction, then cosine to lr * final_lr_factor (or
    x0.1 steps at 70 % and 90 %)."""
    fraction = min(max(fraction, 0.0), 1.0)
    base = float(config.lr)
    if config.warmup_fraction > 0 and fraction < config.warmup_fraction:
        t = fraction / config.warmup_fraction
        return base * (config.warmup_start_factor + (1 - config.warmup_start_factor) * t)
    if config.schedule == "step":
        return base * (0.1 ** (int(fraction >= 0.7) + int(fraction >= 0.9)))
    t = (fraction - config.warmup_fraction) / max(1e-12, 1 - config.warmup_fraction)
    final = base * config.final_lr_factor
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * t))


# --- data order ---------------------------------------------------------------------------

def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The permutation of item indices used in `epoch` (a pure function of seed and epoch)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch, 0x0D47A))).permutation(count)


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The augmentation randomness of the item at (epoch, position)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch, position, 0xA06)))


def to_model_inputs(sample: Sample) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """numpy Sample -> (RGB float [3,H,W] in [0,1], target dict of tensors) for MaskRCNN.

    The training side's one BGR uint8 -> RGB float conversion.
    """
    image = torch.from_numpy(np.ascontiguousarray(sample.image[:, :, ::-1])).permute(2, 0, 1).float().div_(255)
    target = {"boxes": torch.from_numpy(sample.boxes.astype(np.float32)).reshape(-1, 4),
              "labels": torch.from_numpy(sample.labels.astype(np.int64)),
              "masks": torch.from_numpy(sample.masks.astype(np.uint8))}
    return image, target


@dataclass
class Cursor:
    """Where training stands: optimiser steps done, and the next item of the data order."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    elapsed_s: float = 0.0


class BatchReader:
    """Yields training batches in the seeded order from `cursor` on, skipping images that
    do not decode (counted by the dataset) or that have no target after augmentation.

    `input_size` (the model's (min_size, max_size)): an image the model would shrink is
    shrunk to that scale on loading, before augmentation. The model's own resize then
    changes nothing, and a 640 px image's masks are augmented at 256 px (edge preset, 640 px
    PNGs: 19-21 -> 9-10 ms per image loaded and augmented; decoding is most of what is left).
    """

    def __init__(self, dataset: CocoDataset, config: TrainConfig, cursor: Cursor,
                 input_size: tuple[float, float] | None = None) -> None:
        self.dataset, self.config, self.cursor = dataset, config, cursor
        self.input_size = input_size
        self._order = epoch_order(config.seed, cursor.epoch, len(dataset))

    def _load(self, index: int) -> Sample | None:
        sample = self.dataset[index]
        if sample is not None and self.input_size is not None:
            height, width = sample.image.shape[:2]
            new_height, new_width = resized_size(height, width, *self.input_size)
            if new_height < height or new_width < width:  # only a scale below 1 makes either side smaller
                sample = resize(sample, new_height, new_width)
        return sample

    def next_batch(self) -> list[Sample]:
        batch: list[Sample] = []
        misses = 0
        while len(batch) < int(self.config.batch_size):
            cursor = self.cursor
            if cursor.position >= len(self._order):
                cursor.epoch, cursor.position = cursor.epoch + 1, 0
                self._order = epoch_order(self.config.seed, cursor.epoch, len(self.dataset))
            position = cursor.position
            cursor.position += 1
            sample = self._load(int(self._order[position]))
            if sample is not None and sample.labels.size and self.config.augment:
                sample = train_augment(sample, sample_rng(self.config.seed, cursor.epoch, position),
                                       scale_range=self.config.scale_range)
            if sample is None or not sample.labels.size:
                misses += 1
                if misses > 2 * len(self.dataset):
                    raise MaskrtError(f"no usable training image in {self.dataset.image_dir}")
                continue
            batch.append(sample)
        if self.cursor.position >= len(self._order):  # roll over now, so `epoch` counts finished epochs
            self.cursor.epoch, self.cursor.position = self.cursor.epoch + 1, 0
            self._order = epoch_order(self.config.seed, self.cursor.epoch, len(self.dataset))
        return batch


# --- checkpoints --------------------------------------------------------------------------

def _replace_atomically(write: Callable[[Path], None], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cursor: Cursor,
                    lr: float, config: TrainConfig) -> None:
    """Write weights, optimiser state and the JSON state atomically (JSON last)."""
    from safetensors.torch import save_file

    from maskrt.model import save_model

    names = {id(p): name for name, p in model.named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():  # momentum_buffer | exp_avg, exp_avg_sq, step
                if torch.is_tensor(value):
                    tensors[f"{names[id(param)]}::{key}"] = value.detach().contiguous()
    _replace_atomically(lambda p: save_file(tensors, str(p), metadata={"step": str(cursor.step)}),
                        out / STATE_TENSORS)
    _replace_atomically(lambda p: save_model(model, p), out / WEIGHTS)
    state = {"step": cursor.step, "epoch": cursor.epoch, "position": cursor.position, "lr": lr,
             "elapsed_s": cursor.elapsed_s, "seed": config.seed, "torch_seed_rule": "seed * 1_000_003 + step",
             "config": {k: v for k, v in asdict(config).items() if k not in ("resume", "progress")}}
    _replace_atomically(lambda p: p.write_text(json.dumps(state, indent=1)), out / STATE_JSON)


def load_checkpoint(out: Path) -> dict[str, Any]:
    """The JSON state of OUT's last checkpoint; one-line errors when it is missing or torn."""
    path = out / STATE_JSON
    if not path.is_file():
        raise MaskrtError(f"--resume: no checkpoint in {out} (missing {STATE_JSON})")
    try:
        state = json.loads(path.read_text())
        int(state["step"]), dict(state["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise MaskrtError(f"--resume: {path} is not a maskrt training state")
    for name in (WEIGHTS, STATE_TENSORS):
        if not (out / name).is_file():
            raise MaskrtError(f"--resume: {out / name} is missing")
    return state


def restore_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, out: Path, step: int) -> None:
    """Put the saved optimiser state (momentum buffers, or AdamW's moments and step counts)
    back into `optimizer`, by parameter name."""
    from safetensors import safe_open

    with safe_open(str(out / STATE_TENSORS), framework="pt") as handle:
        saved_step = (handle.metadata() or {}).get("step")
        if saved_step is not None and int(saved_step) != step:
            raise MaskrtError(f"--resume: {STATE_TENSORS} is from step {saved_step}, {STATE_JSON} from step {step}")
        params = dict(model.named_parameters())
        for key in handle.keys():
            name, _, field_name = key.rpartition("::")
            if name not in params:
                # An older layout (keys without `<name>::`) or another model's state: resuming
                # would silently restart the optimiser, so say so instead.
                raise MaskrtError(f"--resume: {STATE_TENSORS} entry {key!r} names no parameter of the model "
                                  f"(a checkpoint from another maskrt version or model); start a new run")
            value = handle.get_tensor(key)
            optimizer.state[params[name]][field_name] = value if field_name == "step" else value.to(params[name].dtype)


# --- the model ----------------------------------------------------------------------------

def make_model(config: TrainConfig, dataset: CocoDataset) -> torch.nn.Module:
    """A fresh model for the dataset's classes, optionally initialised from `config.weights`
    (every tensor whose name and shape match: a backbone, or the whole model)."""
    from maskrt.model import build_model, load_model

    overrides = {**TRAIN_MODEL_OVERRIDES.get(config.preset, {}), **config.model_overrides}
    model = build_model(config.preset, dataset.num_classes, list(dataset.class_names), roi_op=config.roi_op,
                        **overrides)
    set_category_ids(model, dataset.category_ids)
    if config.weights:
        if not Path(config.weights).is_file():
            raise MaskrtError(f"--weights file not found: {config.weights}")
        source = load_model(config.weights).state_dict()
        own = model.state_dict()
        matched = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
        if not matched:
            raise MaskrtError(f"--weights {config.weights}: no tensor matches the {config.preset} model")
        model.load_state_dict(matched, strict=False)
        print(f"initialised {len(matched)}/{len(own)} tensors from {config.weights}", file=sys.stderr)
    return model


def set_category_ids(model: torch.nn.Module, category_ids: list[int]) -> None:
    """Record the dataset's COCO category ids on the model (saved in its metadata)."""
    model.category_ids = list(category_ids)


# --- the loop -----------------------------------------------------------------------------

def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def train(config: TrainConfig, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train per `config`; return a summary {step, epoch, elapsed_s, weights, last losses}.

    `stop_after_steps` ends the run early at that step (with a checkpoint), leaving the
    schedule untouched: how the tests simulate an interrupted run.
    """
    out = Path(config.out)
    dataset = CocoDataset(config.data, "train", drop_empty=True)
    if len(dataset) == 0:
        raise MaskrtError(f"no training image with annotations in {dataset.annotation_file}")

    cursor = Cursor()
    state = None
    if config.resume:
        state = load_checkpoint(out)
        stored = state["config"]
        # The run's identity (preset, classes, optimiser, data order) comes from the checkpoint;
        # only the budget may be extended from the command line.
        budget = {"epochs": config.epochs, "minutes": config.minutes} if (config.epochs or config.minutes) else {}
        config = TrainConfig(**{**stored, **budget, "data": config.data, "out": config.out, "resume": True,
                                "progress": config.progress})
        cursor = Cursor(step=int(state["step"]), epoch=int(state["epoch"]), position=int(state["position"]),
                        elapsed_s=float(state["elapsed_s"]))
    out.mkdir(parents=True, exist_ok=True)

    _seed_everything(config.seed)
    if state is not None:
        from maskrt.model import load_model

        model = load_model(out / WEIGHTS)
        if list(model.class_names) != list(dataset.class_names):
            raise MaskrtError(f"--resume: the checkpoint's classes differ from those of {config.data}")
        set_category_ids(model, dataset.category_ids)
    else:
        model = make_model(config, dataset)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on norm layers and biases (1-D tensors), as detectron2 does for GN/BN.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        # fused: one kernel over all tensors, 3 ms instead of 9 per edge step (2 threads).
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=float(config.lr),
                                                             betas=(config.momentum, 0.999), fused=True)
    else:
        optimizer = torch.optim.SGD(groups, lr=float(config.lr), momentum=config.momentum)
    if state is not None:
        restore_optimizer_state(model, optimizer, out, cursor.step)

    images_per_epoch = len(dataset)
    total_steps = (math.ceil(config.epochs * images_per_epoch / int(config.batch_size))
                   if config.epochs is not None else None)
    budget_s = config.minutes * 60 if config.minutes is not None else None

    def fraction_done() -> float:
        if total_steps is not None:
            return cursor.step / max(total_steps, 1)
        return cursor.elapsed_s / budget_s  # type: ignore[operator]

    def finished() -> bool:
        return fraction_done() >= 1.0 or (stop_after_steps is not None and cursor.step >= stop_after_steps)

    reader = BatchReader(dataset, config, cursor, (max(model.min_size), model.max_size))
    bar = None
    if config.progress:
        from tqdm import tqdm

        from maskrt.progress import progress_options  # a live bar on a terminal, a line every 10 s in a log
        bar = tqdm(total=total_steps, initial=cursor.step, unit="step", desc=f"train {config.preset}",
                   **progress_options(sys.stderr))
    running: dict[str, float] = {}
    metrics_file = open(out / METRICS, "a")
    lr = lr_at(fraction_done(), config)
    last_losses: dict[str, float] = {}
    # Elapsed time is wall clock over the loop (data, steps, checkpoints), added to what
    # earlier runs of a resumed training already spent.
    loop_start, spent_before = time.perf_counter(), cursor.elapsed_s
    cpu_start = time.process_time()  # CPU seconds of this process (all threads), for load-independent comparisons
    try:
        while not finished():
            lr = lr_at(fraction_done(), config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = reader.next_batch()
            # The model's own sampling (RPN / RoI balanced samplers) is seeded per step.
            torch.manual_seed(config.seed * 1_000_003 + cursor.step)
            images, targets = zip(*(to_model_inputs(s) for s in batch))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                losses = model(list(images), list(targets))  # float32: autocast runs losses in fp32
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise MaskrtError(f"training diverged at step {cursor.step} (loss {float(loss)}): lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            optimizer.step()
            cursor.step += 1
            if config.budget_clock == "process_cpu":
                cursor.elapsed_s = spent_before + (time.process_time() - cpu_start) / config.cpu_per_wall_second
            else:
                cursor.elapsed_s = spent_before + time.perf_counter() - loop_start
            last_losses = {k: float(v.detach()) for k, v in losses.items()}
            last_losses["loss"] = float(loss.detach())
            for k, v in last_losses.items():  # running means shown on the bar
                running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running['loss']:.3f}", mask=f"{running.get('loss_mask', 0):.3f}",
                                lr=f"{lr:.4f}", refresh=False)
                if total_steps is None:
                    bar.set_description(f"train {config.preset} {cursor.elapsed_s / 60:.1f}/{config.minutes:g} min",
                                        refresh=False)  # redrawn by update() at its own pace (mininterval)
            if cursor.step % config.log_every == 0 or cursor.step == 1:
                metrics_file.write(json.dumps({"step": cursor.step, "epoch": cursor.epoch,
                                               "elapsed_s": round(cursor.elapsed_s, 3),
                                               "cpu_s": round(time.process_time() - cpu_start, 3), "lr": lr,
                                               **{k: round(v, 5) for k, v in last_losses.items()}}) + "\n")
                metrics_file.flush()
            if cursor.step % config.checkpoint_every == 0 and not finished():
                save_checkpoint(out, model, optimizer, cursor, lr, config)
        save_checkpoint(out, model, optimizer, cursor, lr, config)
    finally:
        metrics_file.close()
        if bar is not None:
            bar.close()
        dataset.warn_skipped()
    return {"step": cursor.step, "epoch": cursor.epoch, "elapsed_s": cursor.elapsed_s,
            "weights": str(out / WEIGHTS), "losses": last_losses, "lr": lr}
