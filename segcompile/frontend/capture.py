"""capture: trace an unmodified model into a flat FX ``GraphModule`` (the pipeline's entry).

Tracing is ``torch.export.export(strict=False)`` with a dynamic batch and a dynamic sequence
length (SDPA calls kept opaque, see ``opaque_sdpa.py``), then unlifted to a ``GraphModule`` whose parameters are the model's own ``Parameter``
objects. The model is called as ``model(input_ids, position_ids=..., use_cache=False)``:
positions come in from outside so that a segment can start anywhere (docs/design.md section 1: positions are
absolute). The graph is made flat: placeholders ``input_ids [B, L]`` and ``position_ids [1, L]``,
output a tuple of the leaves of the model's output (its pytree spec is kept in
``gm.meta[ir.CAPTURE]`` to rebuild the output type).

Removed on the way, because they pin the graph to the example: the export guard call, the
``use_cache`` constant input and ``aten._assert_tensor_metadata`` checks (which name the device
and the dtypes of the trace). In their place, every capture is checked against the model itself
at a one-token and a three-token input.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim

from ..errors import CaptureError
from .opaque_sdpa import OpaqueSDPA
from .. import ir

EXAMPLE_BATCH = 2
EXAMPLE_LEN = 16  # > 1 so that export does not specialise the length to 0/1


@dataclass
class CaptureInfo:
    method: str
    model_class: str
    out_spec: Any
    example_input_ids: torch.Tensor
    example_position_ids: torch.Tensor
    model_config: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seconds: float = 0.0

    def describe(self) -> str:
        return f"{self.model_class} traced with {self.method} in {self.seconds:.2f}s"


def capture(model: torch.nn.Module) -> fx.GraphModule:
    """Trace ``model`` (a causal LM taking ``input_ids`` and ``position_ids``) into a flat GraphModule."""
    name = type(model).__name__
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params:
        raise CaptureError(
            f"{name}.forward has no `position_ids` argument: segcompile runs each segment at its "
            "absolute positions and needs to pass them in; add `position_ids=None` to forward and "
            "use it for the position embedding"
        )
    device = device_of(model)
    ids = torch.zeros(EXAMPLE_BATCH, EXAMPLE_LEN, dtype=torch.long, device=device)
    pos = torch.arange(EXAMPLE_LEN, device=device)[None]
    kwargs: dict[str, Any] = {"input_ids": ids, "position_ids": pos}
    if "use_cache" in params:
        kwargs["use_cache"] = False

    start = time.perf_counter()
    method = "torch.export(strict=False), dynamic batch and length, SDPA opaque"
    try:
        try:
            ep = _export(model, kwargs, strict_dims=True)
        except torch._dynamo.exc.UserError as e:
            if e.error_type is not torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION:
                raise
            # Older torch (2.11) cannot prove some always-true guards (GQA's reshape of a
            # transposed K adds min(8L, 16L) == 8L); Dim.DYNAMIC lets export keep them as
            # assumptions. _check_against_model below verifies the graph at other lengths.
            ep = _export(model, kwargs, strict_dims=False)
            method = "torch.export(strict=False), Dim.DYNAMIC batch and length, SDPA opaque"
    except CaptureError:
        raise  # already says what went wrong
    except Exception as e:  # noqa: BLE001 - every tracing failure becomes one clear error
        raise CaptureError(_explain_trace_failure(model, e)) from e
    gm = _flatten(ep.module())
    _check_against_model(gm, model, kwargs)
    gm.meta[ir.CAPTURE] = CaptureInfo(
        method=method,
        model_class=name,
        out_spec=ep.call_spec.out_spec,
        example_input_ids=ids,
        example_position_ids=pos,
        model_config=getattr(model, "config", None),
        device=device,
        seconds=time.perf_counter() - start,
    )
    return gm


def _export(model, kwargs, strict_dims: bool):
    if strict_dims:
        batch, length = Dim("batch", min=1, max=1 << 16), Dim("seq_len", min=1, max=1 << 30)
    else:
        batch, length = Dim.DYNAMIC, Dim.DYNAMIC
    dynamic: dict[str, Any] = {"input_ids": {0: batch, 1: length}, "position_ids": {1: length}}
    if "use_cache" in kwargs:
        dynamic["use_cache"] = None
    # With a torch-function mode active, export also records the model's own autocast regions
    # (transformers computes RoPE angles under `autocast(enabled=False)`) as wrap_with_autocast
    # nodes, so a user's autocast still leaves them in fp32 (test_autocast_disabled_regions...).
    with OpaqueSDPA():
        ep = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic, strict=False)
    val = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name.endswith("input_ids")).meta["val"]
    if not all(isinstance(d, torch.SymInt) for d in val.shape):
        raise CaptureError(
            f"torch.export specialised the input shape of {type(model).__name__} to {tuple(val.shape)}: "
            "some code in the model fixes the batch or sequence length; segcompile needs both dynamic"
        )
    return ep


# (batch, length) pairs the captured graph is checked at: a one-token decode step and a short
# prefill, neither of them the example it was traced with.
CHECK_SHAPES = ((1, 1), (2, 3))


def _check_against_model(gm: fx.GraphModule, model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """The captured graph must compute what the model computes, at lengths other than the example's.

    fp32/fp64 models are compared elementwise. Half-precision ones by the relative error of the
    whole output: rounding differences (another attention kernel for another mask form, say) grow
    with depth, elementwise past any fixed tolerance in a 32-layer bf16 model, while a graph that
    specialised something to the example is wrong by the output's own size."""
    device = kwargs["input_ids"].device
    precise = _parameter_dtype(model) in (torch.float32, torch.float64)
    extra = {k: v for k, v in kwargs.items() if k not in ("input_ids", "position_ids")}
    with torch.no_grad():
        for batch, length in CHECK_SHAPES:
            ids = torch.randint(0, 2, (batch, length), device=device)
            pos = torch.arange(7, 7 + length, device=device)[None]
            with _same_random_numbers(device):  # dropout in training mode draws the same masks
                want = torch.utils._pytree.tree_leaves(model(input_ids=ids, position_ids=pos, **extra))
            with _same_random_numbers(device):
                got = gm(ids, pos)
            for w, g in zip(want, got):
                same, error = outputs_agree(g, w, precise)
                if not same:
                    raise CaptureError(
                        f"the graph traced from {type(model).__name__} disagrees with the model at batch {batch}, "
                        f"length {length} (shapes {tuple(g.shape)} vs {tuple(w.shape)}, {error}): tracing "
                        "specialised something to the example input; report the model"
                    )


