"""maskrt.runtime: torch-free inference (numpy, OpenCV, ONNX Runtime or TensorRT).

Never imports torch, directly or indirectly.
"""
