"""The front end: a model in, the flat ``GraphModule`` the passes rewrite out.

``capture`` traces with ``torch.export`` (non-strict, dynamic batch and length); SDPA calls are
recorded as one opaque node (``opaque_sdpa``) so that the passes see each attention site whole.
"""

from .capture import CaptureInfo, attention_through_sdpa, cache_off, capture, copy_captured, device_of, is_captured

__all__ = [
    "CaptureInfo", "attention_through_sdpa", "cache_off", "capture", "copy_captured", "device_of", "is_captured",
]
