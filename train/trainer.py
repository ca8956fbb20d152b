"""Training loop: SGD with momentum (or AdamW) and weight decay, warm-up then cosine (or step) decay
fitted to the budget, seeded data order, atomic checkpoints, exact resume.

Budget. `steps` fixes the number of optimiser steps, `epochs` fixes it through the data
size; `minutes` fixes wall-clock time. Either way the learning rate is a function of the
*fraction of the budget used* (steps done / total steps, or elapsed / budgeted seconds), so a
time budget still gets a whole warm-up + decay. A step budget gives the same run on any
machine, loaded or not: the form for comparing recipes (docs/training.md).

Determinism. The data order of epoch e is a permutation drawn from (seed, e); the
augmentation of the item at (epoch, position) and the model's own sampling (RPN / RoI
samplers use torch's RNG) at step s are seeded from (seed, step). A run resumed from a
checkpoint therefore takes the same steps as one that never stopped.

Devices. `device` is auto | cpu | cuda | cuda:N; every tensor of a step follows the inputs'
device (tests/test_device.py proves it on the meta device). `precision`: CPU autocast to
bf16, or on CUDA bf16 autocast (compute capability >= 8.0) or fp16 autocast with a GradScaler;
RoIAlign stays float32 under either (its autocast rule, model/ops/graph_ops.py).

Several processes (torchrun, see train/distributed.py): the model is wrapped in
DistributedDataParallel (gradients averaged over ranks), each rank reads its own shard of
the seeded order (DistributedSampler's rule), rank 0's clock decides a --minutes budget, and
rank 0 alone logs and writes checkpoints, which record every rank's place in its shard.

Checkpoint (every `checkpoint_every` steps and at the end), in OUT:
  model.safetensors        weights + maskrt metadata (`save_model`), loadable on its own;
  train_state.safetensors  optimiser state, `<parameter name>::<field>` (momentum_buffer, or
                           AdamW's exp_avg / exp_avg_sq / step);
  train_state.json         step, epoch, position, lr, elapsed seconds, seed, world_size, every
                           rank's (epoch, position), the GradScaler state (fp16), the config.
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
# The batch size at which the preset rates above were chosen. With --lr omitted, the rate is
# scaled to the effective batch (processes x --batch-size): linearly for SGD (Goyal et al.,
# "Accurate, Large Minibatch SGD"; detectron2's rule), by the square root for AdamW.
PRESET_LR_BATCH = 2

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
    steps: int | None = None
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
    # Photo-like augmentations (train/transforms.py `repaint`, `camera_noise`). Off by default:
    # at 1,200 edge steps they lowered segm AP on every held-out set, and at 3,950 they left the
    # generator's val unchanged and lowered shapes on photographs by 5 (docs/training.md,
    # "Shapes on real photographs").
    repaint_prob: float = 0.0
    camera_noise_prob: float = 0.0
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # "bf16": forward under CPU autocast to bfloat16 (weights, gradients, optimiser and losses
    # stay float32); "fp32"; "auto": bf16 where the CPU has native bf16 dot products
    # (AVX512-BF16 / AMX), else fp32. Resolved once, in __post_init__.
    precision: str = "auto"
    # auto | cpu | cuda | cuda:N (auto: CUDA where present). Not part of a run's identity: a
    # run may resume on another device. Resolved in __post_init__ ("auto" -> "cpu" / "cuda").
    device: str = "auto"
    # DataLoader worker processes that decode and augment (None: default_workers()).
    workers: int | None = None
    # Seconds a collective may wait for a peer before the job fails (several processes only).
    dist_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        defaults = PRESET_DEFAULTS.get(self.preset)
        if defaults is None:
            raise MaskrtError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESET_DEFAULTS)}")
        if self.batch_size is None:
            self.batch_size = int(defaults["batch_size"])
        if self.optimizer is None:
            self.optimizer = str(defaults["optimizer"])
        if self.lr is None:
            self.lr = default_lr(self.preset, self.optimizer, self.batch_size * world_size_from_env())
        if self.optimizer not in ("sgd", "adamw"):
            raise MaskrtError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.weight_decay is None:
            self.weight_decay = 1e-4 if self.optimizer == "sgd" else 0.05
        if not (0 <= self.repaint_prob <= 1 and 0 <= self.camera_noise_prob <= 1):
            raise MaskrtError("--repaint and --camera-noise are probabilities: give values in 0..1")
        budgets = [b for b in (self.epochs, self.minutes, self.steps) if b is not None]
        if not budgets and not self.resume:
            raise MaskrtError("give a training budget: --steps N, --epochs N or --minutes M")  # --resume reuses the stored one
        if len(budgets) > 1:
            raise MaskrtError("give one training budget: --steps, --epochs or --minutes")
        if any(b <= 0 for b in budgets):
            raise MaskrtError("the training budget (--steps / --epochs / --minutes) must be positive")
        if self.batch_size < 1 or self.lr <= 0 or self.checkpoint_every < 1:
            raise MaskrtError("--batch-size and --checkpoint-every must be >= 1 and --lr > 0")
        if self.roi_op not in ("align", "pool"):
            raise MaskrtError(f"--roi-op must be align or pool, got {self.roi_op!r}")
        if self.budget_clock not in ("wall", "process_cpu"):
            raise MaskrtError(f"budget_clock must be wall or process_cpu, got {self.budget_clock!r}")
        if self.schedule not in ("cosine", "step"):
            raise MaskrtError(f"schedule must be cosine or step, got {self.schedule!r}")
        if self.workers is not None and self.workers < 0:
            raise MaskrtError(f"--workers must be >= 0, got {self.workers}")
        from maskrt.model.io import resolve_device

        device = resolve_device(self.device)
        self.device = str(device)
        self.precision = resolve_precision(self.precision, device)
        self.scale_range = tuple(self.scale_range)  # JSON round trip gives a list

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        return cls(data=args.data, out=args.out, preset=args.config, epochs=args.epochs, minutes=args.minutes,
                   steps=getattr(args, "steps", None), repaint_prob=getattr(args, "repaint", 0.0),
                   camera_noise_prob=getattr(args, "camera_noise", 0.0), weights=args.weights, resume=args.resume, roi_op=args.roi_op, seed=args.seed,
                   batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                   checkpoint_every=args.checkpoint_every, precision=args.precision,
                   device=args.device, workers=args.workers, progress=not args.no_progress)


def world_size_from_env() -> int:
    """Processes in the job (torchrun's WORLD_SIZE; 1 without torchrun)."""
    from maskrt.train.distributed import ranks_from_env

    return ranks_from_env().world_size


def default_lr(preset: str, optimizer: str, effective_batch: int) -> float:
    """The preset's rate scaled from PRESET_LR_BATCH images to `effective_batch`: linear for
    SGD, square root for AdamW (the preset's own optimiser keeps its tuned rate at batch 2)."""
    ratio = effective_batch / PRESET_LR_BATCH
    return float(PRESET_DEFAULTS[preset]["lr"]) * (ratio if optimizer == "sgd" else math.sqrt(ratio))


def resolve_precision(precision: str, device: torch.device, cuda_capability: tuple[int, int] | None = None,
                      cpu_bf16: bool | None = None) -> str:
    """auto | bf16 | fp16 | fp32 -> what a run on `device` uses.

    CUDA: auto is bf16 autocast where the GPU computes in bf16 (compute capability >= 8.0),
    else fp16 autocast with a GradScaler. CPU: auto is bf16 where the CPU has native bf16 dot
    products, else fp32; fp16 is CUDA-only. `cuda_capability` / `cpu_bf16` default to this
    machine's (tests pass them)."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise MaskrtError(f"--precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    if device.type == "cuda":
        if precision == "auto":
            major, _ = cuda_capability if cuda_capability is not None else torch.cuda.get_device_capability(device)
            return "bf16" if major >= 8 else "fp16"
        return precision
    if precision == "fp16":
        raise MaskrtError("--precision fp16 needs a CUDA device (on the CPU: bf16 or fp32)")
    if precision == "auto":
        return "bf16" if (cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16) else "fp32"
    return precision


def default_workers(local_world_size: int = 1, cpu_count: int | None = None) -> int:
    """DataLoader workers per process: a quarter of this process's share of the CPU cores,
    at most 8, and none below 8 cores per process (there a worker competes with the
    model's own threads for the cores; on the 2-core CPU machine it did not help: see
    docs/training.md)."""
    cores = (cpu_count if cpu_count is not None else (os.cpu_count() or 1)) // max(1, local_world_size)
    return 0 if cores < 8 else min(8, cores // 4)


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


def shard_positions(count: int, rank: int, world_size: int) -> list[int]:
    """Positions of the epoch order that `rank` reads: torch's DistributedSampler rule (the
    order padded by wrapping to a multiple of world_size, then every world_size-th entry from
    `rank`). One process reads every position, in order."""
    from torch.utils.data import DistributedSampler

    return list(DistributedSampler(range(count), num_replicas=world_size, rank=rank, shuffle=False))


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


def to_device(image: torch.Tensor, target: dict[str, torch.Tensor], device: torch.device
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training input onto `device`: on CUDA from pinned memory, without blocking."""
    if device.type != "cuda":
        return image.to(device), {k: v.to(device) for k, v in target.items()}
    return (image.pin_memory().to(device, non_blocking=True),
            {k: v.pin_memory().to(device, non_blocking=True) for k, v in target.items()})


