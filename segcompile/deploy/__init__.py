"""Deployment: the segment-step program exported to ONNX (and built into TensorRT engines), and
one runner that serves it with onnxruntime or TensorRT (docs/design.md section 8).

    lowering             step_attention: segment_attention over fixed-size buffers, in plain torch ops
    step_module          runtime.variants.fixed_size_step with the ONNX lowering: the step graph over those buffers
    format               the file's input/output names and metadata keys; reading the metadata
    onnx_export          export_onnx: step_module -> torch.onnx -> checked file, written atomically
    tensorrt             build_engine: an engine and its JSON record from an exported file
    tensorrt_common      what the builder and the TensorRT backend share (import, errors, engine record)
    runner               SegmentRunner: state, checks, segment cutting, prefill/decode/generate
    onnxruntime_backend  OnnxSegmentedModel: the runner over onnxruntime (numpy)
    tensorrt_backend     TensorRTSegmentedModel: the runner over a TensorRT engine (torch CUDA tensors)

Deployment imports the runtime (``SegmentedModel``, its step-graph variants), never the reverse.
"""
