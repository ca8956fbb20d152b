"""Predictor on hand-built contract models: letterbox undo, conf, batching, fixed batch,
torch-freedom, and one clear error line for each bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from maskrt.cli import main
from maskrt.errors import MaskrtError
from maskrt.runtime import Detections, Predictor
from test_runtime_fakes import CLASS_NAMES, build_fake_model, fake_metadata, paste_reference, standard_fake

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_model(tmp_path_factory) -> Path:
    return standard_fake(tmp_path_factory.mktemp("fake") / "fake.onnx")


def test_predictor_maps_boxes_back_and_pastes_masks(fake_model):
    predictor = Predictor(fake_model, conf=0.0)
    assert predictor.input_size == (128, 128)
    assert predictor.class_names == tuple(CLASS_NAMES)
    # 256 x 200 image: scale min(128/256, 128/200) = 0.5, placed as 128 x 100, so input
    # pixels map back by x * 200/100 and y * 256/128: both 2.
    image = np.zeros((256, 200, 3), np.uint8)
    detections = predictor(image)
    assert isinstance(detections, Detections) and len(detections) == 3  # num_dets = 3 of D = 5
    expected_boxes = np.array([[20, 40, 120, 200], [140, 10, 200, 80], [60, 60, 100, 100]], np.float32)
    # The second box's x2 = 120 input px lies in the padding (new_w = 100): clipped at w = 200.
    np.testing.assert_allclose(detections.boxes, expected_boxes, atol=1e-4)
    np.testing.assert_allclose(detections.scores, [0.9, 0.6, 0.3], atol=1e-6)
    assert detections.labels.dtype == np.int64 and detections.labels.tolist() == [1, 3, 2]
    assert detections.names == ["circle", "triangle", "square"]
    assert detections.masks.dtype == bool and detections.masks.shape == (3, 256, 200)
    assert detections.image_size == (256, 200)
    # Masks pasted at the mapped boxes in the original image, as torchvision would.
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(str(fake_model)).graph
    const_masks = {i.name: numpy_helper.to_array(i) for i in graph.initializer}["const_masks"][0]
    for i in range(3):
        expected = paste_reference(const_masks[i].astype(np.float64), expected_boxes[i].astype(np.float64), 256, 200)
        assert np.array_equal(detections.masks[i], expected > 0.5)
    # A mask of ones covers its 40 x 40 px box, plus at most the two extra rows and columns
    # of torchvision's rule (integer box, inclusive x2/y2, the half pixel of the padding).
    assert 40 * 40 <= int(detections.masks[2].sum()) <= 42 * 42


def test_conf_threshold_is_explicit(fake_model):
    image = np.zeros((64, 64, 3), np.uint8)
    assert len(Predictor(fake_model)(image)) == 2  # default 0.5 keeps 0.9 and 0.6
    assert len(Predictor(fake_model, conf=0.0)(image)) == 3  # everything the graph kept
    assert Predictor(fake_model)(image, conf=0.7).scores.tolist() == pytest.approx([0.9])
    with pytest.raises(MaskrtError, match="conf"):
        Predictor(fake_model, conf=1.5)


def test_batch_equals_single_calls_and_keeps_order(tmp_path):
    model = standard_fake(tmp_path / "shift.onnx", box_shift_per_mean=10.0)
    predictor = Predictor(model, conf=0.0)
    images = [np.full((100, 80, 3), 255, np.uint8), np.zeros((50, 120, 3), np.uint8),
              np.full((128, 128, 3), 128, np.uint8)]
    together = predictor.batch(images)
    alone = [predictor(image) for image in images]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)
        assert np.array_equal(a.masks, b.masks)
    # The images differ, so their boxes do: a batch mix-up would show here.
    assert not np.allclose(together[0].boxes[2], together[1].boxes[2])


def test_fixed_batch_model_is_fed_in_padded_chunks(tmp_path):
    dynamic = Predictor(standard_fake(tmp_path / "dyn.onnx", box_shift_per_mean=10.0), conf=0.0)
    fixed = Predictor(standard_fake(tmp_path / "fixed.onnx", box_shift_per_mean=10.0, batch=2), conf=0.0)
    assert fixed.backend.fixed_batch == 2 and dynamic.backend.fixed_batch is None
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (60 + 10 * i, 90, 3), dtype=np.uint8) for i in range(3)]
    for a, b in zip(fixed.batch(images), dynamic.batch(images)):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)


def test_runtime_runs_without_torch(fake_model):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from maskrt.runtime import Predictor, draw_detections\n"
        "import maskrt.runtime.commands, maskrt.runtime.video\n"
        f"p = Predictor({str(fake_model)!r}, conf=0.0)\n"
        "d = p(np.zeros((64, 48, 3), np.uint8))\n"
        "draw_detections(np.zeros((64, 48, 3), np.uint8), d)\n"
        "assert len(d) == 3, len(d)\n"
        "assert not any(m.startswith(('maskrt.model', 'maskrt.train', 'maskrt.export')) for m in sys.modules)\n"
        "assert 'onnx' not in sys.modules  # a Jetson needs only onnxruntime for portable graphs\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- bad input: one line, exit 2 -----------------------------------------------------------

def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maskrt: error: ") and "\n" not in err, err
    return err


def test_missing_empty_and_corrupt_models(tmp_path, capsys):
    assert "not found" in _cli_error(capsys, ["bench", "--model", str(tmp_path / "nope.onnx")])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert "empty" in _cli_error(capsys, ["bench", "--model", str(empty)])
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    assert "cannot load" in _cli_error(capsys, ["infer", "--model", str(corrupt), "--source", "x.jpg"])
    unknown = tmp_path / "model.bin"
    unknown.write_bytes(b"1234")
    assert "cannot tell the model kind" in _cli_error(capsys, ["bench", "--model", str(unknown)])


def test_model_without_maskrt_metadata(tmp_path, capsys):
    bare = tmp_path / "bare.onnx"
    boxes = np.zeros((2, 4), np.float32)
    build_fake_model(bare, boxes, np.zeros(2), np.zeros(2), np.zeros((2, 28, 28)), 0, metadata={"author": "x"})
    assert "no maskrt metadata" in _cli_error(capsys, ["bench", "--model", str(bare)])
    broken = dict(fake_metadata((128, 128)), input_size="[128]")
    build_fake_model(bare, boxes, np.zeros(2), np.zeros(2), np.zeros((2, 28, 28)), 0, metadata=broken)
    assert "input_size" in _cli_error(capsys, ["bench", "--model", str(bare)])


def test_wrong_backend_and_engine_without_tensorrt(tmp_path, fake_model, capsys, monkeypatch):
    with pytest.raises(MaskrtError, match="unknown backend 'tensorflow'"):
        Predictor(fake_model, backend="tensorflow")
    assert "build an engine first" in _cli_error(capsys, ["bench", "--model", str(fake_model), "--backend", "tensorrt"])
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00fake serialized engine")
    (tmp_path / "model.engine.json").write_text("{}")
    # Simulate a machine without TensorRT (this venv may carry the lean runtime).
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", None)
    assert "TensorRT is not installed" in _cli_error(capsys, ["infer", "--model", str(engine), "--source", "0"])
    assert "ONNX Runtime cannot run it" in _cli_error(
        capsys, ["bench", "--model", str(engine), "--backend", "onnxruntime"])


def test_bad_sources(tmp_path, fake_model, capsys):
    text_image = tmp_path / "notes.jpg"
    text_image.write_text("this is not a picture\n")
    assert "cannot decode image" in _cli_error(capsys, ["infer", "--model", str(fake_model), "--source", str(text_image)])
    text_video = tmp_path / "clip.mp4"
    text_video.write_text("not a video either\n")
    assert "cannot open video" in _cli_error(capsys, ["infer", "--model", str(fake_model), "--source", str(text_video)])
    assert "source not found" in _cli_error(
        capsys, ["infer", "--model", str(fake_model), "--source", str(tmp_path / "missing.mp4")])
    assert "cannot open live source camera 97" in _cli_error(
        capsys, ["infer", "--model", str(fake_model), "--source", "97"])
    (tmp_path / "empty_dir").mkdir()
    assert "no images" in _cli_error(capsys, ["infer", "--model", str(fake_model), "--source", str(tmp_path / "empty_dir")])


def test_infer_on_a_folder_skips_undecodable_images(tmp_path, fake_model, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.full((64, 80, 3), 90, np.uint8))
    (folder / "b.jpg").write_text("text, not an image")
    cv2.imwrite(str(folder / "c.png"), np.full((48, 48, 3), 200, np.uint8))
    out = tmp_path / "out"
    assert main(["infer", "--model", str(fake_model), "--source", str(folder), "--save", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "a: 2 detections: circle 0.90, triangle 0.60" in stdout
    assert "frames 2, dropped 1" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    assert cv2.imread(str(out / "a.png")).shape == (64, 80, 3)


def test_bench_writes_figures(tmp_path, fake_model, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(fake_model), "--iters", "5", "--warmup", "1", "--json", str(out)]) == 0
    import json
    report = json.loads(out.read_text())
    for stage in ("preprocess_ms", "inference_ms", "postprocess_ms", "total_ms"):
        assert 0 < report[stage]["p50"] <= report[stage]["p99"]
    parts = report["preprocess_ms"]["mean"] + report["inference_ms"]["mean"] + report["postprocess_ms"]["mean"]
    assert report["total_ms"]["mean"] == pytest.approx(parts, rel=0.05)
    assert report["throughput_fps"] == pytest.approx(1000.0 / report["total_ms"]["mean"], rel=1e-6)
    assert report["input_size"] == [128, 128] and report["detections"] == 3
    assert "throughput" in capsys.readouterr().out


def test_graph_with_maskrt_nodes_registers_the_custom_ops(tmp_path):
    """A graph with a maskrt::MultilevelRoIAlign node runs without any setup by the caller, and
    its masks equal a twin graph that uses ONNX's standard RoiAlign (same semantics, one level)."""
    pytest.importorskip("maskrt.plugins.ort")
    custom = Predictor(standard_fake(tmp_path / "custom.onnx", masks_by_roi_align="maskrt"), conf=0.0)
    standard = Predictor(standard_fake(tmp_path / "standard.onnx", masks_by_roi_align="onnx", batch=1), conf=0.0)
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (96, 140, 3), dtype=np.uint8), (0, 0), 6.0)
    inputs, _ = custom.preprocess([image])
    ours, theirs = custom.infer(inputs), standard.infer(inputs)
    assert np.abs(ours["masks"]).max() > 0.1  # the image was pooled, not zeros
    np.testing.assert_allclose(ours["masks"], theirs["masks"], atol=1e-5)
    a, b = custom(image), standard(image)
    assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))


def test_onnxruntime_prefers_cuda_when_present(monkeypatch):
    import onnxruntime

    from maskrt.runtime.backends.onnxruntime import default_providers
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert default_providers(1) == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert default_providers() == ["CPUExecutionProvider"]


def test_show_without_a_display_is_one_line(fake_model, capsys, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert "--show needs a display" in _cli_error(capsys, ["infer", "--model", str(fake_model), "--source", "0",
                                                          "--show"])
    assert "--max-frames must be positive" in _cli_error(
        capsys, ["infer", "--model", str(fake_model), "--source", "0", "--max-frames", "0"])


def test_bad_sources_print_exactly_one_line_in_a_real_process(tmp_path, fake_model):
    """OpenCV and FFmpeg write warnings straight to fd 2; the user must still see one line."""
    text_video = tmp_path / "clip.mp4"
    text_video.write_text("not a video\n")
    for source in ("97", str(text_video)):
        result = subprocess.run([sys.executable, "-m", "maskrt", "infer", "--model", str(fake_model),
                                 "--source", source], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("maskrt: error: cannot open")