@dataclass
class Cursor:
    """Where training stands: optimiser steps done, and the next item of this rank's shard
    of the data order."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    elapsed_s: float = 0.0


class TrainItems(torch.utils.data.Dataset):
    """(key, training item) for key (epoch, position, index, rng position): dataset[index],
    shrunk to the model's input scale, augmented with sample_rng(seed, epoch, rng position);
    None where it does not decode or keeps no target. A pure function of its key, so DataLoader
    workers compute it in any process (the key comes back too: the reader's cursor follows it).

    `input_size` (the model's (min_size, max_size)): an image the model would shrink is
    shrunk to that scale on loading, before augmentation. The model's own resize then
    changes nothing, and a 640 px image's masks are augmented at 256 px (edge preset, 640 px
    PNGs: 19-21 -> 9-10 ms per image loaded and augmented; decoding is most of what is left).
    """

    def __init__(self, dataset: CocoDataset, config: TrainConfig, input_size: tuple[float, float] | None) -> None:
        self.dataset, self.input_size = dataset, input_size
        self.seed, self.augment, self.scale_range = config.seed, config.augment, config.scale_range
        self.repaint_prob, self.camera_noise_prob = float(config.repaint_prob), float(config.camera_noise_prob)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[tuple[int, int, int, int], Sample | None]:
        epoch, _, index, rng_position = key
        sample = self.dataset[index]
        if sample is not None and self.input_size is not None:
            height, width = sample.image.shape[:2]
            new_height, new_width = resized_size(height, width, *self.input_size)
            if new_height < height or new_width < width:  # only a scale below 1 makes either side smaller
                sample = resize(sample, new_height, new_width)
        if sample is not None and sample.labels.size and self.augment:
            sample = train_augment(sample, sample_rng(self.seed, epoch, rng_position), scale_range=self.scale_range,
                                   p_repaint=self.repaint_prob, p_camera=self.camera_noise_prob)
        if sample is None or not sample.labels.size:
            return key, None
        return key, sample


class ItemKeys(torch.utils.data.Sampler):
    """The keys of one rank's items from (epoch, position) on, epoch after epoch, without end.

    Epoch e's order is epoch_order(seed, e, N); the rank reads its shard_positions of it. The
    augmentation of an item is keyed by its place in the whole padded order (position x
    world_size + rank), so no two ranks augment alike, and one process keys it as before."""

    def __init__(self, seed: int, count: int, epoch: int, position: int, rank: int = 0, world_size: int = 1) -> None:
        self.seed, self.count, self.epoch, self.position = seed, count, epoch, position
        self.rank, self.world_size = rank, world_size
        self.positions = shard_positions(count, rank, world_size)

    def __iter__(self):
        epoch, position = self.epoch, self.position
        while True:
            order = epoch_order(self.seed, epoch, self.count)
            for index in range(position, len(self.positions)):
                yield epoch, index, int(order[self.positions[index]]), index * self.world_size + self.rank
            epoch, position = epoch + 1, 0


def _keep(item: Any) -> Any:
    return item


class BatchReader:
    """Yields training batches in the seeded order from `cursor` on, skipping images that
    do not decode (counted by the dataset) or that have no target after augmentation.

    With `workers` > 0, DataLoader worker processes decode and augment ahead of the
    trainer; items come back in order, so the cursor (and a resumed run) is exact either way.
    `rank` / `world_size`: read that rank's shard (several processes under torchrun).
    """

    def __init__(self, dataset: CocoDataset, config: TrainConfig, cursor: Cursor,
                 input_size: tuple[float, float] | None = None, workers: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.dataset, self.config, self.cursor = dataset, config, cursor
        self.items = TrainItems(dataset, config, input_size)
        self.workers, self.rank, self.world_size = workers, rank, world_size
        self.shard_length = len(shard_positions(len(dataset), rank, world_size))
        self._iterator = None

    def _next_item(self) -> tuple[tuple[int, int, int, int], Sample | None]:
        if self._iterator is None:
            keys = ItemKeys(self.config.seed, len(self.dataset), self.cursor.epoch, self.cursor.position,
                            self.rank, self.world_size)
            loader = torch.utils.data.DataLoader(
                self.items, sampler=keys, batch_size=None, collate_fn=_keep, num_workers=self.workers,
                prefetch_factor=2 * int(self.config.batch_size) if self.workers else None)
            self._iterator = iter(loader)
        return next(self._iterator)

    def next_batch(self) -> list[Sample]:
        batch: list[Sample] = []
        misses = 0
        while len(batch) < int(self.config.batch_size):
            (epoch, position, _, _), sample = self._next_item()
            # Past this item; after an epoch's last item, at the next epoch's start (so
            # `epoch` counts finished epochs).
            self.cursor.epoch, self.cursor.position = epoch, position + 1
            if self.cursor.position >= self.shard_length:
                self.cursor.epoch, self.cursor.position = epoch + 1, 0
            if sample is None:
                misses += 1
                if misses > 2 * self.shard_length:
                    raise MaskrtError(f"no usable training image in {self.dataset.image_dir}")
                continue
            batch.append(sample)
        return batch

    def close(self) -> None:
        """Stop the worker processes (a new iterator starts from the cursor if needed)."""
        self._iterator = None


# --- checkpoints --------------------------------------------------------------------------

def _replace_atomically(write: Callable[[Path], None], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cursor: Cursor,
                    lr: float, config: TrainConfig, extra: dict[str, Any] | None = None) -> None:
    """Write weights, optimiser state and the JSON state (plus `extra` entries) atomically
    (JSON last). Tensors are written from the CPU: a checkpoint holds no device."""
    from safetensors.torch import save_file

    from maskrt.model import save_model

    names = {id(p): name for name, p in model.named_parameters()}
    tensors = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():  # momentum_buffer | exp_avg, exp_avg_sq, step
                if torch.is_tensor(value):
                    tensors[f"{names[id(param)]}::{key}"] = value.detach().cpu().contiguous()
    _replace_atomically(lambda p: save_file(tensors, str(p), metadata={"step": str(cursor.step)}),
                        out / STATE_TENSORS)
    _replace_atomically(lambda p: save_model(model, p), out / WEIGHTS)
    state = {"step": cursor.step, "epoch": cursor.epoch, "position": cursor.position, "lr": lr,
             "elapsed_s": cursor.elapsed_s, "seed": config.seed, "torch_seed_rule": "seed * 1_000_003 + step * world_size + rank",
             **(extra or {}),
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
            param = params[name]
            optimizer.state[param][field_name] = (value.to(param.device) if field_name == "step"  # fused AdamW: on device
                                                  else value.to(device=param.device, dtype=param.dtype))


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


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters; no weight decay on norm
    layers and biases (1-D tensors), as detectron2 does for GN/BN."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        # fused: one kernel over all tensors, 3 ms instead of 9 per edge step (2 threads).
        return torch.optim.AdamW(groups, lr=float(config.lr), betas=(config.momentum, 0.999), fused=True)
    return torch.optim.SGD(groups, lr=float(config.lr), momentum=config.momentum)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16 autocast's loss scaler (CUDA); a pass-through for bf16 and fp32."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: list[torch.Tensor],
               targets: list[dict[str, torch.Tensor]], precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None, clip_grad_norm: float = 10.0
               ) -> dict[str, torch.Tensor]:
    """One optimiser step on a batch already on the model's device -> the losses (detached,
    on that device, plus their sum under "loss"). `model` may be a DistributedDataParallel
    wrapper (its backward averages the gradients over ranks). Autocast to bf16 / fp16 per
    `precision` on the inputs' device type; with fp16, `scaler` scales the loss."""
    device_type = images[0].device.type
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        losses = model(images, targets)  # float32: autocast runs the losses in fp32
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise MaskrtError(f"training diverged (loss {float(loss)}): lower --lr")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        if clip_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad_norm)
        optimizer.step()
    return {**{k: v.detach() for k, v in losses.items()}, "loss": loss.detach()}


