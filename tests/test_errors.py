"""Bad input gets a clear segcompile error, never a silent wrong answer.

Every case checks the exception type (a ``SegcompileError`` subclass) and its message: the key
facts (layer index, module path, op or node, the offending value) and the fix hint, and that the
message is a short readable sentence (no traceback inside it).
"""

from __future__ import annotations

import contextlib
import json
import re

import pytest
import torch
import transformers
from conftest import VOCAB, random_ids
from segcompile.testing.plain_decoder import tiny_plain_decoder
from torch import nn

import segcompile as sc
from segcompile.plan import PLAN_FORMAT, PLAN_VERSION, model_fingerprint

TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


@contextlib.contextmanager
def raises(exc_type, match, *more):
    """``pytest.raises(exc_type, match=match)``, plus every regex in ``more``, plus readability."""
    with pytest.raises(exc_type, match=match) as info:
        yield info
    assert isinstance(info.value, sc.SegcompileError)
    msg = str(info.value)
    for pattern in more:
        assert re.search(pattern, msg), f"{pattern!r} not in message: {msg}"
    assert len(msg) < 600, f"message too long ({len(msg)} chars): {msg}"
    assert "\n" not in msg.strip() and "Traceback" not in msg, f"message is not a plain sentence: {msg}"


def cfg(**kw):
    kw.setdefault("segment_len", 4)
    kw.setdefault("long_range", sc.HeadPlan.all())
    return sc.SegmentConfig(**kw)


# ---- SegmentConfig --------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -3])
def test_segment_len_not_positive(value):
    with raises(sc.ConfigError, rf"segment_len must be a positive int, got {value}"):
        sc.SegmentConfig(segment_len=value)


@pytest.mark.parametrize(
    "value",
    [
        2.5,
        "4",
        None,
        True,
    ],
)
def test_segment_len_not_int(value):
    with raises(sc.ConfigError, r"segment_len must be a positive int", re.escape(repr(value))):
        sc.SegmentConfig(segment_len=value)


@pytest.mark.parametrize("tail", [5, 100, -1])
def test_tail_len_out_of_range(tail):
    with raises(sc.ConfigError, rf"tail_len must be an int in \[0, segment_len=4\], got {tail}", r"use tail_len <= segment_len"):
        sc.SegmentConfig(segment_len=4, tail_len=tail)


def test_negative_sinks():
    with raises(sc.ConfigError, r"sink_tokens must be an int >= 0, got -1"):
        sc.SegmentConfig(segment_len=4, sink_tokens=-1)


def test_negative_tbptt_k():
    with raises(sc.ConfigError, r"tbptt_k must be an int >= 0, got -2"):
        sc.SegmentConfig(segment_len=4, tbptt_k=-2)


def test_long_range_not_a_plan():
    with raises(sc.ConfigError, r"long_range must be a HeadPlan", r"HeadPlan\.fraction\(0\.25\)", r"got float"):
        sc.SegmentConfig(segment_len=4, long_range=0.25)


def test_config_errors_are_value_errors():
    # ConfigError / PlanError also subclass ValueError, so generic callers can catch them.
    assert issubclass(sc.ConfigError, ValueError) and issubclass(sc.PlanError, ValueError)


# ---- HeadPlan construction ------------------------------------------------------------------
@pytest.mark.parametrize("f", [1.5, -0.1, float("nan"), "0.5", True])
def test_fraction_out_of_range(f):
    with raises(sc.PlanError, r"HeadPlan\.fraction needs 0 <= f <= 1", re.escape(repr(f))):
        sc.HeadPlan.fraction(f)


@pytest.mark.parametrize(
    "make, what",
    [
        (lambda: sc.HeadPlan.layers([-1]), "layer"),
        (lambda: sc.HeadPlan.from_dict({-1: [0]}), "layer"),
        (lambda: sc.HeadPlan.from_dict({0: [-2]}), "KV head"),
        (lambda: sc.HeadPlan.from_dict({0: [1.5]}), "KV head"),
        (lambda: sc.HeadPlan.layers(["x"]), "layer"),
    ],
)
def test_plan_bad_indices(make, what):
    with raises(sc.PlanError, rf"{what} index must be a(n| non-negative) int"):
        make()


def test_plan_naming_a_layer_twice_is_refused():
    # {1: ..., "1": ...} (a plan edited by hand, or merged from JSON): one entry would replace the other
    with raises(sc.PlanError, "layer 1 twice"):
        sc.HeadPlan.from_dict({1: [0], "1": [1]})


