"""Deployment: the segment-step program exported to ONNX (and built into TensorRT engines), and
one runner that serves it with onnxruntime or TensorRT."""
