"""The two graph ops' ONNX translations (maskrt.export.translations) on tiny modules.

References: a float64 NumPy greedy NMS written from the contract, the ops' eager code,
ONNX Runtime's own single-level RoiAlign, and seed-notes worked example 1.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from maskrt.errors import MaskrtError
from maskrt.export import translations
from maskrt.export.onnx_export import IR_VERSION, check_graph
from maskrt.model import ops  # noqa: F401  (registers torch.ops.maskrt.*)

SCALES = [0.25, 0.125, 0.0625, 0.03125]


class NmsModule(torch.nn.Module):
    def __init__(self, iou_threshold: float, score_threshold: float, max_output: int) -> None:
        super().__init__()
        self.args = (iou_threshold, score_threshold, max_output)

    def forward(self, boxes, scores, groups):
        return torch.ops.maskrt.nms_padded(boxes, scores, groups, *self.args)


class RoiAlignModule(torch.nn.Module):
    def __init__(self, scales, output_size: int, sampling_ratio: int, aligned: bool) -> None:
        super().__init__()
        self.scales, self.output_size, self.sampling_ratio, self.aligned = scales, output_size, sampling_ratio, aligned

    def forward(self, rois, *features):
        return torch.ops.maskrt.multilevel_roi_align(rois, list(features), self.scales, self.output_size,
                                                     self.output_size, self.sampling_ratio, self.aligned)


def export(module, args, names, table, dynamic=None) -> onnx.ModelProto:
    program = torch.onnx.export(module.eval(), tuple(torch.from_numpy(a) for a in args), dynamo=True, input_names=names,
                                custom_translation_table=table, dynamic_shapes=dynamic, verbose=False)
    model = program.model_proto
    model.ir_version = IR_VERSION
    return model


def run(model: onnx.ModelProto, feeds: dict, options: ort.SessionOptions | None = None) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# --- nms_padded ---------------------------------------------------------------------------

def nms_reference(boxes, scores, groups, iou_threshold, score_threshold, max_output) -> np.ndarray:
    """Greedy NMS per image and group, float64, written from the contract (docs/design.md)."""
    out = -np.ones((scores.shape[0], max_output), np.int64)
    for b in range(scores.shape[0]):
        order = [i for i in np.argsort(-scores[b].astype(np.float64), kind="stable") if scores[b, i] > score_threshold]
        keep: list[int] = []
        for i in order:
            bi = boxes[b, i].astype(np.float64)
            suppressed = False
            for j in keep:
                if groups[b, i] != groups[b, j]:
                    continue
                bj = boxes[b, j].astype(np.float64)
                inter = max(0.0, min(bi[2], bj[2]) - max(bi[0], bj[0])) * max(0.0, min(bi[3], bj[3]) - max(bi[1], bj[1]))
                union = (bi[2] - bi[0]) * (bi[3] - bi[1]) + (bj[2] - bj[0]) * (bj[3] - bj[1]) - inter
                if inter / union > iou_threshold:
                    suppressed = True
                    break
            if not suppressed:
                keep.append(i)
        keep = keep[:max_output]
        out[b, :len(keep)] = keep
    return out


def random_nms_case(rng, batch: int, count: int, num_groups: int):
    corner = rng.uniform(0, 60, (batch, count, 2))
    size = rng.uniform(4, 50, (batch, count, 2))
    boxes = np.concatenate([corner, corner + size], -1).astype(np.float32)
    scores = rng.permutation(np.linspace(0.01, 0.99, batch * count)).reshape(batch, count).astype(np.float32)  # ties-free
    groups = rng.integers(0, num_groups, (batch, count)).astype(np.int64)
    return boxes, scores, groups


@pytest.fixture(scope="module")
def nms_graph() -> onnx.ModelProto:
    boxes, scores, groups = random_nms_case(np.random.default_rng(0), 2, 40, 3)
    batch, count = torch.export.Dim("batch"), torch.export.Dim("count")
    dims = ({0: batch, 1: count},) * 3
    return export(NmsModule(0.5, 0.2, 25), (boxes, scores, groups), ["boxes", "scores", "groups"],
                  {torch.ops.maskrt.nms_padded.default: translations.nms_padded_onnx}, dims)


@pytest.mark.parametrize("seed,batch,count,num_groups", [(1, 2, 60, 3), (2, 1, 80, 1), (3, 3, 30, 5), (4, 2, 12, 2)])
def test_nms_padded_translation_equals_reference_and_eager(nms_graph, seed, batch, count, num_groups):
    rng = np.random.default_rng(seed)
    boxes, scores, groups = random_nms_case(rng, batch, count, num_groups)
    scores[0, rng.choice(count, count // 4, replace=False)] = -np.inf  # absent entries
    got = run(nms_graph, {"boxes": boxes, "scores": scores, "groups": groups})[0]
    expected = nms_reference(boxes, scores, groups, 0.5, 0.2, 25)
    eager = torch.ops.maskrt.nms_padded(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups),
                                        0.5, 0.2, 25).numpy()
    assert got.shape == (batch, 25) and got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(eager, expected)
    if count >= 60:  # dense enough that NMS must have suppressed something
        assert (expected >= 0).sum() < (scores > 0.2).sum()
    if count < 25:
        assert (got[:, count:] == -1).all()


def test_nms_padded_translation_all_absent(nms_graph):
    boxes, scores, groups = random_nms_case(np.random.default_rng(5), 2, 30, 2)
    scores[:] = -np.inf
    got = run(nms_graph, {"boxes": boxes, "scores": scores, "groups": groups})[0]
    assert (got == -1).all()


# --- multilevel_roi_align: portable ---------------------------------------------------------

def random_rois(rng, batch: int, count: int, image: float) -> np.ndarray:
    """RoIs spread over all four FPN levels, plus one empty and one inverted box."""
    sizes = np.exp(rng.uniform(np.log(4), np.log(image * 2.5), (batch, count, 1))) * rng.uniform(0.6, 1.6, (batch, count, 2))
    corner = rng.uniform(-10, image, (batch, count, 2))
    rois = np.concatenate([corner, corner + sizes], -1)
    rois[0, 0] = [20, 20, 20, 30]  # zero area -> lowest level
    rois[-1, -1] = [50, 50, 40, 40]  # inverted, small -> lowest level
    return rois.astype(np.float32)


def features_for(rng, batch: int, channels: int, image: int, scales) -> list[np.ndarray]:
    return [rng.standard_normal((batch, channels, int(image * s), int(image * s))).astype(np.float32) for s in scales]


def roi_align_table(target: str):
    function = translations.multilevel_roi_align_tensorrt if target == "tensorrt" else translations.multilevel_roi_align_onnx
    return {torch.ops.maskrt.multilevel_roi_align.default: function}


def level_of(rois: np.ndarray) -> np.ndarray:
    """float64 FPN level (2..5) of RoIs [..., 4], written from the contract's level rule."""
    r = rois.astype(np.float64)
    area = np.maximum((r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1]), 0)  # torchvision's: inverted twice > 0
    with np.errstate(divide="ignore"):
        return np.clip(np.floor(4 + np.log2(np.sqrt(area) / 224.0) + 1e-6), 2, 5).astype(np.int64)


