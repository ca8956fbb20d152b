"""maskrt.model.ops: RoIAlign, RoIPool, NMS, box math, anchors (pure PyTorch, vectorised)."""
from maskrt.model.ops.anchors import AnchorGenerator, cell_anchors
from maskrt.model.ops.boxes import (
    BoxCoder,
    box_area,
    box_inter_union,
    box_iou,
    clip_boxes_to_image,
    remove_small_boxes,
)
from maskrt.model.ops.graph_ops import multilevel_roi_align, multilevel_roi_align_backward, nms_padded
from maskrt.model.ops.nms import batched_nms, nms
from maskrt.model.ops.roi_align import (
    convert_boxes_to_roi_format,
    fpn_level,
    infer_spatial_scales,
    multi_scale_roi_align,
    multilevel_roi_align_backward_eager,
    multilevel_roi_align_eager,
    multilevel_roi_pool,
    roi_align,
    roi_align_backward,
    roi_pool,
)

__all__ = [
    "AnchorGenerator",
    "BoxCoder",
    "batched_nms",
    "box_area",
    "box_inter_union",
    "box_iou",
    "cell_anchors",
    "clip_boxes_to_image",
    "convert_boxes_to_roi_format",
    "fpn_level",
    "infer_spatial_scales",
    "multi_scale_roi_align",
    "multilevel_roi_align",
    "multilevel_roi_align_backward",
    "multilevel_roi_align_backward_eager",
    "multilevel_roi_align_eager",
    "multilevel_roi_pool",
    "nms",
    "nms_padded",
    "remove_small_boxes",
    "roi_align",
    "roi_align_backward",
    "roi_pool",
]
