"""Tests for segcompile/testing/plain_decoder.py, the plain PyTorch decoder used as a compiler input."""


import pytest
import torch
from torch.export import Dim

from segcompile.testing import plain_decoder


def _ids(model, batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)


def test_config_attributes_read_by_compiler():
    model = plain_decoder.tiny_plain_decoder()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
    assert cfg.causal is True
    assert not model.training


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 4}, {"num_key_value_heads": 1}])
def test_output_shape(overrides):
    model = plain_decoder.tiny_plain_decoder(**overrides)
    with torch.no_grad():
        out = model(_ids(model, 2, 11))
    assert isinstance(out, plain_decoder.DecoderOutput)
    assert out.logits.shape == (2, 11, model.config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_same_seed_same_weights():
    a, b = plain_decoder.tiny_plain_decoder(seed=3), plain_decoder.tiny_plain_decoder(seed=3)
    ids = _ids(a, 1, 8)
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_causal_later_token_does_not_change_earlier_logits():
    model = plain_decoder.tiny_plain_decoder()
    ids = _ids(model, 2, 12)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


def test_non_causal_config_sees_later_tokens():
    model = plain_decoder.tiny_plain_decoder(causal=False)
    ids = _ids(model, 1, 12)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert (a[:, :7] - b[:, :7]).abs().max() > 1e-4


def test_default_position_ids_are_arange():
    model = plain_decoder.tiny_plain_decoder()
    ids = _ids(model, 2, 9)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).logits, model(ids, position_ids=torch.arange(9)[None]).logits, rtol=0, atol=0
        )


def test_rope_uses_position_ids():
    """RoPE depends on relative positions only: a common shift of all positions leaves the
    logits unchanged, while changing the gaps between positions changes them."""
    model = plain_decoder.tiny_plain_decoder()
    ids = _ids(model, 2, 10)
    pos = torch.arange(10)[None]
    with torch.no_grad():
        base = model(ids, position_ids=pos).logits
        shifted = model(ids, position_ids=pos + 37).logits
        gapped = model(ids, position_ids=pos * 3).logits
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    assert (gapped[:, 1:] - base[:, 1:]).abs().max() > 1e-3
    # The first token only attends to itself, so its position cannot matter.
    torch.testing.assert_close(gapped[:, 0], base[:, 0], rtol=1e-5, atol=1e-5)


def test_export_with_dynamic_shapes_matches_eager():
    model = plain_decoder.tiny_plain_decoder()
    ids = _ids(model, 2, 16)
    pos = torch.arange(16)[None]
    length = Dim("L", min=1, max=1 << 20)
    dynamic_shapes = {
        "input_ids": {0: Dim("B", min=1, max=1024), 1: length},
        "position_ids": {1: length},
    }
    ep = torch.export.export(
        model, (ids,), {"position_ids": pos}, dynamic_shapes=dynamic_shapes, strict=False
    )
    exported = ep.module()
    # (batch, length, first position): includes batch 1 / length 1, as the compiler needs.
    for batch, n, start in [(2, 16, 0), (1, 1, 0), (1, 1, 41), (3, 17, 5), (1, 64, 100)]:
        x = _ids(model, batch, n, seed=batch * 1000 + n)
        p = torch.arange(start, start + n)[None]
        out = exported(x, position_ids=p)
        assert isinstance(out, plain_decoder.DecoderOutput)
        with torch.no_grad():
            expected = model(x, position_ids=p).logits
        assert out.logits.shape == (batch, n, model.config.vocab_size)
        torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