def ort_roi_align(feature, rois, batch_indices, scale, output_size, sampling_ratio, aligned) -> np.ndarray:
    """ONNX Runtime's own RoiAlign node (equal to torchvision's roi_align: shared/anchors.md)."""
    node = onnx.helper.make_node("RoiAlign", ["X", "rois", "batch_indices"], ["Y"], output_height=output_size,
                                 output_width=output_size, sampling_ratio=sampling_ratio, spatial_scale=scale,
                                 coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel")
    graph = onnx.helper.make_graph([node], "roi_align", [
        onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, None),
        onnx.helper.make_tensor_value_info("rois", onnx.TensorProto.FLOAT, None),
        onnx.helper.make_tensor_value_info("batch_indices", onnx.TensorProto.INT64, None)],
        [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = IR_VERSION
    return run(model, {"X": feature, "rois": rois, "batch_indices": batch_indices})[0]


@pytest.mark.parametrize("sampling_ratio,aligned", [(2, False), (0, True)])
def test_multilevel_roi_align_portable_equals_ort_per_level_and_eager(sampling_ratio, aligned):
    rng = np.random.default_rng(10 + sampling_ratio)
    batch, count, image, output_size = 2, 24, 256, 5
    rois = random_rois(rng, batch, count, image)
    if sampling_ratio > 0:
        # (not with adaptive sampling: ONNX Runtime's RoiAlign crashes on a large inverted box there,
        # its grid ceil(negative bin) being negative on both axes)
        rois[0, 1] = [60, 60, -190, -190]  # inverted on both axes: area 250^2 > 0 -> P4, as torchvision
        rois[0, 2] = [60, 60, -190, 310]  # inverted on one axis: area < 0 -> lowest level
    features = features_for(rng, batch, 3, image, SCALES)
    names = ["rois", "p2", "p3", "p4", "p5"]
    module = RoiAlignModule(SCALES, output_size, sampling_ratio, aligned)
    batch_dim = {0: torch.export.Dim("batch")}
    graph = export(module, [rois, *features], names, roi_align_table("onnx"), (batch_dim, (batch_dim,) * 4))
    check_graph(graph)
    assert not any(n.op_type == "MultilevelRoIAlign" for n in graph.graph.node)
    assert sum(n.op_type == "RoiAlign" for n in graph.graph.node) == 4
    got = run(graph, dict(zip(names, [rois, *features])))[0]
    assert got.shape == (batch, count, 3, output_size, output_size)

    levels = level_of(rois)
    assert set(np.unique(levels)) == {2, 3, 4, 5}, "the case must use every level"
    expected = np.zeros_like(got)
    for level in range(2, 6):
        b, r = np.nonzero(levels == level)
        expected[b, r] = ort_roi_align(features[level - 2], rois[b, r], b.astype(np.int64), SCALES[level - 2],
                                       output_size, sampling_ratio, aligned)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    eager = module(torch.from_numpy(rois), *map(torch.from_numpy, features)).numpy()
    np.testing.assert_allclose(got, eager, rtol=1e-5, atol=1e-5)

    # The same graph with one image (dynamic batch) gives that image's rows.
    one = run(graph, dict(zip(names, [rois[1:], *[f[1:] for f in features]])))[0]
    np.testing.assert_allclose(one[0], got[1], rtol=0, atol=1e-6)


def test_multilevel_roi_align_portable_worked_example():
    """seed-notes example 1: 4x4 map 1..16, RoI (1.2,0.8)-(2.8,2.2), 2x2, 1 sample, no offset."""
    feature = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)
    rois = np.array([[[1.2, 0.8, 2.8, 2.2]]], np.float32)
    graph = export(RoiAlignModule([1.0], 2, 1, False), [rois, feature], ["rois", "p0"], roi_align_table("onnx"))
    got = run(graph, {"rois": rois, "p0": feature})[0]
    np.testing.assert_allclose(got[0, 0, 0], [[7.2, 8.0], [10.0, 10.8]], rtol=0, atol=1e-5)


def test_portable_roi_align_rejects_max_mode():
    with pytest.raises(MaskrtError, match="avg"):
        translations.multilevel_roi_align_onnx(None, [None], [0.25], 7, 7, 2, False, mode="max")


# --- multilevel_roi_align: TensorRT plugin node ---------------------------------------------

def test_tensorrt_translation_is_one_contract_node():
    rng = np.random.default_rng(20)
    rois = random_rois(rng, 2, 8, 128)
    features = features_for(rng, 2, 4, 128, SCALES)
    names = ["rois", "p2", "p3", "p4", "p5"]
    batch_dim = {0: torch.export.Dim("batch")}
    graph = export(RoiAlignModule(SCALES, 7, 2, False), [rois, *features], names, roi_align_table("tensorrt"),
                   (batch_dim, (batch_dim,) * 4))
    inferred = check_graph(graph)
    contract = json.loads(translations.CONTRACT_PATH.read_text())
    nodes = [n for n in graph.graph.node if n.op_type == contract["op"]]
    assert len(nodes) == 1 and nodes[0].domain == contract["onnx_domain"] == "maskrt"
    assert not any(n.op_type == "RoiAlign" for n in graph.graph.node)
    assert list(nodes[0].input) == names
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    expected_names = {a["name"] for a in contract["attributes"]} | {"plugin_namespace", "plugin_version"}
    assert set(attributes) == expected_names
    assert attributes["plugin_namespace"] == b"maskrt" and attributes["plugin_version"] == b"1"
    assert attributes["output_height"] == attributes["output_width"] == 7
    assert attributes["sampling_ratio"] == 2 and attributes["aligned"] == 0 and attributes["mode"] == 0
    assert attributes["spatial_scales"] == pytest.approx(SCALES)
    assert attributes["canonical_scale"] == 224.0 and attributes["canonical_level"] == 4
    types = {a["name"]: a["type"] for a in contract["attributes"]}
    onnx_types = {"int": onnx.AttributeProto.INT, "float": onnx.AttributeProto.FLOAT,
                  "float_list": onnx.AttributeProto.FLOATS}
    for attribute in nodes[0].attribute:
        if attribute.name in types:
            assert attribute.type == onnx_types[types[attribute.name]], attribute.name
    # The plugin node's output carries its type and shape in the saved graph.
    shapes = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    pooled = shapes[nodes[0].output[0]].type.tensor_type
    assert pooled.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_value or d.dim_param for d in pooled.shape.dim]
    assert dims[1:] == [8, 4, 7, 7] and isinstance(dims[0], str)
