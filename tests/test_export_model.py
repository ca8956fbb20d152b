"""A whole (small, seeded) Mask R-CNN through `export_onnx`: the portable fp32 graph on ONNX
Runtime against PyTorch eager `detect_batch`, dynamic batch, graph checks, metadata, the
TensorRT-target graph (through `maskrt export`), and the fp16 / int8 passes.

One model, exported once per target (module fixtures): exporting takes ~20-30 s on 2 cores.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from maskrt.errors import MaskrtError
from maskrt.export import precision
from maskrt.export.calibration import DEFAULT_CALIB_DIR, calibration_files
from maskrt.export.onnx_export import IR_VERSION, OUTPUT_NAMES, check_graph, export_onnx, read_metadata
from maskrt.model import build_model, save_model
from maskrt.runtime.preprocess import letterbox

SIZE = 128
CLASS_NAMES = ["__background__", "disc", "triangle", "rectangle"]
CATEGORY_IDS = [0, 11, 12, 13]


def make_model() -> torch.nn.Module:
    """edge preset at 128 px, seeded; the mask logits are scaled so that mask probabilities sit
    far from 0.5 (a random-init head gives ~0.5 everywhere, which makes thresholded masks noise)."""
    torch.manual_seed(0)
    model = build_model("edge", len(CLASS_NAMES), CLASS_NAMES, min_size=SIZE, max_size=SIZE,
                        box_score_thresh=0.05, box_detections_per_img=30,
                        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=80)
    model.category_ids = list(CATEGORY_IDS)
    with torch.no_grad():
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(40.0)
        model.roi_heads.box_predictor.cls_score.weight.mul_(8.0)  # spread the class scores
    return model.eval()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_model()


@pytest.fixture(scope="module")
def bgr_images() -> list[np.ndarray]:
    return [cv2.imread(str(p)) for p in calibration_files(DEFAULT_CALIB_DIR)[:2]]


@pytest.fixture(scope="module")
def images(model, bgr_images) -> np.ndarray:
    """Two synthetic scenes letterboxed to [2,3,128,128] exactly as the runtime does."""
    return np.stack([letterbox(b, (SIZE, SIZE), model.image_mean)[0] for b in bgr_images])


@pytest.fixture(scope="module")
def portable_path(model, tmp_path_factory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("export") / "portable.onnx", (SIZE, SIZE))


@pytest.fixture(scope="module")
def portable_outputs(portable_path, images) -> dict[str, np.ndarray]:
    return run(portable_path, images)


@pytest.fixture(scope="module")
def eager_outputs(model, images) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outputs = model.detect_batch(torch.from_numpy(images))
    return {name: value.numpy() for name, value in zip(OUTPUT_NAMES, outputs)}


def run(path_or_model, images: np.ndarray, options: ort.SessionOptions | None = None) -> dict[str, np.ndarray]:
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": images})))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of paired boxes [N,4] (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    inter = (np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
             * np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None))
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / np.maximum(union, 1e-9)


def detection_agreement(reference: dict, other: dict) -> float:
    """Fraction of the reference's detections that `other` reproduces: a detection of `other`
    with the same label and box IoU > 0.9, each used once (greedy by reference score)."""
    matched = total = 0
    for b in range(reference["num_dets"].shape[0]):
        n_ref, n_other = int(reference["num_dets"][b]), int(other["num_dets"][b])
        used = np.zeros(n_other, bool)
        for i in range(n_ref):
            same_label = other["labels"][b, :n_other] == reference["labels"][b, i]
            ious = box_iou(np.repeat(reference["boxes"][b, i:i + 1], n_other, 0), other["boxes"][b, :n_other])
            candidates = np.nonzero(same_label & (ious > 0.9) & ~used)[0]
            if candidates.size:
                used[candidates[np.argmax(ious[candidates])]] = True
                matched += 1
        total += n_ref
    return matched / max(total, 1)


# --- the portable fp32 graph ----------------------------------------------------------------

def test_portable_graph_equals_eager_detect_batch(portable_outputs, eager_outputs):
    got, ref = portable_outputs, eager_outputs
    assert got["num_dets"].dtype == np.int32 and got["labels"].dtype == np.int32
    np.testing.assert_array_equal(got["num_dets"], ref["num_dets"])
    assert ref["num_dets"].min() >= 5, "the seeded model must detect something"
    for b, n in enumerate(ref["num_dets"]):
        np.testing.assert_array_equal(got["labels"][b, :n], ref["labels"][b, :n])
        np.testing.assert_allclose(got["boxes"][b, :n], ref["boxes"][b, :n], rtol=0, atol=1e-2)
        np.testing.assert_allclose(got["scores"][b, :n], ref["scores"][b, :n], rtol=0, atol=1e-4)
        np.testing.assert_allclose(got["masks"][b, :n], ref["masks"][b, :n], rtol=0, atol=1e-3)
        # Entries past num_dets are zero, as the contract says.
        assert not got["boxes"][b, n:].any() and not got["masks"][b, n:].any()


def test_dynamic_batch_one_image_equals_its_row(portable_path, portable_outputs, images):
    for b in range(images.shape[0]):
        single = run(portable_path, images[b:b + 1])
        n = int(portable_outputs["num_dets"][b])
        assert int(single["num_dets"][0]) == n
        np.testing.assert_array_equal(single["labels"][0], portable_outputs["labels"][b])
        np.testing.assert_allclose(single["boxes"][0], portable_outputs["boxes"][b], rtol=0, atol=1e-3)
        np.testing.assert_allclose(single["masks"][0], portable_outputs["masks"][b], rtol=0, atol=1e-4)


def test_portable_graph_checks_io_and_metadata(portable_path):
    graph = onnx.load(str(portable_path))
    assert graph.ir_version == IR_VERSION <= 13
    opset = {o.domain: o.version for o in graph.opset_import}
    assert opset[""] >= 17 and set(opset) <= {"", "ai.onnx"}
    check_graph(graph)  # full checker + strict shape inference, every value shaped
    assert not any(n.domain not in ("", "ai.onnx") for n in graph.graph.node)
    assert sum(n.op_type == "RoiAlign" for n in graph.graph.node) == 8  # 4 levels x (box, mask)
    assert not any(p.key != precision.NAME_SCOPES_KEY for n in graph.graph.node for p in n.metadata_props), \
        "exporter stack traces must be stripped"

    def io(value):
        tensor = value.type.tensor_type
        return tensor.elem_type, [d.dim_value or d.dim_param for d in tensor.shape.dim]

    assert [i.name for i in graph.graph.input] == ["images"]
    assert io(graph.graph.input[0]) == (onnx.TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])
    outputs = {o.name: io(o) for o in graph.graph.output}
    assert list(outputs) == list(OUTPUT_NAMES)
    assert outputs["num_dets"] == (onnx.TensorProto.INT32, ["batch"])
    assert outputs["boxes"] == (onnx.TensorProto.FLOAT, ["batch", 30, 4])
    assert outputs["scores"] == (onnx.TensorProto.FLOAT, ["batch", 30])
    assert outputs["labels"] == (onnx.TensorProto.INT32, ["batch", 30])
    assert outputs["masks"] == (onnx.TensorProto.FLOAT, ["batch", 30, 28, 28])

    metadata = read_metadata(graph)
    assert json.loads(metadata["class_names"]) == CLASS_NAMES
    assert json.loads(metadata["category_ids"]) == CATEGORY_IDS
    assert json.loads(metadata["input_size"]) == [SIZE, SIZE]
    assert json.loads(metadata["image_mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(metadata["image_std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert (metadata["target"], metadata["precision"], metadata["preset"]) == ("onnx", "fp32", "edge")
    assert metadata["mask_size"] == "28" and metadata["detections_per_img"] == "30"
    assert metadata["num_classes"] == "4" and metadata["maskrt_version"]


def test_runtime_predictor_masks_match_eager(portable_path, model, bgr_images):
    """Pasted masks through the torch-free runtime vs the eager model's own pasted masks."""
    from maskrt.runtime.predictor import Predictor

    predictor = Predictor(portable_path, backend="onnxruntime")
    bgr = bgr_images[0]  # 160x160: letterboxed (resized) to 128
    detections = predictor(bgr, conf=0.0)
    rgb = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float() / 255.0
    with torch.no_grad():
        eager = model([rgb])[0]
    assert len(detections) == eager["scores"].shape[0] >= 5
    np.testing.assert_array_equal(detections.labels, eager["labels"].numpy())
    np.testing.assert_allclose(detections.boxes, eager["boxes"].numpy(), rtol=0, atol=0.05)
    probabilities = eager["masks"][:, 0].numpy()
    eager_masks = probabilities > 0.5  # the runtime's rule: probability > 0.5
    inter = np.logical_and(detections.masks, eager_masks).sum((1, 2))
    union = np.logical_or(detections.masks, eager_masks).sum((1, 2))
    assert inter.sum() / union.sum() > 0.995
    assert (union >= 100).sum() >= 5  # enough sizeable masks for the check below to mean something
    # Every pixel that differs is one the eager model itself put on the 0.5 boundary (a shifted
    # or misscaled paste would flip pixels far from it). A random-init head can leave whole
    # patches at logit ~0 (probability 0.5000010), so per-mask IoU is not the right measure.
    differs = detections.masks != eager_masks
    assert np.abs(probabilities[differs] - 0.5).max(initial=0.0) < 1e-3


