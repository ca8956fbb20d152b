"""The tiny `edge` model the training tests share: 96 px, narrow backbone and heads, few
proposals. Fast on 2 cores."""

TINY = {
    "min_size": 96, "max_size": 96, "backbone_width": 8, "fpn_channels": 16,
    "representation_size": 32, "box_head_convs": [16], "mask_layers": [16, 16], "mask_dim_reduced": 16,
    "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
    "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 32, "box_detections_per_img": 10,
}
