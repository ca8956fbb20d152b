"""maskrt::MultilevelRoIAlign in ONNX Runtime: hand-built graphs through maskrt.plugins.ort."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from maskrt.errors import MaskrtError
from maskrt.plugins import cpu
from maskrt.plugins import ort as maskrt_ort
from test_plugin_cpu import SCALES, random_case
from test_plugin_reference import reference_multilevel_roi_align

REPO = Path(__file__).resolve().parent.parent
CONTRACT = json.loads((REPO / "plugins" / "multilevel_roi_align.json").read_text())
CONTRACT_DEFAULTS = {a["name"]: a["default"] for a in CONTRACT["attributes"]}


def _native_library() -> Path | None:
    """libmaskrt_ort_ops.so when it exists or can be built here (needs ORT's headers), else None."""
    try:
        path = maskrt_ort.native_library_path()
        if path is None and os.environ.get("ORT_INCLUDE_DIR"):
            path = maskrt_ort.build_native_library()
        return path
    except MaskrtError:
        return None


BACKENDS = ["python", pytest.param("native", marks=pytest.mark.skipif(
    _native_library() is None, reason="libmaskrt_ort_ops.so not built (needs ONNX Runtime headers: ORT_INCLUDE_DIR)"))]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs a test once with the Python fallback and once with the native library (if built)."""
    if request.param == "python":
        monkeypatch.setattr(maskrt_ort, "native_library_path", lambda: None)
    else:
        library = _native_library()
        monkeypatch.setattr(maskrt_ort, "native_library_path", lambda: library)
    assert maskrt_ort.custom_op_backend() == request.param
    return request.param


def make_graph(num_levels: int, dtype: int = TensorProto.FLOAT, after: str | None = None, **attributes) -> bytes:
    """One maskrt::MultilevelRoIAlign node (opset 17, IR 10) over inputs rois, p0..p{L-1}."""
    inputs = ["rois"] + [f"p{i}" for i in range(num_levels)]
    node = helper.make_node("MultilevelRoIAlign", inputs, ["pooled" if after else "out"], name="box_pooler",
                            domain="maskrt", plugin_namespace="maskrt", plugin_version="1", **attributes)
    nodes = [node]
    if after:  # a standard op downstream: the output keeps its name and dtype through the rewrite
        nodes.append(helper.make_node(after, ["pooled"], ["out"]))
    graph = helper.make_graph(
        nodes, "multilevel_roi_align",
        [helper.make_tensor_value_info("rois", dtype, ["B", "R", 4])]
        + [helper.make_tensor_value_info(f"p{i}", dtype, ["B", "C", None, None]) for i in range(num_levels)],
        [helper.make_tensor_value_info("out", dtype, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17),
                                                    helper.make_operatorsetid("maskrt", 1)])
    model.ir_version = 10  # onnx 1.23 writes 14 by default; ONNX Runtime 1.31 reads at most 13
    return model.SerializeToString()


def run(model: bytes, rois: np.ndarray, features: list[np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    maskrt_ort.register_custom_ops(options)
    session = ort.InferenceSession(maskrt_ort.prepare_model(model), options, providers=["CPUExecutionProvider"])
    feeds = {"rois": rois, **{f"p{i}": f for i, f in enumerate(features)}}
    return session.run(["out"], feeds)[0]


def contract_attributes() -> dict:
    """The node attributes of the contract's defaults, as the JSON states them."""
    return {name: CONTRACT_DEFAULTS[name] for name in
            ("output_height", "output_width", "sampling_ratio", "aligned", "spatial_scales", "canonical_scale",
             "canonical_level", "mode")}


def test_contract_defaults_node_equals_reference(backend):
    rois, features = random_case(seed=5)
    rois = rois * 4  # RoIs of a 384x512 image so that s0 = 224 reaches every level
    features = [np.repeat(np.repeat(f, 4, axis=2), 4, axis=3) for f in features]
    attributes = contract_attributes()
    assert attributes["spatial_scales"] == SCALES
    got = run(make_graph(4, **attributes), rois, features)
    expected = reference_multilevel_roi_align(rois, features, SCALES)  # contract defaults: 7x7, sr 2, avg, legacy
    assert got.shape == (2, 14, 3, 7, 7) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-5


def test_every_attribute_reaches_the_kernel(backend):
    rois, features = random_case(seed=6)
    scales = SCALES[1:]  # three levels: a feature count other than the default
    features = features[1:]
    attributes = dict(output_height=5, output_width=3, sampling_ratio=0, aligned=1, spatial_scales=scales,
                      canonical_scale=40.0, canonical_level=5, mode=1)
    got = run(make_graph(3, after="Relu", **attributes), rois, features)
    expected = np.maximum(reference_multilevel_roi_align(rois, features, scales, 5, 3, 0, True, 40.0, 5, "max"), 0)
    assert got.shape == (2, 14, 3, 5, 3)
    assert np.abs(got - expected).max() <= 1e-5


def test_float16_graph_returns_float16(backend):
    rois, features = random_case(seed=8)
    rois16, features16 = rois.astype(np.float16), [f.astype(np.float16) for f in features]
    got = run(make_graph(4, TensorProto.FLOAT16, sampling_ratio=2, canonical_scale=32.0, spatial_scales=SCALES),
              rois16, features16)
    assert got.dtype == np.float16
    expected = cpu.multilevel_roi_align(rois16, features16, SCALES, canonical_scale=32.0)
    assert np.array_equal(got.view(np.uint16), expected.view(np.uint16))


def test_zero_rois(backend):
    _, features = random_case(seed=9)
    got = run(make_graph(4, spatial_scales=SCALES), np.zeros((2, 0, 4), np.float32), features)
    assert got.shape == (2, 0, 3, 7, 7)


def test_mismatched_feature_count_is_one_line_error(monkeypatch):
    monkeypatch.setattr(maskrt_ort, "native_library_path", lambda: None)
    with pytest.raises(MaskrtError, match="3 feature inputs but 4 spatial_scales"):
        maskrt_ort.prepare_model(make_graph(3, spatial_scales=SCALES))


def test_missing_onnxruntime_extensions_is_one_line_error(monkeypatch):
    monkeypatch.setattr(maskrt_ort, "native_library_path", lambda: None)
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)
    with pytest.raises(MaskrtError, match="install onnxruntime-extensions"):
        maskrt_ort.register_custom_ops(ort.SessionOptions())