# --- the TensorRT-target graph, through `maskrt export --batch 2` ----------------------------

@pytest.fixture(scope="module")
def tensorrt_path(model, tmp_path_factory) -> Path:
    from maskrt.export.commands import export_command

    folder = tmp_path_factory.mktemp("trt")
    save_model(model, folder / "model.safetensors")
    args = argparse.Namespace(weights=str(folder / "model.safetensors"), target="tensorrt", precision="fp32",
                              calib=None, input_size=(SIZE, SIZE), batch=2, out=str(folder / "trt.onnx"))
    assert export_command(args) == 0
    return folder / "trt.onnx"


def test_tensorrt_graph_has_the_contract_nodes(tensorrt_path):
    graph = onnx.load(str(tensorrt_path))
    check_graph(graph)
    contract = json.loads((Path(__file__).resolve().parent.parent / "plugins/multilevel_roi_align.json").read_text())
    nodes = [n for n in graph.graph.node if n.op_type == "MultilevelRoIAlign"]
    assert len(nodes) == 2 and all(n.domain == "maskrt" for n in nodes)
    assert not any(n.op_type == "RoiAlign" for n in graph.graph.node)
    assert {o.domain: o.version for o in graph.opset_import}.get("maskrt") == 1
    expected = {a["name"] for a in contract["attributes"]} | set(contract["onnx_node_extra_attributes"])
    sizes = []
    for node in nodes:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert set(attributes) == expected
        assert attributes["spatial_scales"] == pytest.approx([0.25, 0.125, 0.0625, 0.03125])
        assert (attributes["plugin_namespace"], attributes["plugin_version"]) == (b"maskrt", b"1")
        assert attributes["sampling_ratio"] == 2 and attributes["aligned"] == 0 and attributes["mode"] == 0
        assert len(node.input) == 5  # rois + P2..P5
        sizes.append((attributes["output_height"], attributes["output_width"]))
    assert sorted(sizes) == [(7, 7), (14, 14)]
    assert read_metadata(graph)["target"] == "tensorrt"
    # --batch 2 fixes B everywhere (the portable fixture covers the dynamic batch).
    assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == [2, 3, SIZE, SIZE]
    assert all(o.type.tensor_type.shape.dim[0].dim_value == 2 for o in graph.graph.output)


