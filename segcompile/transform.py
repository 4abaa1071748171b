"""``segcompile.transform``: capture a model and run the pass pipeline."""

from __future__ import annotations

import os

import torch
import torch.fx as fx

from .config import SegmentConfig
from .errors import ConfigError
from .runtime.wrapping import check_not_wrapped
from .frontend import capture, copy_captured, is_captured
from .passes import PASSES, PassManager
from .runtime import SegmentedModel
from . import ir


def transform(
    model: torch.nn.Module | fx.GraphModule,
    cfg: SegmentConfig | None = None,
    *,
    dump_dir: str | os.PathLike | None = None,
    implementation: str = "auto",
) -> SegmentedModel:
    """Rewrite ``model`` into a segment-loop program (docs/design.md section 2).

    ``model`` is the model, or a graph ``segcompile.capture(model)`` returned (to capture once and
    compile several configs). ``dump_dir``: write the graph after every pass there (``00-capture.txt``, ``01-find_attention.txt``...).
    ``implementation``: the kernel every attention site runs: ``"auto"`` (segcompile's Triton
    kernels on CUDA, the PyTorch reference elsewhere), ``"triton"`` or ``"reference"``.
    The model itself is not modified; the returned module shares its parameters. The program
    runs on the device the model was on when it was captured: move the model first. A model
    wrapped by FSDP or DDP is refused: wrap the result instead (``segcompile.distributed``).
    A model in training mode with active dropout is refused (``CaptureError``): the traced graph
    would keep dropout on for good, whatever ``seg.train()``/``seg.eval()`` say; call
    ``model.eval()`` first (the program then runs without dropout, in training too).
    """
    check_not_wrapped(model)
    cfg = cfg if cfg is not None else SegmentConfig(segment_len=2048)
    if not isinstance(cfg, SegmentConfig):
        raise ConfigError(
            f"transform takes a SegmentConfig as cfg, got {type(cfg).__name__} {cfg!r:.40}; "
            "for example sc.SegmentConfig(segment_len=2048)"
        )
    gm = copy_captured(model) if is_captured(model) else capture(model)
    gm.meta[ir.CONFIG] = cfg
    gm.meta[ir.IMPLEMENTATION] = implementation
    gm = PassManager(PASSES, dump_dir=dump_dir)(gm)
    return SegmentedModel(gm, cfg)
