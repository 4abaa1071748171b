"""FSDP2 sharded per layer (``sc.distributed.fsdp``'s default) on the CPU: gloo, 2 and 4 processes.

A tiny Llama of 3 layers. The gradients of one ``tbptt_backward`` per rank equal the single-process
gradients of the global batch for ``tbptt_k`` 0, 1 and 2 (fp32, max over parameters of max|g -
g_ref| / max|g_ref| <= 1e-5; measured ~3e-7), reducing once per sequence and once per backward pass.
``record_gathered_bytes`` shows at most two layers gathered at any point of a sequence (one in
forward; in backward the layer running and the next one, which FSDP2 prefetches) besides the root
unit (embeddings, norm, head), every unsharded gradient alive until the one reduction of a sequence
but at most the root's and two layers' when reducing after each backward pass, and nothing after the
sequence. The communication per sequence is the count ``segcompile/runtime/distributed.py`` gives; a
sequence that fails half-way leaves nothing to the next one; forward, prefill and decode after
wrapping equal the unwrapped program's. ``layer_units`` itself is checked in one process: the cut
graph computes the same logits bit for bit, keeps the parameter names, and refuses graphs it cannot
cut. One spawn per world size (4 ranks: K 0, 1 and 2 reduced per sequence only), ~45 s in all.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import captured, make_model, random_ids
from safetensors.torch import load_file, save_file
from test_distributed import GLOBAL_BATCH, N, REL_TOL, S, counting_collectives, full_tensor, global_batch, spawn

import segcompile as sc
from segcompile.errors import SegcompileError
from segcompile.runtime.distributed import record_gathered_bytes
from segcompile.runtime.variants.layer_units import layer_units
from segcompile.testing.tolerances import tolerance

DEPTHS = (0, 1, 2)
LAYERS = 3  # more than two: "at most two layers gathered" must be able to fail
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
SEGMENTS = -(-N // S)


def config(k: int) -> sc.SegmentConfig:
    return sc.SegmentConfig(S, tail_len=S // 2, sink_tokens=1, long_range=sc.HeadPlan.fraction(0.5), tbptt_k=k)


# ---- what each rank runs ------------------------------------------------------------------------
def _worker(rank: int, out: str, world: int) -> None:
    out = Path(out)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        graph = sc.capture(make_model("llama", layers=LAYERS))  # seeded: the same weights on every rank
        rows = GLOBAL_BATCH // world
        ids = global_batch()[rank * rows : (rank + 1) * rows]
        results = {}
        # 4 ranks run the same code on fewer configurations: the test file stays under a minute
        runs = [(k, "sequence") for k in DEPTHS] + [(2, "backward")] * (world == 2)
        for k, reduce_every in runs:
            seg = sc.distributed.fsdp(sc.transform(graph, config(k)), reduce_every=reduce_every)
            with counting_collectives() as counts, record_gathered_bytes(seg) as samples:
                seg.tbptt_backward(ids)
            name = f"k{k}_{reduce_every}"
            results[name] = {**counts, "samples": samples, "layers": seg.gradient_sync.layers}
            grads = {n: full_tensor(p.grad) for n, p in seg.named_parameters()}
            if rank == 0:
                save_file(grads, str(out / f"{name}.safetensors"))
        if world == 2:
            results["inference"] = _inference_after_wrapping(graph, ids)
            grads = _gradients_after_a_failed_sequence(graph, ids)
            results["k2_after_failure"] = {}
            if rank == 0:
                save_file(grads, str(out / "k2_after_failure.safetensors"))
        if rank == 0:
            (out / "results.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _inference_after_wrapping(graph, ids) -> dict:
    """forward, prefill and decode under per-layer FSDP2 against the unwrapped program: the largest
    logits difference of each, and the parameter names after them."""
    plain = sc.transform(graph, config(2))
    seg = sc.distributed.fsdp(sc.transform(graph, config(2)))
    with torch.no_grad():
        state, plain_state = seg.prefill(ids), plain.prefill(ids)
        got = [seg(ids).logits, state.logits, seg.decode(state, ids[:, :1])[0]]
        want = [plain(ids).logits, plain_state.logits, plain.decode(plain_state, ids[:, :1])[0]]
    return {"differences": [(g - w).abs().max().item() for g, w in zip(got, want)],
            "names": [n for n, _ in seg.named_parameters()], "plain_names": [n for n, _ in plain.named_parameters()]}


class _Interrupted(Exception):
    pass


def _gradients_after_a_failed_sequence(graph, ids) -> dict[str, torch.Tensor]:
    """A sequence that fails after 3 of its segments (gradients accumulated, layers gathered and
    freed), then a whole one: the gradients of the whole one alone."""
    seg = sc.distributed.fsdp(sc.transform(graph, config(2)))
    segments = seg.segments

    def failing(*args, **kwargs):
        for i, run in enumerate(segments(*args, **kwargs)):
            if i == 3:
                raise _Interrupted
            yield run

    seg.segments = failing
    try:
        seg.tbptt_backward(ids)
    except _Interrupted:
        pass
    del seg.segments  # the method again
    seg.tbptt_backward(ids)
    return {n: full_tensor(p.grad) for n, p in seg.named_parameters()}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}-ranks")
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"layers{request.param}")
    spawn(_worker, out, world=request.param, args=(request.param,))
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def reference():
    """Per tbptt_k: the single-process gradients of the global batch, named as the wrapped program's."""
    model, graph = captured("llama", layers=LAYERS)
    grads = {}
    for k in DEPTHS:
        model.zero_grad(set_to_none=True)
        sc.transform(graph, config(k)).tbptt_backward(global_batch())
        grads[k] = {"step_graph." + name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, {name: p.numel() * p.element_size() for name, p in model.named_parameters()}


# ---- the tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k,reduce_every", [(k, "sequence") for k in DEPTHS] + [(2, "backward"), (2, "after_failure")])
def test_gradients_equal_single_process_on_the_global_batch(run, reference, k, reduce_every):
    out, results = run
    if f"k{k}_{reduce_every}" not in results:
        pytest.skip("run on 2 ranks only")
    got = load_file(str(out / f"k{k}_{reduce_every}.safetensors"))
    want = reference[0][k]
    assert got.keys() == want.keys()  # the cut keeps every parameter's name
    errors = {name: ((got[name] - want[name]).abs().max() / want[name].abs().max()).item() for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= REL_TOL, f"k={k} {reduce_every}: {worst} relative error {errors[worst]:.2e}"


@pytest.mark.parametrize("name", [f"k{k}_sequence" for k in DEPTHS] + ["k2_backward"])
def test_at_most_two_layers_are_gathered_at_once(run, reference, name):
    _, results = run
    if name not in results:
        pytest.skip("run on 2 ranks only")
    layers = results[name]["layers"]
    assert layers == [f"model.layers.{i}" for i in range(LAYERS)]
    layer_bytes, root_bytes = _unit_bytes(reference[1], layers)
    gathered = [sample["gathered"] for sample in results[name]["samples"]]
    peak = max(sum(held for unit, held in sample.items() if unit) for sample in gathered)
    # every layer is seen gathered (the hook sees the gathering at all), never more than two at once
    assert {unit for sample in gathered for unit, held in sample.items() if unit and held} == set(layers)
    assert peak <= 2 * layer_bytes, f"{peak} B of layers gathered at once"
    assert max(sample[""] for sample in gathered) == root_bytes  # the root unit, gathered for the sequence
    assert results[name]["samples"][-1] == {"gathered": dict.fromkeys(["", *layers], 0),
                                            "gradients": dict.fromkeys(["", *layers], 0)}  # nothing left


def test_unsharded_gradients_live_for_the_sequence_or_for_a_backward_pass(run, reference):
    _, results = run
    layer_bytes, root_bytes = _unit_bytes(reference[1], results["k2_sequence"]["layers"])

    def peak(name):
        return max(sum(sample["gradients"].values()) for sample in results[name]["samples"])

    assert peak("k2_sequence") == sum(reference[1].values())  # every gradient, until the one reduction
    if "k2_backward" in results:
        assert peak("k2_backward") <= root_bytes + 2 * layer_bytes  # reduced as each pass leaves a unit


def _unit_bytes(sizes: dict[str, int], layers: list[str]) -> tuple[int, int]:
    """The bytes of one layer (they are all alike) and of the root unit."""
    per_layer = {path: sum(b for n, b in sizes.items() if n.startswith(path + ".")) for path in layers}
    assert len(set(per_layer.values())) == 1
    return per_layer[layers[0]], sum(sizes.values()) - sum(per_layer.values())


def test_communication_per_sequence(run):
    """One all-gather of the root, then every layer once per segment forward and once per backward
    pass; one reduce-scatter per unit per sequence, or per unit and backward pass."""
    _, results = run
    layers, units = LAYERS, LAYERS + 1
    for k in DEPTHS:
        backwards = sum(min(s, k) + 1 for s in range(SEGMENTS))  # depth 0..min(s, k) from segment s
        counts = results[f"k{k}_sequence"]
        assert (counts["all_gathers"], counts["reduce_scatters"]) == (1 + layers * (SEGMENTS + backwards), units)
    if "k2_backward" in results:
        backwards = sum(min(s, 2) + 1 for s in range(SEGMENTS))
        assert results["k2_backward"]["reduce_scatters"] == units * backwards


def test_inference_runs_the_same_program_after_wrapping(run):
    _, results = run
    if "inference" not in results:
        pytest.skip("run on 2 ranks only")
    inference = results["inference"]
    # forward and prefill: the same program on gathered copies of the same fp32 values, equal bit
    # for bit; decode: the plain program's eager decode reads q, k and v stacked and sums its
    # norms in fp64 (SegmentedModel.decode_graph), rewrites that cannot reach into the layer units
    # whose weights FSDP gathers, so the two round apart, within fp32 tolerance
    assert inference["differences"][:2] == [0.0, 0.0]
    assert inference["differences"][2] <= tolerance(torch.float32).logits
    # prefill's graphs hold the parameters too: wrapping swapped theirs, so none shows up twice
    assert sorted(inference["names"]) == sorted(inference["plain_names"])


# ---- the cut itself (one process) ---------------------------------------------------------------
def test_the_cut_graph_computes_the_same_logits_and_keeps_the_names(llama):
    model, graph = llama
    flat = sc.transform(graph, config(2))
    cut = sc.transform(graph, config(2))
    units = layer_units(cut.step_graph)
    cut.use_step_graph(units.graph)
    assert units.layers == ["model.layers.0", "model.layers.1"]
    assert dict(cut.named_parameters()).keys() == dict(flat.named_parameters()).keys()
    ids = random_ids(2, N)
    with torch.no_grad():
        assert torch.equal(cut(ids).logits, flat(ids).logits)
        assert torch.equal(cut.prefill(ids).logits, flat.prefill(ids).logits)


class _Layered(torch.nn.Module):
    def __init__(self, reuse_first: bool, read_outside: bool):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
        self.reuse_first, self.read_outside = reuse_first, read_outside

    def forward(self, x):
        x = self.layers[1](self.layers[0](x))
        if self.reuse_first:
            x = self.layers[0](x)
        return x + self.layers[0].weight.sum() if self.read_outside else x


@pytest.mark.parametrize("reuse_first,read_outside,message", [
    (True, False, r"layers\.0 are interleaved with those of \['layers\.1'\]"),
    (False, True, r"layers\.0\.weight of layers\.0 is read outside the layer"),
])
def test_a_graph_that_cannot_be_cut_is_refused(reuse_first, read_outside, message):
    module = _Layered(reuse_first, read_outside)
    graph = torch.export.export(module, (torch.ones(2, 4),)).module()
    with pytest.raises(SegcompileError, match=message):
        layer_units(graph)
