"""Training: the schedule, a short smoke run whose loss falls, checkpoints, exact resume,
and the CLI verbs around it (train, eval, predict, ablate) on a tiny model."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from maskrt.errors import MaskrtError
from maskrt.train.synthetic import write_dataset
from maskrt.train.coco import CocoDataset
from maskrt.train.trainer import (METRICS, STATE_JSON, STATE_TENSORS, WEIGHTS, BatchReader, Cursor, TrainConfig,
                                  epoch_order, lr_at, train)
from maskrt.train.transforms import masks_to_boxes

from tiny_model import TINY  # tests/tiny_model.py


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: reductions in a fixed order (exact resume) and no OpenMP spinning
    against other jobs on a shared 2-core machine (2 threads were ~10x slower there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinydata")
    write_dataset(root, train=8, val=3, size=96, seed=2)
    return root


def tiny_config(data, out, **kwargs) -> TrainConfig:
    base = dict(data=str(data), out=str(out), preset="edge", batch_size=2, lr=0.01, progress=False,
                model_overrides=dict(TINY), log_every=1)
    base.update(kwargs)
    return TrainConfig(**base)


def test_lr_schedule_warms_up_then_decays_to_the_final_factor():
    config = TrainConfig(data="d", out="o", epochs=1, lr=0.1, warmup_fraction=0.1, warmup_start_factor=0.01,
                         final_lr_factor=0.05)
    assert lr_at(0.0, config) == pytest.approx(0.001)
    assert lr_at(0.05, config) == pytest.approx(0.001 + 0.099 * 0.5)
    assert lr_at(0.1, config) == pytest.approx(0.1)
    # Cosine: half-way through the decay it is the mean of the peak and the floor.
    assert lr_at(0.55, config) == pytest.approx((0.1 + 0.005) / 2)
    assert lr_at(1.0, config) == pytest.approx(0.005)
    values = [lr_at(f, config) for f in np.linspace(0.1, 1.0, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    step = TrainConfig(data="d", out="o", minutes=1, lr=0.1, schedule="step", warmup_fraction=0.0)
    assert [lr_at(f, step) for f in (0.5, 0.75, 0.95)] == pytest.approx([0.1, 0.01, 0.001])


def test_config_rejects_bad_budgets():
    with pytest.raises(MaskrtError, match="budget"):
        TrainConfig(data="d", out="o")
    with pytest.raises(MaskrtError, match="positive"):
        TrainConfig(data="d", out="o", minutes=0)
    with pytest.raises(MaskrtError, match="positive"):
        TrainConfig(data="d", out="o", steps=0)
    with pytest.raises(MaskrtError, match="one training budget"):
        TrainConfig(data="d", out="o", steps=10, epochs=1)
    with pytest.raises(MaskrtError, match="probabilities"):
        TrainConfig(data="d", out="o", steps=10, repaint_prob=1.5)


def test_photo_like_augmentations_are_off_unless_asked_for():
    for preset in ("edge", "r50_fpn"):
        config = TrainConfig(data="d", out="o", steps=1, preset=preset)
        assert (config.repaint_prob, config.camera_noise_prob) == (0.0, 0.0)
    assert TrainConfig(data="d", out="o", steps=1, repaint_prob=0.5).repaint_prob == 0.5


def test_step_budget_runs_that_many_steps_with_the_schedule_fitted_to_them(tiny_data, tmp_path):
    # 8 images, batch 2: --steps 6 is 1.5 epochs, and the cosine reaches its floor at step 6.
    config = tiny_config(tiny_data, tmp_path / "steps", steps=6, warmup_fraction=0.0, checkpoint_every=1000)
    summary = train(config)
    assert summary["step"] == 6 and summary["epoch"] == 1
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "steps" / METRICS).read_text().splitlines()]
    assert lrs == pytest.approx([lr_at(step / 6, config) for step in range(6)])
    # Resuming with a larger --steps continues the same run to the new end.
    more = train(tiny_config(tiny_data, tmp_path / "steps", steps=8, resume=True))
    assert more["step"] == 8


def test_precision_auto_follows_the_cpu_and_bad_values_are_one_line_errors(monkeypatch):
    import maskrt.train.trainer as trainer

    for native, resolved in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: native)
        assert TrainConfig(data="d", out="o", minutes=1).precision == resolved
        assert TrainConfig(data="d", out="o", minutes=1, precision="fp32").precision == "fp32"
    with pytest.raises(MaskrtError, match="--precision fp16 needs a CUDA device"):
        TrainConfig(data="d", out="o", minutes=1, precision="fp16", device="cpu")
    with pytest.raises(MaskrtError, match="--precision must be auto, bf16, fp16 or fp32"):
        TrainConfig(data="d", out="o", minutes=1, precision="fp8")


def test_precision_auto_on_cuda_is_bf16_from_compute_capability_8_else_fp16():
    from maskrt.train.trainer import make_grad_scaler, resolve_precision

    cuda = torch.device("cuda", 0)
    assert resolve_precision("auto", cuda, cuda_capability=(9, 0)) == "bf16"  # H100
    assert resolve_precision("auto", cuda, cuda_capability=(8, 7)) == "bf16"  # Orin
    assert resolve_precision("auto", cuda, cuda_capability=(7, 5)) == "fp16"  # T4
    assert resolve_precision("fp32", cuda, cuda_capability=(7, 5)) == "fp32"
    assert resolve_precision("fp16", cuda, cuda_capability=(9, 0)) == "fp16"
    assert resolve_precision("auto", torch.device("cpu"), cpu_bf16=False) == "fp32"
    # Only fp16 scales the loss; bf16 and fp32 step as they are.
    assert not make_grad_scaler("bf16", torch.device("cpu")).is_enabled()


def test_bf16_autocast_losses_and_gradients_follow_float32(tiny_data, tmp_path):
    # The same model, batch and sampler seed in fp32 and under the trainer's bf16 autocast:
    # bf16 rounds activations to 8 mantissa bits, so losses agree to a few per cent and the
    # gradient points the same way; parameters and their gradients stay float32.
    from maskrt.train.trainer import make_model, to_model_inputs

    config = tiny_config(tiny_data, tmp_path, epochs=1, augment=False)
    dataset = CocoDataset(tiny_data, "train", drop_empty=True)
    torch.manual_seed(0)
    model = make_model(config, dataset).train()
    images, targets = zip(*(to_model_inputs(s) for s in BatchReader(dataset, config, Cursor()).next_batch()))

    def losses_and_gradient(bf16: bool) -> tuple[dict[str, float], torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = model(list(images), list(targets))
        assert all(v.dtype == torch.float32 for v in losses.values())  # the trainer sums them as they come
        sum(losses.values()).backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        return {k: float(v.detach()) for k, v in losses.items()}, torch.cat([p.grad.flatten() for p in model.parameters()])

    fp32_losses, fp32_grad = losses_and_gradient(False)
    bf16_losses, bf16_grad = losses_and_gradient(True)
    for name, value in fp32_losses.items():
        assert bf16_losses[name] == pytest.approx(value, rel=0.05, abs=1e-3), name
    cosine = float(torch.nn.functional.cosine_similarity(fp32_grad, bf16_grad, dim=0))
    assert cosine > 0.95, cosine
    assert not torch.equal(fp32_grad, bf16_grad)  # autocast did change the arithmetic


def test_epoch_order_is_a_seeded_permutation():
    a, b, c = epoch_order(1, 0, 10), epoch_order(1, 0, 10), epoch_order(1, 1, 10)
    assert sorted(a.tolist()) == list(range(10))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_reader_shrinks_images_the_model_would_shrink_and_only_those(tiny_data, tmp_path):
    dataset = CocoDataset(tiny_data, "train", drop_empty=True)
    config = tiny_config(tiny_data, tmp_path, epochs=1, augment=False, batch_size=len(dataset))
    original = BatchReader(dataset, config, Cursor()).next_batch()
    shrunk = BatchReader(dataset, config, Cursor(), input_size=(48, 200)).next_batch()
    kept = BatchReader(dataset, config, Cursor(), input_size=(200, 400)).next_batch()
    for before, small, same in zip(original, shrunk, kept):
        assert before.image.shape == (96, 96, 3) and small.image.shape == (48, 48, 3)
        assert small.masks.shape[1:] == (48, 48)
        # Boxes scale by one half; the halved masks' own tight boxes agree to a pixel.
        np.testing.assert_allclose(small.boxes, before.boxes / 2, atol=1e-5)
        np.testing.assert_allclose(masks_to_boxes(small.masks), small.boxes, atol=1.0)
        # Area is kept to within the boundary pixels of a nearest-neighbour halving.
        assert abs(int(small.masks.sum()) * 4 - int(before.masks.sum())) <= 0.1 * before.masks.sum()
        assert np.array_equal(same.image, before.image) and np.array_equal(same.masks, before.masks)


def test_dataloader_workers_give_the_same_batches_and_cursor_as_the_main_process(tiny_data, tmp_path):
    # Workers decode and augment ahead; items come back in the seeded order, so batches and
    # the cursor (what a checkpoint stores) match the in-process reader across an epoch end.
    dataset = CocoDataset(tiny_data, "train", drop_empty=True)
    config = tiny_config(tiny_data, tmp_path, epochs=1, batch_size=3)
    here, there = Cursor(), Cursor()
    inline = BatchReader(dataset, config, here, workers=0)
    pooled = BatchReader(dataset, config, there, workers=2)
    try:
        for _ in range(4):  # 12 items of 8: into the second epoch
            for a, b in zip(inline.next_batch(), pooled.next_batch()):
                assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
                np.testing.assert_array_equal(a.boxes, b.boxes)
            assert (here.epoch, here.position) == (there.epoch, there.position)
        assert (here.epoch, here.position) == (1, 4)
    finally:
        pooled.close()


def test_ranks_read_disjoint_shards_that_cover_the_epoch(tiny_data, tmp_path):
    from maskrt.train.trainer import ItemKeys, shard_positions

    assert shard_positions(5, 0, 2) == [0, 2, 4] and shard_positions(5, 1, 2) == [1, 3, 0]  # padded by wrapping
    keys = [list(zip(range(4), ItemKeys(7, 8, 0, 0, rank, 2))) for rank in (0, 1)]
    indices = [[key[2] for _, key in rank_keys] for rank_keys in keys]
    assert sorted(indices[0] + indices[1]) == sorted(epoch_order(7, 0, 8).tolist())
    rng_positions = [key[3] for rank_keys in keys for _, key in rank_keys]
    assert sorted(rng_positions) == list(range(8))  # no two ranks augment alike


@pytest.mark.slow
def test_smoke_run_loss_falls_and_checkpoints_load(tiny_data, tmp_path):
    from maskrt.model import load_model

    config = tiny_config(tiny_data, tmp_path / "run", epochs=10, lr=0.02, checkpoint_every=15,
                         augment=False, warmup_fraction=0.1)
    summary = train(config)
    assert summary["step"] == 40  # 10 epochs x 8 images / batch 2
    rows = [json.loads(line) for line in (tmp_path / "run" / METRICS).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = np.mean([r["loss"] for r in rows[:5]])
    last = np.mean([r["loss"] for r in rows[-5:]])
    assert last < 0.7 * first, (first, last)
    state = json.loads((tmp_path / "run" / STATE_JSON).read_text())
    assert state["step"] == 40 and state["epoch"] == 10 and state["position"] == 0
    assert state["lr"] == pytest.approx(lr_at(39 / 40, config))
    assert (tmp_path / "run" / STATE_TENSORS).is_file()
    assert not list((tmp_path / "run").glob("*.tmp"))
    model = load_model(tmp_path / "run" / WEIGHTS)
    assert model.class_names[1:] == ["disc", "triangle", "rectangle", "l_shape", "ring", "star"]
    assert list(model.category_ids) == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_data, tmp_path, optimizer):
    from maskrt.model import load_model

    # 10 steps, epoch boundary crossed after the stop; AdamW's per-parameter step counts and
    # both moments must come back for the resumed steps to match.
    steps = dict(epochs=2.5, checkpoint_every=3, optimizer=optimizer, lr=0.01 if optimizer == "sgd" else 1e-3)
    whole = train(tiny_config(tiny_data, tmp_path / "whole", **steps))
    first = train(tiny_config(tiny_data, tmp_path / "parts", **steps), stop_after_steps=5)
    assert first["step"] == 5
    resumed = train(tiny_config(tiny_data, tmp_path / "parts", resume=True, **steps))
    assert whole["step"] == resumed["step"] == 10
    a = load_model(tmp_path / "whole" / WEIGHTS).state_dict()
    b = load_model(tmp_path / "parts" / WEIGHTS).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # ... and the training moved the weights at all (the comparison is not vacuous).
    fresh = train(tiny_config(tiny_data, tmp_path / "short", epochs=0.25, checkpoint_every=3))
    assert fresh["step"] == 1
    c = load_model(tmp_path / "short" / WEIGHTS).state_dict()
    assert any(not torch.allclose(a[k], c[k]) for k in a if a[k].is_floating_point())
    whole_state = json.loads((tmp_path / "whole" / STATE_JSON).read_text())
    parts_state = json.loads((tmp_path / "parts" / STATE_JSON).read_text())
    for key in ("step", "epoch", "position", "lr"):
        assert whole_state[key] == parts_state[key]


def test_time_budget_stops_on_time_with_the_schedule_fitted_to_it(tiny_data, tmp_path):
    config = tiny_config(tiny_data, tmp_path / "timed", minutes=0.04, warmup_fraction=0.0, checkpoint_every=1000)
    summary = train(config)
    assert summary["elapsed_s"] >= 0.04 * 60 and summary["step"] >= 1
    rows = [json.loads(line) for line in (tmp_path / "timed" / METRICS).read_text().splitlines()]
    lrs = [r["lr"] for r in rows]
    # The lr of each step is the cosine at the fraction of the time used before it: decreasing.
    assert lrs[0] == pytest.approx(0.01) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert json.loads((tmp_path / "timed" / STATE_JSON).read_text())["elapsed_s"] == pytest.approx(summary["elapsed_s"])


def test_resume_without_checkpoint_is_a_one_line_error(tiny_data, tmp_path):
    with pytest.raises(MaskrtError, match="no checkpoint") as info:
        train(tiny_config(tiny_data, tmp_path / "empty", epochs=1, resume=True))
    assert "\n" not in str(info.value)


def test_resume_from_an_optimiser_state_of_another_layout_is_a_one_line_error(tiny_data, tmp_path):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "old"
    train(tiny_config(tiny_data, run, epochs=0.25, checkpoint_every=1))
    state = load_file(str(run / STATE_TENSORS))
    # Keys that are not `<parameter>::<field>` (here bare indices): nothing to restore them to.
    save_file({str(index): value for index, value in enumerate(state.values())}, str(run / STATE_TENSORS),
              metadata={"step": "1"})
    with pytest.raises(MaskrtError, match="names no parameter") as info:
        train(tiny_config(tiny_data, run, epochs=0.5, resume=True))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_cli_train_eval_predict(tiny_data, tmp_path, capsys, monkeypatch):
    """The verbs end to end on the real edge preset (256 px), two steps: files and formats."""
    from maskrt.cli import main

    out = tmp_path / "cli"
    assert main(["train", "--data", str(tiny_data), "--epochs", "0.5", "--batch-size", "2", "--out", str(out),
                 "--no-progress", "--checkpoint-every", "1"]) == 0
    assert json.loads((out / STATE_JSON).read_text())["step"] == 2
    assert main(["eval", "--weights", str(out / WEIGHTS), "--data", str(tiny_data), "--out",
                 str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert set(metrics) >= {"bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75"}
    assert all(-1.0 <= v <= 1.0 for v in metrics.values())
    images = sorted((tiny_data / "val").iterdir())
    assert main(["predict", "--weights", str(out / WEIGHTS), str(images[0]), str(images[1]), "--out",
                 str(tmp_path / "pred"), "--conf", "0.0"]) == 0
    assert (tmp_path / "pred" / f"{images[0].stem}.png").is_file()
    results = json.loads((tmp_path / "pred" / "results.json").read_text())
    assert all(set(r) >= {"image_id", "category_id", "bbox", "score", "segmentation"} for r in results)
    capsys.readouterr()
    assert main(["predict", "--weights", str(out / WEIGHTS), str(tmp_path / "nope.jpg"), "--out",
                 str(tmp_path / "p2")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nope"), "--epochs", "1", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    capsys.readouterr()
    assert main(["train", "--data", str(tiny_data), "--steps", "1", "--out", str(tmp_path / "one"), "--no-progress",
                 "--repaint", "1", "--camera-noise", "1"]) == 0
    state = json.loads((tmp_path / "one" / STATE_JSON).read_text())
    assert state["step"] == 1 and state["config"]["steps"] == 1
    assert (state["config"]["repaint_prob"], state["config"]["camera_noise_prob"]) == (1.0, 1.0)
    assert main(["train", "--data", str(tiny_data), "--steps", "0", "--out", str(tmp_path / "zero"),
                 "--no-progress"]) == 2
    assert "positive" in capsys.readouterr().err


@pytest.mark.slow
def test_ablation_writes_a_table_for_both_ops(tiny_data, tmp_path):
    from maskrt.train.ablation import run_ablation

    report = run_ablation(str(tiny_data), minutes=0, out=tmp_path / "abl", epochs=0.5, progress=False,
                          model_overrides=TINY)
    text = report.read_text()
    assert "| align |" in text and "| pool |" in text and "mask AP75" in text
    rows = json.loads((tmp_path / "abl" / "report.json").read_text())["rows"]
    assert rows["align"]["steps"] == rows["pool"]["steps"] == 2  # 0.5 epoch of 8 images, batch 2
    assert not math.isnan(rows["pool"]["metrics"]["segm/AP"])