@pytest.mark.parametrize(
    "make",
    [lambda: sc.HeadPlan.layers(3), lambda: sc.HeadPlan.from_dict([0, 1]), lambda: sc.HeadPlan.from_dict({0: 1})],
    ids=["layers-int", "from_dict-list", "from_dict-heads-int"],
)
def test_plan_bad_argument_types(make):
    with raises(sc.PlanError, r"(layers|from_dict) (needs|takes)"):
        make()


# ---- HeadPlan against a model (raised by sc.transform) ---------------------------------------
def test_plan_unknown_layer(llama):
    _, graph = llama  # transform of a captured graph runs the same passes, without re-tracing
    with raises(sc.PlanError, r"layer 5", r"2 attention layers", r"\(0\.\.1\)"):
        sc.transform(graph, cfg(long_range=sc.HeadPlan.from_dict({5: [0]})))


def test_plan_unknown_kv_head(llama):
    _, graph = llama
    with raises(sc.PlanError, r"KV head 7 of layer 0", r"has 2 KV heads", r"\(0\.\.1\)"):
        sc.transform(graph, cfg(long_range=sc.HeadPlan.from_dict({0: [7]})))


def test_plan_layers_unknown_layer(llama):
    _, graph = llama
    with raises(sc.PlanError, r"layer 9", r"2 attention layers \(0\.\.1\)"):
        sc.transform(graph, cfg(long_range=sc.HeadPlan.layers([9])))


def test_plan_for_another_model(llama, tmp_path):
    path = tmp_path / "other.json"
    sc.HeadPlan.from_dict({0: [0]}, fingerprint=model_fingerprint("OtherModel", [2, 2])).save(path)
    plan = sc.HeadPlan.load(path)
    with raises(sc.PlanError, r"made for .*OtherModel", r"model is .*LlamaForCausalLM", r"make a plan for this model"):
        sc.transform(llama[1], cfg(long_range=plan))
    with raises(sc.PlanError, r"made for .*OtherModel", r"model is .*LlamaForCausalLM"):
        sc.transform(llama[0], cfg(long_range=plan))  # the model itself, captured afresh: same refusal


def _write(tmp_path, obj):
    path = tmp_path / "plan.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("{not json", r"is not valid JSON"),
        ({"hello": 1}, r"is not a segcompile head plan \(format=None\)"),
        ({"format": "something.else", "version": 1}, r"is not a segcompile head plan"),
        ({"format": PLAN_FORMAT, "version": 99, "kind": "all"}, rf"plan version 99; this segcompile reads version {PLAN_VERSION}"),
        ({"format": PLAN_FORMAT, "version": PLAN_VERSION, "kind": "magic"}, r"unknown plan kind 'magic'"),
    ],
    ids=["not-json", "no-format", "other-format", "wrong-version", "unknown-kind"],
)
def test_plan_file_not_a_plan(tmp_path, content, pattern):
    path = _write(tmp_path, content)
    with raises(sc.PlanError, pattern, re.escape(str(path))):
        sc.HeadPlan.load(path)


@pytest.mark.parametrize(
    "content",
    [
        [1, 2],
        {"format": PLAN_FORMAT, "version": PLAN_VERSION, "kind": "fraction"},
        {"format": PLAN_FORMAT, "version": PLAN_VERSION, "kind": "layers"},
        {"format": PLAN_FORMAT, "version": PLAN_VERSION, "kind": "explicit", "long_range": [[0]]},
        {"format": PLAN_FORMAT, "version": PLAN_VERSION, "kind": "explicit", "long_range": {"0": 1}},
        {"format": PLAN_FORMAT, "version": PLAN_VERSION, "kind": "all", "model": [1]},
    ],
    ids=["json-list", "fraction-missing", "layers-missing", "long_range-list", "heads-not-list", "model-not-dict"],
)
def test_plan_file_malformed(tmp_path, content):
    path = _write(tmp_path, content)
    with raises(sc.PlanError, re.escape(str(path))):
        sc.HeadPlan.load(path)


# ---- non-causal / unsupported attention -------------------------------------------------------
def test_plain_decoder_not_causal():
    with raises(
        sc.UnsupportedAttentionError, r"layer 0 \(`layers\.0\.self_attn`, Attention\)", r"not causal", r"causal decoders"
    ):
        sc.transform(tiny_plain_decoder(causal=False, num_hidden_layers=1), cfg())