def outputs_agree(got: torch.Tensor, want: torch.Tensor, precise: bool) -> tuple[bool, str]:
    """Whether the traced graph's output ``got`` matches the model's ``want`` on the same input,
    and the error: elementwise (rtol 1e-4, atol 1e-5) when ``precise``, else within 5e-2 relative
    in norm (half-precision models round differently in a traced graph), with what it measured."""
    if got.shape != want.shape:
        return False, "shapes differ"
    got, want = got.double(), want.double()
    if precise:
        error = (got - want).abs().max().item()
        return torch.allclose(got, want, rtol=1e-4, atol=1e-5), f"max abs error {error:.3g}"
    error = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    return error <= 5e-2, f"relative error {error:.3g}"


@contextlib.contextmanager
def _same_random_numbers(device: torch.device):
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        yield


def _parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def is_captured(obj) -> bool:
    return isinstance(obj, fx.GraphModule) and ir.CAPTURE in obj.meta


def copy_captured(gm: fx.GraphModule) -> fx.GraphModule:
    """A fresh copy of a captured graph for another run of the passes (which rewrite in place).

    Capture is the slow step (torch.export, about a second per layer on a CPU); trying several
    configs on one model captures once. Parameters stay shared; node metadata is copied shallowly.
    """
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name="CapturedModel")
    new.meta[ir.CAPTURE] = gm.meta[ir.CAPTURE]
    return new


def device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _flatten(exported: fx.GraphModule) -> fx.GraphModule:
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    for module in exported.modules():  # higher-order ops keep their bodies in submodules
        if isinstance(module, fx.GraphModule):
            for node in list(module.graph.find_nodes(op="call_function", target=torch.ops.aten._assert_tensor_metadata.default)):
                module.graph.erase_node(node)
            module.recompile()
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.target == "use_cache":
            if node.users:
                raise CaptureError("the traced graph reads `use_cache` as a tensor; segcompile expects a constant flag")
            graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()  # plain positional inputs, tuple output
    output = graph.output_node()
    leaves = output.args[0]
    output.args = (tuple(leaves) if isinstance(leaves, (list, tuple)) else (leaves,),)
    gm = fx.GraphModule(exported, graph, class_name="CapturedModel")
    gm.graph.lint()
    gm.recompile()
    return gm


def _explain_trace_failure(model: torch.nn.Module, error: Exception) -> str:
    """Name the innermost submodule (and source line) whose forward was running when tracing failed."""
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    where = None
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        module = frame.f_locals.get("self")
        if isinstance(module, torch.nn.Module) and id(module) in names:
            where = (names[id(module)], type(module).__name__, frame.f_code.co_filename, lineno)
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if where is None:
        location = f"{type(model).__name__}"
    else:
        path, cls, filename, lineno = where
        location = f"module `{path}` ({cls}) at {filename}:{lineno}"
    return (
        f"could not trace {type(model).__name__} with torch.export(strict=False): failed in {location}: "
        f"{type(error).__name__}: {first_line}. Data-dependent Python control flow on tensor values "
        "cannot be traced; rewrite it with torch.where/torch.cond, or report the op"
    )