def test_rewrite_keeps_other_nodes_and_drops_the_maskrt_node(monkeypatch):
    monkeypatch.setattr(maskrt_ort, "native_library_path", lambda: None)
    model = onnx.load_from_string(maskrt_ort.prepare_model(make_graph(2, after="Relu", spatial_scales=SCALES[:2])))
    kinds = [(n.domain, n.op_type) for n in model.graph.node]
    assert ("maskrt", "MultilevelRoIAlign") not in kinds
    assert kinds.count(("maskrt.python", "MultilevelRoIAlign")) == 1 and ("", "Relu") in kinds
    op = next(n for n in model.graph.node if n.domain == "maskrt.python")
    assert len(op.input) == 6  # rois + 5 feature slots
    assert json.loads(helper.get_attribute_value(op.attribute[0]))["spatial_scales"] == SCALES[:2]


@pytest.mark.skipif(_native_library() is None, reason="libmaskrt_ort_ops.so not built (needs ORT_INCLUDE_DIR)")
def test_native_op_reports_bad_nodes_as_run_errors(monkeypatch):
    library = _native_library()
    monkeypatch.setattr(maskrt_ort, "native_library_path", lambda: library)
    _, features = random_case(seed=2)
    with pytest.raises(Exception, match="3 feature inputs but 4 spatial_scales"):
        run(make_graph(3, spatial_scales=SCALES), np.zeros((2, 1, 4), np.float32), features[:3])


def test_maskrt_node_inside_a_subgraph_is_refused_by_the_fallback(monkeypatch):
    monkeypatch.setattr(maskrt_ort, "native_library_path", lambda: None)
    inner = onnx.load_from_string(make_graph(1, spatial_scales=[0.25])).graph
    condition = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    branch = helper.make_node("If", ["cond"], ["out"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph([branch], "outer", [condition, *inner.input],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17),
                                                    helper.make_operatorsetid("maskrt", 1)])
    with pytest.raises(MaskrtError, match="inside an If/Loop body"):
        maskrt_ort.prepare_model(model.SerializeToString())


def test_rewrite_defaults_match_the_contract_json():
    assert maskrt_ort.DEFAULT_ATTRIBUTES == contract_attributes()
