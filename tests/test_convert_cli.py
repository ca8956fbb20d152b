"""`maskrt convert` and `maskrt export --from`: the same models as the Python API
(`from_torchvision`, `from_detectron2`), a report of what each checkpoint entry became, and
one-line errors for bad files. Checkpoints are synthesised as in tests/test_convert.py."""
from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrt.cli import main
from maskrt.model import load_model
from maskrt.model.convert import from_detectron2, from_torchvision
from maskrt.model.presets import build_model
from test_convert import D2_CELL_ANCHORS_32, detectron2_arrays

torch.set_num_threads(1)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


@pytest.fixture(scope="module")
def torchvision_pth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `torch.save(model.state_dict(), path)` writes for a torchvision maskrcnn_resnet50_fpn
    (same names as our r50_fpn), with BatchNorm counters as a trainable BatchNorm keeps them."""
    model = build_model("r50_fpn", 91)
    generator = torch.Generator().manual_seed(3)
    state = OrderedDict()
    for key, tensor in model.state_dict().items():
        state[key] = torch.randn(tensor.shape, generator=generator) if tensor.is_floating_point() else tensor
        if key.endswith("running_var"):
            state[key] = state[key].abs() + 0.5
    for name in ("backbone.body.bn1", "backbone.body.layer1.0.bn1"):
        state[f"{name}.num_batches_tracked"] = torch.tensor(7)
    path = tmp_path_factory.mktemp("tv") / "maskrcnn_resnet50_fpn.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def detectron2_pkl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dict: dict[str, np.ndarray] = OrderedDict(detectron2_arrays(seed=1))
    model_dict["pixel_mean"] = np.array([103.53, 116.28, 123.675], np.float32).reshape(3, 1, 1)
    model_dict["pixel_std"] = np.ones((3, 1, 1), np.float32)
    for level in range(5):
        model_dict[f"proposal_generator.anchor_generator.cell_anchors.{level}"] = D2_CELL_ANCHORS_32 * 2**level
    path = tmp_path_factory.mktemp("d2") / "model_final.pkl"
    with path.open("wb") as file:
        pickle.dump({"model": model_dict, "__author__": "Detectron2 Model Zoo"}, file, protocol=4)
    return path


def test_convert_torchvision_equals_the_python_api(torchvision_pth: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tv.safetensors"
    assert main(["convert", "--from", "torchvision", str(torchvision_pth), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    entries = len(torch.load(torchvision_pth, weights_only=True))
    assert f"read {entries} entries from {torchvision_pth} (torchvision): {entries - 2} loaded into the model, " \
           "0 used as settings, 2 skipped" in printed
    assert "2 BatchNorm num_batches_tracked counters" in printed
    converted = load_model(out)
    expected = from_torchvision(torchvision_pth)
    _same_weights(converted, expected)
    assert converted.class_names == expected.class_names and converted.category_ids == expected.category_ids
    assert converted.config == expected.config


def test_convert_detectron2_equals_the_python_api(detectron2_pkl: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d2.safetensors"
    assert main(["convert", "--from", "detectron2", str(detectron2_pkl), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    entries = len(detectron2_arrays()) + 7
    assert f"{entries - 7} loaded into the model, 7 used as settings, 0 skipped" in printed
    assert "pixel_mean, pixel_std, proposal_generator.anchor_generator.cell_anchors.0" in printed
    converted = load_model(out)
    expected = from_detectron2(detectron2_pkl)
    _same_weights(converted, expected)
    assert converted.class_names[1] == "person" and converted.category_ids == expected.category_ids
    assert converted.config == expected.config


def test_convert_class_names_file(detectron2_pkl: Path, tmp_path: Path) -> None:
    names = [f"part_{index}" for index in range(80)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "named.safetensors"
    assert main(["convert", "--from", "detectron2", str(detectron2_pkl), "--out", str(out),
                 "--class-names", str(tmp_path / "names.txt"), "--num-classes", "81"]) == 0
    assert load_model(out).class_names == ["__background__", *names]


def test_convert_bad_input_is_one_line(detectron2_pkl: Path, torchvision_pth: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x80\x04not a pickle at all")
    cases = [
        (["--from", "detectron2", str(garbage)], "not a readable pickle"),
        (["--from", "torchvision", str(detectron2_pkl)], "unsupported checkpoint type '.pkl'"),
        (["--from", "torchvision", str(tmp_path / "absent.pth")], "checkpoint not found"),
        (["--from", "detectron2", str(detectron2_pkl), "--num-classes", "91"], "not --num-classes 91"),
        (["--from", "torchvision", str(torchvision_pth), "--num-classes", "81"], "pass num_classes=91"),
    ]
    for arguments, message in cases:
        out = tmp_path / "never.safetensors"
        assert main(["convert", *arguments, "--out", str(out)]) == 2, arguments
        err = capsys.readouterr().err
        assert err.startswith("maskrt: error: ") and err.count("\n") == 1 and message in err, (arguments, err)
        assert not out.exists()


def test_export_from_a_checkpoint_uses_the_converter(detectron2_pkl: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`export --from detectron2` hands export_onnx the model `from_detectron2` makes."""
    import maskrt.export.onnx_export as onnx_export

    class Exported(Exception):
        pass

    def capture(model, *args, **kwargs):
        _same_weights(model, from_detectron2(detectron2_pkl))
        raise Exported

    monkeypatch.setattr(onnx_export, "export_onnx", capture)
    with pytest.raises(Exported):
        main(["export", "--weights", str(detectron2_pkl), "--from", "detectron2", "--input-size", "320x320",
              "--out", str(tmp_path / "m.onnx")])
