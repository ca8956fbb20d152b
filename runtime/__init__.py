"""maskrt.runtime: torch-free inference (numpy, OpenCV, ONNX Runtime or TensorRT).

Never imports torch, directly or indirectly: a Jetson installs numpy, OpenCV and a backend.

    from maskrt.runtime import Predictor, draw_detections
    predictor = Predictor("model.onnx")
    detections = predictor(bgr_image)
"""
from maskrt.runtime.draw import draw_detections
from maskrt.runtime.predictor import DEFAULT_CONF, Detections, Predictor

__all__ = ["DEFAULT_CONF", "Detections", "Predictor", "draw_detections"]
