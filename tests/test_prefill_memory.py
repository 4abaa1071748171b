"""What a prefill keeps alive: the sinks hold their G entries only, and each layer's old tail is
freed once its layer has read it (passes/release_tails.py), with results equal to the bit to a
prefill that frees nothing."""

from __future__ import annotations

import torch
from conftest import random_ids

import segcompile as sc

S = 8


def test_sinks_keep_only_their_entries_alive(llama):
    # A slice of the concatenation of the sinks and a whole segment would keep the segment alive.
    seg = sc.transform(llama[1], sc.SegmentConfig(S, tail_len=3, sink_tokens=2, long_range=sc.HeadPlan.none()))
    with torch.no_grad():
        state = seg.prefill(random_ids(2, 3 * S + 1))
    for layer in state.layers:
        for sinks in (layer.sink_k, layer.sink_v):
            assert sinks.shape[2] == 2
            assert sinks.untyped_storage().nbytes() == sinks.numel() * sinks.element_size()