def test_bert_encoder():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )
    model = transformers.BertForMaskedLM(config).eval()
    with raises(
        sc.UnsupportedAttentionError,
        r"layer 0 \(`bert\.encoder\.layer\.0\.attention\.self`, BertSelfAttention\)",
        r"not the causal mask",
        r"only rewrites causal full attention",
    ):
        sc.transform(model, cfg())


def test_sliding_window_config():
    config = transformers.MistralConfig(**TINY, num_hidden_layers=2, sliding_window=4)
    model = transformers.MistralForCausalLM(config).eval()
    with raises(
        sc.UnsupportedAttentionError,
        r"MistralForCausalLM: layers \[0, 1\] use sliding-window attention",
        r"sliding_window=4",
        r"set config\.sliding_window=None",
    ):
        sc.transform(model, cfg())


def test_layers_that_mix_positions_without_attention():
    # a hybrid model (LFM2: a convolution layer, then attention) is refused as what it is, not as
    # sliding-window attention: a segment loop would cut the convolution's state at segment ends
    config = transformers.Lfm2Config(**TINY, num_hidden_layers=2, layer_types=["conv", "full_attention"], pad_token_id=0)
    model = transformers.Lfm2ForCausalLM(config).eval()
    with raises(
        sc.UnsupportedAttentionError,
        r"Lfm2ForCausalLM: layers \[0\] are \['conv'\] layers",
        r"not full attention alone",
        r"cut at every segment end",
    ) as info:
        sc.transform(model, cfg())
    assert "sliding" not in str(info.value)


def test_a_traced_graph_that_fails_at_another_length_is_a_capture_error():
    # DeepSeek-V3's attention (MLA) traces, but the graph fails at the check's other lengths: a
    # CaptureError that says where and why, never the bare RuntimeError of the graph
    config = transformers.DeepseekV3Config(
        **TINY, num_hidden_layers=2, pad_token_id=0, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
        n_group=1, topk_group=1,
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    try:
        seg = sc.transform(model, cfg())
    except sc.SegcompileError as e:  # what transformers 5.25 gives; a later one may trace it right
        assert isinstance(e, sc.CaptureError) and re.search(r"DeepseekV3ForCausalLM fails at batch \d+, length \d+", str(e))
        return
    ids = random_ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(seg(ids).logits, sc.oracle.forward(model, seg.cfg, ids), rtol=1e-4, atol=1e-4)


def test_oracle_names_a_model_whose_attention_it_cannot_reach():
    # the oracle applies its masks inside F.scaled_dot_product_attention; Bloom's attention is its own
    # code (transformers has no SDPA for it), so the oracle says so instead of "saw 0 attention calls"
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_head=4, n_layer=2)
    model = transformers.BloomForCausalLM(config).eval()
    with raises(
        sc.SegcompileError,
        r"oracle: BloomForCausalLM made no F\.scaled_dot_product_attention call",
        r"could not be switched to SDPA",
    ):
        sc.oracle.forward(model, cfg(), random_ids(1, 10))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_dropout_in_training_mode(impl):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, num_hidden_layers=1, attention_dropout=0.1, attn_implementation=impl)
    model = transformers.LlamaForCausalLM(config).train()
    with raises(
        sc.UnsupportedAttentionError,
        r"layer 0 \(`model\.layers\.0\.self_attn`, LlamaAttention\)",
        r"dropout p=0\.1",
        r"eval",
    ):
        sc.transform(model, cfg())