def test_tensorrt_graph_on_ort_custom_op_equals_portable(tensorrt_path, images, portable_outputs):
    ort_ops = pytest.importorskip("maskrt.plugins.ort")
    options = ort.SessionOptions()
    ort_ops.register_custom_ops(options)
    session = ort.InferenceSession(ort_ops.prepare_model(str(tensorrt_path)), options,
                                   providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": images})))
    np.testing.assert_array_equal(got["num_dets"], portable_outputs["num_dets"])
    for b, n in enumerate(portable_outputs["num_dets"]):
        np.testing.assert_array_equal(got["labels"][b, :n], portable_outputs["labels"][b, :n])
        np.testing.assert_allclose(got["boxes"][b, :n], portable_outputs["boxes"][b, :n], rtol=0, atol=1e-2)
        np.testing.assert_allclose(got["masks"][b, :n], portable_outputs["masks"][b, :n], rtol=0, atol=1e-3)


# --- fp16 and int8 ----------------------------------------------------------------------------

def test_fp16_graph_runs_and_stays_close(portable_path, images, portable_outputs):
    half = precision.to_fp16(onnx.load(str(portable_path)))
    check_graph(half)
    initializer_types = {t.data_type for t in half.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in initializer_types
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [onnx.TensorProto.FLOAT]
    inferred = onnx.shape_inference.infer_shapes(half)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    for node in half.graph.node:
        if node.op_type in ("NonMaxSuppression", "RoiAlign", "Softmax", "TopK"):
            assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.op_type
    got = run(half, images)
    agreement = detection_agreement(portable_outputs, got)
    print(f"fp16 vs fp32 detection agreement: {agreement:.3f}")
    assert agreement >= 0.9


def test_int8_graph_has_qdq_where_it_should_and_runs(portable_path, images, portable_outputs):
    quantized = precision.to_int8(onnx.load(str(portable_path)), DEFAULT_CALIB_DIR, (SIZE, SIZE), [0.485, 0.456, 0.406])
    quantized.ir_version = IR_VERSION
    check_graph(quantized)
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    produced_by = {out: n for n in quantized.graph.node for out in n.output}
    # Per-channel weights: the backbone's first conv reads a DequantizeLinear with axis 0.
    convs = [n for n in quantized.graph.node if n.op_type == "Conv"]
    weight_dq = produced_by[convs[0].input[1]]
    assert weight_dq.op_type == "DequantizeLinear"
    assert {a.name: a.i for a in weight_dq.attribute}.get("axis", 1) == 0
    # The sensitive ops stay float: NMS and softmax inputs, the final predictors' weights
    # and inputs (RoiAlign may read the int8-rounded FPN maps: it computes in float).
    def from_dq(name: str) -> bool:
        return name in produced_by and produced_by[name].op_type == "DequantizeLinear"

    predictors = [n for n in quantized.graph.node
                  if any(m.endswith(("box_predictor", "mask_predictor.mask_fcn_logits"))
                         for m in precision.module_path(n)) and n.op_type in ("Gemm", "MatMul", "Conv")]
    assert len(predictors) >= 3  # cls_score, bbox_pred, mask_fcn_logits
    for node in predictors:
        assert not any(from_dq(i) for i in node.input), node.name
    for node in quantized.graph.node:
        if node.op_type in ("NonMaxSuppression", "Softmax", "TopK"):
            assert not any(from_dq(i) for i in node.input), node.op_type
    got = run(quantized, images)
    assert np.isfinite(got["boxes"]).all() and np.isfinite(got["masks"]).all()
    agreement = detection_agreement(portable_outputs, got)
    print(f"int8 vs fp32 detection agreement: {agreement:.3f}")
    assert agreement >= 0.5


# --- errors --------------------------------------------------------------------------------

def test_export_rejects_bad_arguments(model, tmp_path):
    with pytest.raises(MaskrtError, match="multiples of 32"):
        export_onnx(model, tmp_path / "a.onnx", (100, 128))
    with pytest.raises(MaskrtError, match="target"):
        export_onnx(model, tmp_path / "a.onnx", (128, 128), target="tflite")
    with pytest.raises(MaskrtError, match="precision"):
        export_onnx(model, tmp_path / "a.onnx", (128, 128), precision="int4")
    with pytest.raises(MaskrtError, match=r"\.onnx"):
        export_onnx(model, tmp_path / "a.engine", (128, 128))
    with pytest.raises(MaskrtError, match="calibration folder"):
        export_onnx(model, tmp_path / "a.onnx", (128, 128), precision="int8", calib_dir=tmp_path / "none")
    with pytest.raises(MaskrtError, match="RoIPool"):
        export_onnx(build_model("edge", 3, roi_op="pool"), tmp_path / "a.onnx", (128, 128))


def test_cli_export_missing_weights_is_one_line_error(tmp_path, capsys):
    from maskrt.cli import main

    code = main(["export", "--weights", str(tmp_path / "none.safetensors"), "--input-size", "128x128",
                 "--out", str(tmp_path / "a.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("maskrt: error:") and err.count("\n") == 1
