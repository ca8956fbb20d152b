"""Devices without a GPU: every tensor a training step and an eval create follows the inputs'
device (shown on the meta device), the RoIAlign autocast rule covers CUDA, checkpoints are
device-free, and `--device cuda` on a machine without one is a one-line error (exit 2)."""
from __future__ import annotations

import pytest
import torch

from maskrt.errors import MaskrtError
from maskrt.train.coco import CocoDataset
from maskrt.train.synthetic import write_dataset
from maskrt.train.trainer import (BatchReader, Cursor, TrainConfig, make_grad_scaler, make_model, make_optimizer,
                                  to_model_inputs, train_step)

from tiny_model import TINY  # tests/tiny_model.py


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("devicedata")
    write_dataset(root, train=4, val=2, size=96, seed=3)
    return root


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_training_step_and_an_eval_create_every_tensor_on_the_inputs_device(tiny_data, tmp_path, one_thread):
    # With the default device set to "meta", any factory call (torch.tensor, zeros, arange,
    # randperm, ...) that forgot device= makes a meta tensor: mixing it with the CPU inputs
    # fails, and .item() on it raises. A step and an eval that give CPU results prove that
    # model, losses, samplers, matchers, anchors, transforms and the trainer's step follow
    # their inputs' device (the same calls then follow a CUDA input).
    config = TrainConfig(data=str(tiny_data), out=str(tmp_path), epochs=1, batch_size=2, lr=0.01, progress=False,
                         model_overrides=dict(TINY), augment=False, device="cpu", precision="fp32")
    dataset = CocoDataset(tiny_data, "train", drop_empty=True)
    torch.manual_seed(0)
    model = make_model(config, dataset).to(torch.device("cpu")).train()
    optimizer = make_optimizer(model, config)
    images, targets = zip(*(to_model_inputs(s) for s in BatchReader(dataset, config, Cursor()).next_batch()))
    before = [p.detach().clone() for p in model.parameters()]
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        assert torch.empty(1).device.type == "meta"  # the trap is armed
        losses = train_step(model, optimizer, list(images), list(targets), "fp32",
                            make_grad_scaler("fp32", torch.device("cpu")))
        model.eval()
        detections = model(list(images))
    finally:
        torch.set_default_device(previous)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg",
                           "loss"}
    for name, value in losses.items():
        assert value.device.type == "cpu" and bool(torch.isfinite(value)), name
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the step did update
    assert len(detections) == 2
    for result in detections:
        assert {tensor.device.type for tensor in result.values()} == {"cpu"}
        assert result["masks"].shape[-2:] == (96, 96)


def test_roi_align_keeps_float32_under_cuda_autocast_too():
    # The op's autocast rule (cast inputs to float32, run with autocast off) is registered for
    # CUDA beside the CPU: the dispatcher has an AutocastCUDA kernel for the pair.
    import maskrt.model.ops.graph_ops  # noqa: F401  (registers the ops)

    for name in ("maskrt::multilevel_roi_align", "maskrt::multilevel_roi_align_backward"):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)


def test_resolve_device_auto_and_the_missing_gpu_error(monkeypatch):
    from maskrt.model import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(MaskrtError, match="no CUDA GPU") as info:
        resolve_device("cuda:1")
    assert "\n" not in str(info.value)
    with pytest.raises(MaskrtError, match="--device must be"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(MaskrtError, match="1 CUDA device"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("verb", ["train", "eval", "predict", "ablate", "demo"])
def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(verb, tiny_data, tmp_path, capsys, monkeypatch):
    from maskrt.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has one
    weights = str(tmp_path / "w.safetensors")
    argv = {"train": ["train", "--data", str(tiny_data), "--epochs", "1", "--out", str(tmp_path / "t")],
            "eval": ["eval", "--weights", weights, "--data", str(tiny_data)],
            "predict": ["predict", "--weights", weights, str(tiny_data), "--out", str(tmp_path / "p")],
            "ablate": ["ablate", "--data", str(tiny_data), "--out", str(tmp_path / "a")],
            "demo": ["demo", "--out", str(tmp_path / "d"), "--minutes", "0.01"]}[verb]
    capsys.readouterr()
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "no CUDA GPU" in err[-1] and err[-1].startswith("maskrt: error:"), err
    assert not (tmp_path / "t").exists() and not (tmp_path / "d").exists()  # nothing written before the check


def test_bench_against_eager_on_a_missing_gpu_is_a_one_line_error(monkeypatch):
    import numpy as np

    from maskrt.runtime.commands import time_eager

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MaskrtError, match="no CUDA GPU"):
        time_eager("unused.safetensors", np.zeros((64, 64, 3), np.uint8), iters=1, warmup=0, device="cuda")


def test_checkpoints_are_device_free_and_load_onto_a_chosen_device(tmp_path):
    from safetensors import safe_open

    from maskrt.model import build_model, load_model, save_model

    torch.manual_seed(0)
    model = build_model("edge", 3, **{k: v for k, v in TINY.items() if not k.startswith("rpn_")})
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    with safe_open(str(path), framework="pt") as handle:
        assert all(handle.get_tensor(k).device.type == "cpu" for k in handle.keys())
    loaded = load_model(path, device="cpu")
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