# Small hand-written decoders: embedding -> blocks -> lm_head, forward(input_ids, position_ids=None).
class TinyAttention(nn.Module):
    """Eager attention; ``variant`` picks what happens around the softmax."""

    def __init__(self, variant: str, dim: int = 32, heads: int = 4):
        super().__init__()
        self.variant, self.heads, self.head_dim = variant, heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.register_buffer("slopes", 2.0 ** -torch.arange(1, heads + 1, dtype=torch.float32), persistent=False)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = (p(x).view(B, L, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        mask = torch.full((L, L), float("-inf"), device=x.device).triu(1)
        if self.variant == "alibi":  # additive ALiBi bias folded into the causal mask
            pos = torch.arange(L, device=x.device)
            mask = mask + self.slopes[:, None, None] * (pos[None, :] - pos[:, None]).float()
        if self.variant == "in_place":  # Falcon's eager attention (transformers 5.17): scale and mask in place
            scores = q @ k.transpose(-1, -2)
            scores /= self.head_dim**0.5
            scores += mask
        else:
            scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5 + mask
        if self.variant == "softmax_dim":
            y = torch.softmax(scores, dim=-2) @ v
        elif self.variant == "einsum":
            y = torch.einsum("bhij,bhjd->bhid", torch.softmax(scores, dim=-1), v)
        else:
            y = torch.softmax(scores, dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    def __init__(self, variant: str, dim: int = 32):
        super().__init__()
        self.attn = TinyAttention(variant, dim) if variant != "mlp_only" else None
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        if self.attn is not None:
            x = x + self.attn(x)
        return x + self.mlp(x)


class BranchyBlock(Block):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: cannot be traced
            x = x * 2
        return super().forward(x)


class TinyLM(nn.Module):
    def __init__(self, variant: str = "ok", layers: int = 1, dim: int = 32, block=Block):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(64, dim)
        self.blocks = nn.ModuleList(block(variant, dim) for _ in range(layers))
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.eval()

    def forward(self, input_ids, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.embed(input_ids) + self.pos(position_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class NoPositionsLM(TinyLM):
    def forward(self, input_ids):
        return super().forward(input_ids)


@pytest.mark.parametrize("variant", ["ok", "in_place"])
def test_custom_eager_decoder_is_accepted(variant):
    # Control: the hand-written causal eager pattern compiles, so the refusals below are about the
    # variant; its scale and mask may also be applied in place
    model = TinyLM(variant)
    seg = sc.transform(model, cfg())
    ids = random_ids(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(seg(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["softmax_dim", "einsum"])
def test_unrecognised_attention_pattern(variant):
    with raises(
        sc.UnsupportedAttentionError,
        r"layer 0 \(`blocks\.0\.attn`, TinyAttention\)",
        r"softmax node `\w+` is not part of an attention pattern",
        r"use attn_implementation='sdpa' or F\.scaled_dot_product_attention",
    ):
        sc.transform(TinyLM(variant), cfg())


def test_alibi_bias_in_mask():
    with raises(
        sc.UnsupportedAttentionError, r"layer 0 \(`blocks\.0\.attn`, TinyAttention\)", r"carries a bias \(e\.g\. ALiBi\)"
    ):
        sc.transform(TinyLM("alibi"), cfg())


def test_no_attention_at_all():
    with raises(sc.UnsupportedAttentionError, r"no attention found in TinyLM", r"scaled_dot_product_attention"):
        sc.transform(TinyLM("mlp_only"), cfg())


# ---- capture ----------------------------------------------------------------------------------
def test_forward_without_position_ids():
    with raises(sc.CaptureError, r"NoPositionsLM\.forward has no `position_ids` argument", r"add `position_ids=None`"):
        sc.transform(NoPositionsLM(), cfg())


def test_untraceable_control_flow_names_module():
    model = TinyLM("ok", layers=2, block=BranchyBlock)
    with raises(
        sc.CaptureError,
        r"could not trace TinyLM",
        r"module `blocks\.0` \(BranchyBlock\)",
        r"test_errors\.py:\d+",
        r"torch\.where/torch\.cond",
    ) as info:
        sc.transform(model, cfg())
    assert info.value.__cause__ is not None  # the original tracing error stays reachable


# ---- runtime input errors -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg(llama, tmp_path_factory):
    # Also the positive control for plan fingerprints: a plan made for this model loads and applies.
    path = tmp_path_factory.mktemp("plan") / "llama.json"
    sc.HeadPlan.from_dict({0: [1]}, fingerprint=model_fingerprint("LlamaForCausalLM", [2, 2])).save(path)
    return sc.transform(llama[1], cfg(long_range=sc.HeadPlan.load(path)))


def test_plan_with_matching_fingerprint_applies(seg):
    assert [s.long_range for s in seg.sites] == [(1,), ()]


BAD_IDS = {
    "1d": (random_ids(2, 6)[0], r"input_ids must be an integer tensor \[batch, tokens\], got .*\b6\b"),
    "3d": (random_ids(2, 6)[None], r"input_ids must be an integer tensor \[batch, tokens\]"),
    "empty": (random_ids(2, 6)[:, :0], r"input_ids has no tokens"),
    "list": ([[1, 2, 3]], r"input_ids must be an integer tensor \[batch, tokens\]"),
}


@pytest.mark.parametrize(
    "method, ids, pattern",
    [
        pytest.param(method, *BAD_IDS[name], id=f"{method}-{name}")
        for method in ("forward", "prefill")
        for name in BAD_IDS
    ],
)
def test_bad_input_ids(seg, method, ids, pattern):
    call = seg if method == "forward" else seg.prefill
    with raises(sc.SegcompileError, pattern):
        call(ids)


def test_float_input_ids_names_dtype(seg):
    with raises(sc.SegcompileError, r"input_ids must be an integer tensor", r"torch\.float32"):
        seg(random_ids(2, 6).float())


def test_float_input_ids(seg):
    with raises(sc.SegcompileError, r"input_ids must be an integer tensor \[batch, tokens\]"):
        seg(random_ids(2, 6).float())


def test_extra_kwargs(seg):
    ids = random_ids(2, 6)
    with raises(sc.SegcompileError, r"takes only input_ids; got \['attention_mask'\]", r"padding is not supported"):
        seg(ids, attention_mask=torch.ones_like(ids))


def test_decode_batch_mismatch(seg):
    state = seg.prefill(random_ids(2, 6))
    with raises(sc.SegcompileError, r"decode: batch size 1 does not match the state's 2"):
        seg.decode(state, random_ids(1, 1))


@pytest.mark.parametrize(
    "next_ids",
    [random_ids(2, 1)[:, 0], random_ids(2, 1).float(), random_ids(2, 1)[:, :0]],
    ids=["1d", "float", "empty"],
)
def test_decode_bad_ids(seg, next_ids):
    state = seg.prefill(random_ids(2, 6))
    with raises(sc.SegcompileError, r"input_ids (must be an integer tensor|has no tokens)"):
        seg.decode(state, next_ids)


def test_decode_non_tensor_ids(seg):
    state = seg.prefill(random_ids(2, 6))
    with raises(sc.SegcompileError, r"input_ids must be an integer tensor"):
        seg.decode(state, [[1], [2]])


def test_input_on_another_device(seg):
    ids = random_ids(2, 6).to("meta")
    with raises(sc.SegcompileError, r"input_ids are on meta but LlamaForCausalLM was captured on cpu", r"move the model first"):
        seg(ids)


# ---- dropout outside attention, active at capture ----------------------------------------------------
def gpt2_with_dropout(p: float):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=p, embd_pdrop=p, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("entry", ["transform", "capture"])
def test_active_dropout_in_training_mode(entry):
    # Captured in training mode, GPT-2's residual and embedding dropout would stay in the step graph:
    # applied on every call, even after model.eval(); seg.eval().
    model = gpt2_with_dropout(0.5).train()
    with raises(
        sc.CaptureError,
        r"GPT2LMHeadModel is in training mode with active dropout in `transformer\.drop` \(Dropout, p=0\.5\)",
        r"`transformer\.h\.0\.attn\.resid_dropout` \(Dropout, p=0\.5\)",
        r"Call model\.eval\(\) first",
    ):
        sc.transform(model, cfg()) if entry == "transform" else sc.capture(model)


def test_inactive_dropout_is_accepted():
    # Control: the same model in eval mode, and in training mode with p = 0, compiles to the model's output.
    ids = random_ids(1, 10)
    for model in (gpt2_with_dropout(0.5).eval(), gpt2_with_dropout(0.0).train()):
        seg = sc.transform(model, cfg())
        with torch.no_grad():
            torch.testing.assert_close(seg(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


# ---- ids outside the vocabulary, other integer dtypes, bad labels ----------------------------------------
def call_with_ids(seg, llama, method: str, ids: torch.Tensor):
    """Feed ``ids`` through one entry point (decode after a valid prefill)."""
    model = llama[0]
    if method == "forward":
        return seg(ids)
    if method == "prefill":
        return seg.prefill(ids)
    if method == "prefill-state":
        return seg.prefill(ids, state=seg.prefill(random_ids(ids.shape[0], 3)))
    if method == "decode":
        return seg.decode(seg.prefill(random_ids(ids.shape[0], 3)), ids)
    if method == "generate":
        return seg.generate(ids, 2)
    if method == "tbptt_backward":
        return seg.tbptt_backward(ids)
    if method == "oracle.forward":
        return sc.oracle.forward(model, cfg(), ids)
    return sc.oracle.gradients(model, cfg(), ids, random_ids(*ids.shape))


ENTRY_POINTS = ["forward", "prefill", "prefill-state", "decode", "generate", "tbptt_backward", "oracle.forward",
                "oracle.gradients"]


@pytest.mark.parametrize("method", ENTRY_POINTS)
@pytest.mark.parametrize("bad, shown", [(VOCAB, rf"max {VOCAB}"), (-1, r"min -1")], ids=["too-large", "negative"])
def test_ids_outside_the_vocabulary(seg, llama, method, bad, shown):
    ids = random_ids(2, 6)
    ids[1, 4] = bad
    with raises(
        sc.SegcompileError,
        rf"input_ids hold ids outside the vocabulary of LlamaForCausalLM \(ids 0\.\.{VOCAB - 1}\)",
        shown,
        rf"the first at \[1, 4\] is {bad}",
        r"use the tokenizer made for this model",
    ) as info:
        with torch.no_grad() if method not in ("tbptt_backward", "oracle.gradients") else contextlib.nullcontext():
            call_with_ids(seg, llama, method, ids)
    assert isinstance(info.value, sc.errors.InputError)


@pytest.mark.parametrize("method", ["forward", "decode", "tbptt_backward", "oracle.forward"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_ids_of_any_integer_dtype_mean_the_same_tokens(seg, llama, method, dtype):
    ids = random_ids(2, 6)
    with torch.no_grad() if method != "tbptt_backward" else contextlib.nullcontext():
        want = call_with_ids(seg, llama, method, ids)
        seg.zero_grad(set_to_none=True)
        got = call_with_ids(seg, llama, method, ids.to(dtype))
        seg.zero_grad(set_to_none=True)
    got, want = (x[0] if isinstance(x, tuple) else x for x in (got, want))  # decode: (logits, state)
    torch.testing.assert_close(getattr(got, "logits", got), getattr(want, "logits", want), rtol=0, atol=0)


def test_empty_batch(seg):
    with raises(sc.SegcompileError, r"input_ids has no rows \(shape \(0, 4\)\)"):
        seg(random_ids(1, 4)[:0])


@pytest.mark.parametrize("where", ["seg", "oracle"])
@pytest.mark.parametrize(
    "value, pattern",
    [(VOCAB, rf"labels hold values outside the {VOCAB} classes of LlamaForCausalLM's logits: min \d+, max {VOCAB}"),
     (-5, r"labels hold values outside .* min -5, max \d+ \(besides -100\), the first at \[0, 2\] is -5")],
    ids=["too-large", "negative"],
)
def test_labels_outside_the_classes(seg, llama, where, value, pattern):
    ids = random_ids(2, 6)
    labels = ids.clone()
    labels[:, 0] = -100  # ignored positions are fine
    labels[0, 2] = value
    with raises(sc.SegcompileError, pattern, r"token ids, or -100 for a position without loss"):
        if where == "seg":
            seg.tbptt_backward(ids, labels)
        else:
            sc.oracle.gradients(llama[0], cfg(), ids, labels)
    assert all(p.grad is None for p in seg.parameters())  # refused before any gradient


@pytest.mark.parametrize("where", ["seg", "oracle"])
def test_float_labels(seg, llama, where):
    ids = random_ids(2, 6)
    with raises(sc.SegcompileError, r"labels must be an integer tensor of token ids \(-100 to ignore a position\), "
                                    r"got torch\.float32"):
        if where == "seg":
            seg.tbptt_backward(ids, ids.float())
        else:
            sc.oracle.gradients(llama[0], cfg(), ids, ids.float())


def test_labels_of_another_integer_dtype_are_accepted(seg):
    ids = random_ids(2, 6)
    want = seg.tbptt_backward(ids, ids)
    seg.zero_grad(set_to_none=True)
    got = seg.tbptt_backward(ids, ids.to(torch.int32))
    seg.zero_grad(set_to_none=True)
    assert torch.equal(got, want)


def test_generate_pad_outside_the_vocabulary(seg):
    with raises(sc.SegcompileError, rf"generate: pad token {VOCAB} is outside the model's vocabulary", r"pad_token_id"):
        seg.generate(random_ids(2, 4), 3, pad_token_id=VOCAB)


def test_generate_checks_the_prompt_even_without_new_tokens(seg):
    ids = random_ids(2, 4)
    ids[0, 0] = VOCAB
    with raises(sc.SegcompileError, r"input_ids hold ids outside the vocabulary"):
        seg.generate(ids, 0)


@pytest.mark.parametrize("config", [8, "not a config", {"segment_len": 8}])
def test_transform_config_not_a_segment_config(llama, config):
    with raises(sc.ConfigError, r"transform takes a SegmentConfig as cfg, got (int|str|dict)", r"sc\.SegmentConfig\("):
        sc.transform(llama[1], config)
