"""maskrt.runtime: torch-free inference (numpy, OpenCV, ONNX Runtime or TensorRT).

Never imports torch, directly or indirectly: a Jetson installs numpy, OpenCV and a backend.

    from maskrt.runtime import Predictor, draw_detections
    predictor = Predictor("model.onnx")
    detections = predictor(bgr_image)
"""
from maskrt.runtime.draw import draw_detections
from maskrt.runtime.masks import MaskCrops, crop_to_full_mask, crop_to_rle
from maskrt.runtime.predictor import DEFAULT_CONF, Detections, Predictor

__all__ = ["DEFAULT_CONF", "Detections", "MaskCrops", "Predictor", "crop_to_full_mask", "crop_to_rle",
           "draw_detections"]