def train(config: TrainConfig, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train per `config`; return a summary {step, epoch, elapsed_s, weights, last losses, lr,
    rank, world_size, device, precision}.

    Run under torchrun, each process trains one rank of a DistributedDataParallel job (see
    train/distributed.py). `stop_after_steps` ends the run early at that step (with a
    checkpoint), leaving the schedule untouched: how the tests simulate an interrupted run.
    """
    from maskrt.train import distributed

    ranks = distributed.ranks_from_env()
    device = distributed.rank_device(torch.device(config.device), ranks)
    distributed.init_process_group(ranks, device, config.dist_timeout_s)
    try:
        return _train(config, stop_after_steps, ranks, device)
    finally:
        distributed.destroy_process_group()


def _train(config: TrainConfig, stop_after_steps: int | None, ranks: Any, device: torch.device) -> dict[str, Any]:
    from maskrt.train import distributed

    out = Path(config.out)
    dataset = CocoDataset(config.data, "train", drop_empty=True)
    if len(dataset) == 0:
        raise MaskrtError(f"no training image with annotations in {dataset.annotation_file}")

    cursor = Cursor()
    state = None
    scaler_state = None
    if config.resume:
        state = load_checkpoint(out)
        stored = state["config"]
        # The run's identity (preset, classes, optimiser, precision, data order) comes from the
        # checkpoint; the budget may be extended and the device chosen anew on the command line.
        given = {"epochs": config.epochs, "minutes": config.minutes, "steps": config.steps}
        budget = given if any(v is not None for v in given.values()) else {}
        config = TrainConfig(**{**stored, **budget, "data": config.data, "out": config.out, "resume": True,
                                "progress": config.progress, "device": config.device,
                                "workers": config.workers})
        stored_world = int(state.get("world_size", 1))
        if stored_world != ranks.world_size:
            raise MaskrtError(f"--resume: the checkpoint was written by {stored_world} process(es); resume it with "
                              f"the same number (now {ranks.world_size}): each rank continues its own data shard")
        epoch, position = state.get("ranks", [[state["epoch"], state["position"]]])[ranks.rank]
        cursor = Cursor(step=int(state["step"]), epoch=int(epoch), position=int(position),
                        elapsed_s=float(state["elapsed_s"]))
        scaler_state = state.get("grad_scaler")
    if ranks.is_main:
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
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    if state is not None:
        restore_optimizer_state(model, optimizer, out, cursor.step)
    scaler = make_grad_scaler(config.precision, device)
    if scaler_state:
        scaler.load_state_dict(scaler_state)
    stepper: torch.nn.Module = model
    if ranks.distributed:
        # Broadcasts rank 0's parameters at construction; backward averages gradients.
        stepper = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    shard_length = len(shard_positions(len(dataset), ranks.rank, ranks.world_size))
    total_steps = (int(config.steps) if config.steps is not None
                   else math.ceil(config.epochs * shard_length / int(config.batch_size)) if config.epochs is not None
                   else None)
    budget_s = config.minutes * 60 if config.minutes is not None else None

    def fraction_done() -> float:
        if total_steps is not None:
            return cursor.step / max(total_steps, 1)
        return cursor.elapsed_s / budget_s  # type: ignore[operator]

    def finished() -> bool:
        return fraction_done() >= 1.0 or (stop_after_steps is not None and cursor.step >= stop_after_steps)

    workers = default_workers(ranks.local_world_size) if config.workers is None else int(config.workers)
    reader = BatchReader(dataset, config, cursor, (max(model.min_size), model.max_size), workers=workers,
                         rank=ranks.rank, world_size=ranks.world_size)
    effective_batch = ranks.world_size * int(config.batch_size)
    if ranks.is_main:
        print(f"training on {device} ({config.precision}), {ranks.world_size} process(es) x {config.batch_size} "
              f"images = effective batch {effective_batch}; lr {float(config.lr):.4g} "
              f"({_lr_rule_text(config, effective_batch)}); {workers} data worker(s) per process", file=sys.stderr)
    bar = None
    if config.progress and ranks.is_main:
        from tqdm import tqdm

        from maskrt.progress import progress_options  # a live bar on a terminal, a line every 10 s in a log
        bar = tqdm(total=total_steps, initial=cursor.step, unit="step", desc=f"train {config.preset}",
                   **progress_options(sys.stderr))
    running: dict[str, float] = {}
    metrics_file = open(out / METRICS, "a") if ranks.is_main else None
    lr = lr_at(fraction_done(), config)
    last_losses: dict[str, float] = {}

    def checkpoint() -> None:
        # Every rank's place in its shard (a collective: every rank calls it at the same step).
        places = distributed.gather_objects([cursor.epoch, cursor.position], ranks)
        if ranks.is_main:
            extra = {"world_size": ranks.world_size, "ranks": places, "device": str(device),
                     **({"grad_scaler": scaler.state_dict()} if scaler.is_enabled() else {})}
            save_checkpoint(out, model, optimizer, cursor, lr, config, extra)

    # Elapsed time is wall clock over the loop (data, steps, checkpoints), added to what
    # earlier runs of a resumed training already spent. Rank 0's clock is broadcast each
    # step, so every rank sees the same budget fraction (same lr, same last step).
    loop_start, spent_before = time.perf_counter(), cursor.elapsed_s
    cpu_start = time.process_time()  # CPU seconds of this process (all threads), for load-independent comparisons
    try:
        while not finished():
            distributed.exit_here_for_tests(ranks, cursor.step)
            lr = lr_at(fraction_done(), config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = reader.next_batch()
            # The model's own sampling (RPN / RoI balanced samplers) is seeded per step and rank.
            torch.manual_seed(config.seed * 1_000_003 + cursor.step * ranks.world_size + ranks.rank)
            inputs = [to_device(*to_model_inputs(s), device) for s in batch]
            try:
                losses = train_step(stepper, optimizer, [i for i, _ in inputs], [t for _, t in inputs],
                                    config.precision, scaler, config.clip_grad_norm)
            except MaskrtError as err:
                raise MaskrtError(f"step {cursor.step}: {err}") from None
            cursor.step += 1
            if config.budget_clock == "process_cpu":
                elapsed = spent_before + (time.process_time() - cpu_start) / config.cpu_per_wall_second
            else:
                elapsed = spent_before + time.perf_counter() - loop_start
            cursor.elapsed_s = distributed.broadcast_floats([elapsed], device, ranks)[0]
            last_losses = dict(zip(losses, torch.stack(list(losses.values())).tolist()))  # one device sync
            for k, v in last_losses.items():  # running means shown on the bar
                running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running['loss']:.3f}", mask=f"{running.get('loss_mask', 0):.3f}",
                                lr=f"{lr:.4f}", refresh=False)
                if total_steps is None:
                    bar.set_description(f"train {config.preset} {cursor.elapsed_s / 60:.1f}/{config.minutes:g} min",
                                        refresh=False)  # redrawn by update() at its own pace (mininterval)
            if metrics_file is not None and (cursor.step % config.log_every == 0 or cursor.step == 1):
                metrics_file.write(json.dumps({"step": cursor.step, "epoch": cursor.epoch,
                                               "elapsed_s": round(cursor.elapsed_s, 3),
                                               "cpu_s": round(time.process_time() - cpu_start, 3), "lr": lr,
                                               **{k: round(v, 5) for k, v in last_losses.items()}}) + "\n")
                metrics_file.flush()
            if cursor.step % config.checkpoint_every == 0 and not finished():
                checkpoint()
        checkpoint()
    finally:
        reader.close()
        if metrics_file is not None:
            metrics_file.close()
        if bar is not None:
            bar.close()
        if ranks.is_main:
            dataset.warn_skipped()
    return {"step": cursor.step, "epoch": cursor.epoch, "elapsed_s": cursor.elapsed_s,
            "weights": str(out / WEIGHTS), "losses": last_losses, "lr": lr, "rank": ranks.rank, "world_size": ranks.world_size,
            "device": str(device), "precision": config.precision}


def _lr_rule_text(config: TrainConfig, effective_batch: int) -> str:
    if math.isclose(float(config.lr), default_lr(config.preset, str(config.optimizer), effective_batch)):
        rule = "linear" if config.optimizer == "sgd" else "square-root"
        return (f"the {config.preset} rate {PRESET_DEFAULTS[config.preset]['lr']:g} at batch {PRESET_LR_BATCH}, "
                f"{rule} rule for {config.optimizer}")
    return "as given; the preset's rule: linear in the effective batch for sgd, square root for adamw"
