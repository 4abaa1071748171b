"""The pass pipeline: what each pass produces, the dumps, and that the rewrite really fired."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.fx as fx
from conftest import ALL_MODELS, captured, make_model, max_abs, model_with_rope_region, random_ids

import segcompile as sc
from segcompile.frontend import copy_captured
from segcompile.frontend.plain_regions import autocast_region
from segcompile.passes import find_attention
from segcompile.runtime.variants.release_tails import release_tails
from segcompile.testing.tolerances import tolerance
from transformers.utils.generic import maybe_autocast

FP32_ATOL = tolerance(torch.float32).logits

aten = torch.ops.aten
SEGMENT_ATTENTION = torch.ops.segcompile.segment_attention.default
RELEASE_STORAGE = torch.ops.segcompile.release_storage.default
FULL_ATTENTION_OPS = {aten.scaled_dot_product_attention.default, torch.ops.segcompile.scaled_dot_product_attention.default,
                      aten.matmul.default, aten.bmm.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default}


def call_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("family,impl", ALL_MODELS)
def test_step_graph_has_one_segment_attention_per_layer(family, impl):
    seg = sc.transform(captured(family, impl, layers=4)[1], sc.SegmentConfig(16))
    targets = call_targets(seg.step_graph)
    assert targets.count(SEGMENT_ATTENTION) == 4
    assert not FULL_ATTENTION_OPS & set(targets), "a full-sequence attention op survived the rewrite"
    # what softmax is left normalises over a fixed number of things (an MoE router's experts), not positions
    assert all(isinstance(n.meta["val"].shape[n.args[1]], int) for n in softmaxes(seg.step_graph))


def softmaxes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_an_moe_routers_softmax_is_not_attention(family):
    # the router of each MoE layer normalises over its 4 experts: find_attention leaves it, where it
    # refused the whole model before ("softmax ... is not part of an attention pattern")
    gm = find_attention(copy_captured(captured(family, "eager", layers=3)[1]))
    assert [s.module for s in gm.meta["segcompile.sites"]] == [f"model.layers.{i}.self_attn" for i in range(3)]
    modules = [list(n.meta["nn_module_stack"].values())[-1][0] for n in softmaxes(gm)]
    assert modules == [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn", "mlp.gate")]


def test_find_attention_records_gqa_heads_scale_and_layers():
    gm = find_attention(copy_captured(captured("llama", "sdpa", layers=3)[1]))
    sites = gm.meta["segcompile.sites"]
    assert [s.layer for s in sites] == [0, 1, 2]
    assert [s.module for s in sites] == [f"model.layers.{i}.self_attn" for i in range(3)]
    for s in sites:
        assert (s.num_heads, s.num_kv_heads, s.head_dim) == (4, 2, 8)
        assert s.k.meta["val"].shape[1] == 2  # looked through repeat_kv
        assert s.scale == pytest.approx(8**-0.5)


def test_find_attention_eager_scale_and_kind():
    gm = find_attention(copy_captured(captured("gpt2", "eager")[1]))
    assert {s.kind for s in gm.meta["segcompile.sites"]} == {"eager"}
    assert all(s.scale == pytest.approx(8**-0.5) for s in gm.meta["segcompile.sites"])


def test_dump_dir_has_one_readable_file_per_pass(tmp_path, llama):
    sc.transform(llama[1], sc.SegmentConfig(8), dump_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    # per pass: the text dump, the visualiser's page and DOT graph (SVG too where Graphviz is installed)
    kinds = ["dot", "html", *(["svg"] if shutil.which("dot") else []), "txt"]
    stems = ["00-capture", "01-find_attention", "02-plan_heads", "03-segment_loop", "04-lower"]
    assert names == [f"{stem}.{kind}" for stem in stems for kind in kinds] + ["index.html"]
    assert "scaled_dot_product_attention" in (tmp_path / "00-capture.txt").read_text()
    lowered = (tmp_path / "04-lower.txt").read_text()
    assert lowered.count("segcompile.segment_attention") >= 2
    assert "impl = 'reference'" in lowered
    assert "state of layer 1: tail_k" in lowered


def test_parameters_are_shared_and_model_untouched():
    model = make_model("llama")
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    modules = {n: type(m) for n, m in model.named_modules()}
    seg = sc.transform(model, sc.SegmentConfig(8))
    assert {id(p) for p in seg.parameters()} == {id(p) for p, _ in before.values()}
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert not any("forward" in vars(m) for m in model.modules())  # nothing patched onto the model
    assert all(torch.equal(p, saved) for p, saved in before.values())


def test_original_forward_is_never_called(monkeypatch):
    model = make_model("llama")
    ids = random_ids(1, 20)
    cfg = sc.SegmentConfig(8, long_range=sc.HeadPlan.fraction(0.5))
    want = sc.oracle.forward(model, cfg, ids)
    seg = sc.transform(model, cfg)

    def forbidden(*args, **kwargs):
        raise AssertionError("the original module's forward ran after capture")

    for module in model.modules():
        monkeypatch.setattr(module, "forward", forbidden)
    with torch.no_grad():
        got = seg(ids).logits
        state = seg.prefill(ids[:, :10])
        seg.decode(state, ids[:, 10:11])
    assert max_abs(got, want) <= FP32_ATOL


def test_chosen_implementation_is_visible(llama):
    seg = sc.transform(llama[1], sc.SegmentConfig(8, long_range=sc.HeadPlan.layers([1])))
    assert seg.implementations == {0: "reference", 1: "reference"}
    text = repr(seg)
    assert "layer 1: model.layers.1.self_attn" in text and "impl=reference" in text
    assert "long_range_kv_heads=[0, 1]" in text
    impls = [n.kwargs["impl"] for n in seg.step_graph.graph.nodes if n.target is SEGMENT_ATTENTION]
    assert impls == ["reference", "reference"]


def test_step_graph_inputs_and_outputs_are_the_carried_state(llama):
    seg = sc.transform(llama[1], sc.SegmentConfig(8))
    placeholders = [n.name for n in seg.step_graph.graph.nodes if n.op == "placeholder"]
    assert placeholders[:2] == ["input_ids", "position_offset"]
    per_layer = ["sink_k", "sink_v", "hist_k", "hist_v", "tail_k", "tail_v", "current_k", "current_v"]
    assert placeholders[2:] == [f"layer{l}_{s}" for l in range(2) for s in per_layer]
    outputs = seg.step_graph.graph.output_node().args[0]
    assert len(outputs) == 1 + 2 * 2  # logits, then current K/V of each layer



def test_release_tails_frees_each_tail_right_after_its_layers_attention(llama):
    seg = sc.transform(llama[1], sc.SegmentConfig(8, tail_len=3))
    gm = seg.prefill_graph()
    out = release_tails(gm)
    assert RELEASE_STORAGE not in call_targets(gm)  # the graph it was given is left as it was
    assert out.meta["segcompile.released"] == [(l, name) for l in range(2) for name in ("tail_k", "tail_v")]
    nodes = list(out.graph.nodes)
    releases = out.graph.find_nodes(op="call_function", target=RELEASE_STORAGE)
    assert [n.args[0].name for n in releases] == [f"layer{l}_{name}" for l in range(2) for name in ("tail_k", "tail_v")]
    for node in releases:
        (tail,) = node.args
        reader = next(n for n in reversed(nodes[: nodes.index(node)]) if n.target is not RELEASE_STORAGE)
        assert reader.target is SEGMENT_ATTENTION and tail in reader.args, node  # right after its reader
        assert set(tail.users) == {reader, node}
    assert [n.target for n in nodes if n.target is not RELEASE_STORAGE] == [n.target for n in gm.graph.nodes]


def test_release_tails_leaves_a_tail_that_another_node_reads(llama):
    # A view of the tail could reach an output: only segment_attention's readers are known not to.
    seg = sc.transform(llama[1], sc.SegmentConfig(8, tail_len=3))
    gm = fx.GraphModule(seg.step_graph, copy.deepcopy(seg.step_graph.graph))
    gm.meta.update(seg.step_graph.meta)
    tail = next(n for n in gm.graph.nodes if n.name == "layer1_tail_k")
    output = gm.graph.output_node()
    with gm.graph.inserting_before(output):
        view = gm.graph.call_function(aten.slice.Tensor, (tail, 2, 0, 1))
    output.args = ((*output.args[0], view),)
    gm.recompile()
    assert release_tails(gm).meta["segcompile.released"] == [(0, "tail_k"), (0, "tail_v"), (1, "tail_v")]

def test_segment_attention_op_passes_opcheck():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    args = (r(2, 4, 3, 8), r(2, 2, 5, 8), r(2, 2, 5, 8), r(2, 2, 2, 8), r(2, 2, 2, 8),
            r(2, 2, 1, 8), r(2, 2, 1, 8), r(2, 1, 4, 8), r(2, 1, 4, 8))
    for t in args[:5]:
        t.requires_grad_()
    # aot_dispatch_dynamic is left out: it compiles (about 50 s on 2 cores); the rest checks the
    # schema, the fake implementation and the autograd registration against the real kernel.
    torch.library.opcheck(
        SEGMENT_ATTENTION, args, {"long_range": [1], "scale": 0.3, "impl": "reference"},
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    assert torch.autograd.gradcheck(
        lambda *a: SEGMENT_ATTENTION(*a, *args[5:], long_range=[1], scale=0.3, impl="reference"), args[:5]
    )


def test_transform_from_one_capture_twice_gives_independent_programs(llama):
    model, graph = llama
    ids = random_ids(1, 20)
    first = sc.transform(graph, sc.SegmentConfig(8, long_range=sc.HeadPlan.none()))
    second = sc.transform(graph, sc.SegmentConfig(8, long_range=sc.HeadPlan.all()))
    assert [s.long_range for s in first.sites] == [(), ()]
    with torch.no_grad():
        assert max_abs(first(ids).logits, sc.oracle.forward(model, first.cfg, ids)) <= FP32_ATOL
        assert max_abs(second(ids).logits, model(ids).logits) <= FP32_ATOL
    assert sum(n.op == "placeholder" for n in graph.graph.nodes) == 2  # the capture itself is untouched


def test_autocast_disabled_regions_survive_capture():
    # Traced without autocast, the model's autocast-disabled region vanishes from the graph, and a
    # user's bf16 autocast then runs RoPE's matmul in bf16: past position 256 the angles round
    # (seen on CUDA with transformers 5.17: SmolLM2 segmented lost a nat of loss per token).
    model = model_with_rope_region()
    seg = sc.transform(model, sc.SegmentConfig(64, long_range=sc.HeadPlan.all()))
    regions = [
        n.args[:3]
        for m in seg.step_graph.modules() if isinstance(m, torch.fx.GraphModule)
        for n in m.graph.nodes if n.target is autocast_region  # export's wrap_with_autocast, as a plain call
    ]
    assert regions == [("cpu", torch.bfloat16, False)]  # (device, dtype, enabled=False) kept
    assert maybe_autocast("cpu", enabled=False).__class__ is not torch.autocast  # transformers' helper restored
    ids = random_ids(1, 600)  # past position 512 bf16 rounds a position to a multiple of 4 (error 0.18 without the region)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(ids, use_cache=False).logits
        got = seg(ids).logits
    assert max_abs(got, want) <= tolerance(torch.bfloat16).logits
    with torch.no_grad():
        assert max_abs(seg(ids).logits, model(ids, use_cache=False).logits) <= FP32_ATOL  # and a no-op without autocast


def test_capture_refuses_a_graph_that_lost_an_autocast_region(monkeypatch):
    # Whatever loses a region (here: capture without the fix that keeps transformers' helper
    # recording it), the check under autocast far into the sequence names the problem.
    import sys
    import contextlib

    monkeypatch.setattr(sys.modules["segcompile.frontend.capture"], "regions_recorded", contextlib.nullcontext)
    model = model_with_rope_region()
    with pytest.raises(sc.CaptureError, match=r"under torch.autocast\(bfloat16\).*positions 4103\.\.4105"):
        sc.capture(model)


def test_repeat_kv_is_looked_through_with_no_op_slices():
    # torch 2.11 records k[:, :, None, :, :] with no-op slices around the unsqueeze; 2.13 does not.
    from segcompile.passes.find_attention import unrepeated

    graph = torch.fx.Graph()
    k = graph.placeholder("k")
    x = graph.call_function(aten.slice.Tensor, (k, 0, 0, 9223372036854775807))
    x = graph.call_function(aten.slice.Tensor, (x, 1, 0, 9223372036854775807))
    x = graph.call_function(aten.unsqueeze.default, (x, 2))
    x = graph.call_function(aten.slice.Tensor, (x, 3, 0, 9223372036854775807))
    x = graph.call_function(aten.expand.default, (x, [2, 2, 2, 5, 8]))
    repeated = graph.call_function(aten.reshape.default, (x, [2, 4, 5, 8]))
    assert unrepeated(repeated) is k
    partial = graph.call_function(aten.slice.Tensor, (k, 2, 1, 9223372036854775807))  # drops a key: not a no-op
    y = graph.call_function(aten.unsqueeze.default, (partial, 2))
    y = graph.call_function(aten.expand.default, (y, [2, 2, 2, 4, 8]))
    assert unrepeated(graph.call_function(aten.reshape.default, (y, [2, 4, 4, 8]))) is partial


def test_capture_check_tolerates_half_precision_rounding_but_not_a_wrong_graph():
    from segcompile.frontend.capture import outputs_agree

    want = torch.randn(2, 3, 50, dtype=torch.float64)
    rounded = want.to(torch.bfloat16)
    deep_rounding = (want + 0.02 * torch.randn_like(want)).to(torch.bfloat16)  # elementwise past 2e-2 somewhere
    assert (deep_rounding.double() - want).abs().max() > 2e-2
    assert outputs_agree(rounded, want, precise=False)[0]
    assert outputs_agree(deep_rounding, want, precise=False)[0]
    assert not outputs_agree(want.flip(1).to(torch.bfloat16), want, precise=False)[0]  # specialised to the example
    assert not outputs_agree(rounded, want, precise=True)[0]
    assert outputs_agree(want + 1e-7, want, precise=True)[0]
    assert outputs_agree(want * (1 + 2e-5), want, precise=True)[0]  # fp32 GEMMs of another algorithm, 30 layers deep
    one_row_wrong = want.clone()
    one_row_wrong[1, 2] = torch.randn(50, dtype=torch.float64)
    assert not outputs_agree(one_row_wrong, want, precise=True)[0]
    assert not outputs_agree(want[:, :2], want, precise=False)[0]
