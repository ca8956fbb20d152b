"""maskrt.export: ONNX export (portable and TensorRT targets), precision, TensorRT engine build."""
