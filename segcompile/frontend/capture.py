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

Dropout: the traced graph records each dropout call with the train flag the model had while it
was traced, and a graph has no ``train()``/``eval()`` switch: a model captured in training mode
would drop activations on every later call, ``seg.eval()`` or not. So a model whose dropout is
active (training mode, ``p > 0``) is refused with a ``CaptureError`` that names the modules:
call ``model.eval()`` first (training then runs without dropout, as every segcompile example
does) or set those probabilities to 0. Dropout on attention probabilities is left to
``find_attention``, which refuses it naming the attention layer; dropout with ``p = 0`` or in eval
mode is the identity and is accepted.

Recorded for the runtime (``CaptureInfo``): the vocabulary the ids index (the rows of the
embedding ``input_ids`` feed, read from the graph; else the config's ``vocab_size``) and the
logits' width (what labels index), so that bad ids and labels are refused before a step runs.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim

from ..errors import CaptureError
from .autocast_regions import regions_recorded
from .opaque_sdpa import OpaqueSDPA
from .plain_regions import as_plain_calls
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
    vocab_size: int | None = None  # rows of the embedding input_ids index: ids must be below it
    logits_size: int | None = None  # the logits' last dimension: labels must be below it

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

    with _no_cache_by_config(model, params), attention_through_sdpa(model, keep=MATCHED_IMPLEMENTATIONS) as was:
        gm = _capture(model, kwargs, ids, pos)
    if was is not None:  # say what was captured: the model's attention ran as SDPA while tracing
        info = gm.meta[ir.CAPTURE]
        info.method += f"; attention traced as sdpa, the model's attn_implementation being {was!r}"
    return gm


def _capture(model: torch.nn.Module, kwargs: dict[str, Any], ids: torch.Tensor, pos: torch.Tensor) -> fx.GraphModule:
    name = type(model).__name__
    device = device_of(model)
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
    gm = as_plain_calls(_flatten(ep.module()))
    _refuse_active_dropout(gm, name)
    output = _check_against_model(gm, model, kwargs)
    config = getattr(model, "config", None)
    gm.meta[ir.CAPTURE] = CaptureInfo(
        method=method,
        model_class=name,
        out_spec=ep.call_spec.out_spec,
        example_input_ids=ids,
        example_position_ids=pos,
        model_config=config,
        device=device,
        seconds=time.perf_counter() - start,
        vocab_size=_embedding_rows(gm) or _config_int(config, "vocab_size"),
        logits_size=_logits_size(output) or _config_int(config, "vocab_size"),
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
    # nodes, so a user's autocast still leaves them in fp32 (test_autocast_disabled_regions...);
    # regions_recorded() keeps transformers from skipping the region when autocast is off.
    with OpaqueSDPA(), regions_recorded():
        ep = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic, strict=False)
    val = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name.endswith("input_ids")).meta["val"]
    if not all(isinstance(d, torch.SymInt) for d in val.shape):
        raise CaptureError(
            f"torch.export specialised the input shape of {type(model).__name__} to {tuple(val.shape)}: "
            "some code in the model fixes the batch or sequence length; segcompile needs both dynamic"
        )
    return ep


# (batch, length, first position) the captured graph is checked at: a one-token decode step and a
# short prefill, neither of them the example it was traced with; and, for an fp32 model, the
# prefill under bf16 autocast (fp16 on GPUs without bf16) far into a sequence, where bf16 rounds
# positions to multiples of 32: a region in which the model turns autocast off (RoPE angles) and
# the trace lost computes them there in bf16, and the rotations come out wrong
# (autocast_regions.py). Not past the model's position table, where positions index one, nor its
# config's limit.
CHECK_SHAPES = ((1, 1, 7), (2, 3, 7))
AUTOCAST_CHECK = (2, 3, 4096 + 7)
POSITION_LIMITS = ("max_position_embeddings", "n_positions")


def _check_against_model(gm: fx.GraphModule, model: torch.nn.Module, kwargs: dict[str, Any]) -> Any:
    """The captured graph must compute what the model computes, at lengths other than the example's,
    and under autocast as well as without. Returns the model's output at the last check without
    autocast (its logits give the output's width). Compared by the relative error of the whole output
    (``outputs_agree``)."""
    precise = _parameter_dtype(model) in (torch.float32, torch.float64)
    extra = {k: v for k, v in kwargs.items() if k not in ("input_ids", "position_ids")}
    outputs = [_compare(gm, model, extra, shape, precise, autocast=False) for shape in CHECK_SHAPES]
    if precise:
        batch, length, first = AUTOCAST_CHECK
        config = getattr(model, "config", None)
        limits = [_embedding_rows(gm, "position_ids"), *(_config_int(config, name) for name in POSITION_LIMITS)]
        limits = [n for n in limits if n is not None]
        _compare(gm, model, extra, (batch, length, min([first, *(n - length for n in limits)])), precise=False,
                 autocast=True)
    return outputs[-1]


def _compare(gm, model, extra: dict[str, Any], shape: tuple[int, int, int], precise: bool, autocast: bool) -> Any:
    """Run the model and the graph on one random input of ``shape`` (batch, length, first
    position); a ``CaptureError`` where they disagree, else the model's output."""
    batch, length, first = shape
    device = device_of(model)
    ids = torch.randint(0, 2, (batch, length), device=device)
    pos = torch.arange(first, first + length, device=device)[None]
    half = torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16
    under = torch.autocast(device.type, dtype=half, enabled=autocast)
    with torch.no_grad(), under:
        with _same_random_numbers(device):  # dropout in training mode draws the same masks
            output = model(input_ids=ids, position_ids=pos, **extra)
        with _same_random_numbers(device):
            try:
                got = gm(ids, pos)
            except Exception as e:  # noqa: BLE001 - a graph that cannot run at this length is a bad trace
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise CaptureError(
                    f"the graph traced from {type(model).__name__} fails at batch {batch}, length {length} "
                    f"({type(e).__name__}: {first_line}), where the model runs: tracing specialised something "
                    "to the example input; report the model"
                ) from e
    for w, g in zip(torch.utils._pytree.tree_leaves(output), got):
        same, error = outputs_agree(g, w, precise)
        if same:
            continue
        name = type(model).__name__
        if autocast:
            raise CaptureError(
                f"under torch.autocast({str(half).removeprefix('torch.')}) the graph traced from {name} disagrees with the model at positions "
                f"{first}..{first + length - 1} ({error}), though it agrees without autocast: the model turns "
                "autocast off (or branches on it) somewhere the trace did not record; report the model, and "
                "meanwhile run it without autocast (e.g. in bf16 weights)"
            )
        raise CaptureError(
            f"the graph traced from {name} disagrees with the model at batch {batch}, length {length} (shapes "
            f"{tuple(g.shape)} vs {tuple(w.shape)}, {error}): tracing specialised something to the example input; "
            "report the model"
        )
    return output


# ---- dropout: refused while active (module docstring) ----------------------------------------------
aten = torch.ops.aten
# every dropout op takes (input, p, train)
DROPOUTS = tuple(
    getattr(aten, name).default
    for name in ("dropout", "dropout_", "native_dropout", "feature_dropout", "feature_dropout_", "alpha_dropout",
                 "alpha_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_")
    if hasattr(aten, name)
)
# what attention-probability dropout reads, through casts (find_attention's pattern refuses it by layer)
SOFTMAX = (aten.softmax.int, aten._softmax.default)
CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default)
NAMED_MODULES = 3  # how many active dropout modules the error lists by name


def _refuse_active_dropout(gm: fx.GraphModule, model_name: str) -> None:
    """A ``CaptureError`` naming the modules whose dropout the trace recorded as active."""
    active = []
    for module in gm.modules():  # higher-order ops (autocast regions) keep their bodies in submodules
        if isinstance(module, fx.GraphModule):
            active += [node for node in module.graph.nodes if _is_active_dropout(node)]
    if not active:
        return
    where = list(dict.fromkeys(_dropout_site(node) for node in active))
    more = f" and {len(where) - NAMED_MODULES} more" if len(where) > NAMED_MODULES else ""
    raise CaptureError(
        f"{model_name} is in training mode with active dropout in {', '.join(where[:NAMED_MODULES])}{more}: the traced "
        "graph would apply it on every call, since it has no train/eval switch (seg.eval() could not turn it off). "
        "Call model.eval() first (training then runs without dropout), or set those dropout probabilities to 0"
    )


def _is_active_dropout(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in DROPOUTS or len(node.args) < 3:
        return False
    p, train = node.args[1], node.args[2]
    return bool(train) and p != 0 and not _reads_softmax(node.args[0])


def _reads_softmax(node) -> bool:
    while isinstance(node, fx.Node) and node.target in CASTS:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.target in SOFTMAX


def _dropout_site(node: fx.Node) -> str:
    """The innermost module whose forward called the dropout, as "`path` (Class, p=0.5)"."""
    if not node.meta.get("nn_module_stack"):
        return f"node `{node.name}` (p={node.args[1]})"
    path, cls = ir.module_of(node)
    return f"`{path}` ({cls}, p={node.args[1]})"


# ---- what ids and labels index (CaptureInfo.vocab_size, .logits_size) -------------------------------
EMBEDDINGS = (aten.embedding.default,)
# ops that pass token ids on unchanged in value (GPT-2 reshapes input_ids before its embedding)
SAME_IDS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
            aten.alias.default, aten.unsqueeze.default, aten.squeeze.dim, aten.flatten.using_ints,
            aten.contiguous.default, *CASTS)


def _embedding_rows(gm: fx.GraphModule, placeholder: str = "input_ids") -> int | None:
    """Rows of the embeddings ``placeholder`` indexes (the fewest, if several); ``None`` if it feeds none."""
    frontier = [n for n in gm.graph.nodes if n.op == "placeholder" and n.target == placeholder]
    rows = []
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.target in EMBEDDINGS and len(user.args) > 1 and user.args[1] is node:
                weight = user.args[0].meta.get("val") if isinstance(user.args[0], fx.Node) else None
                if weight is not None and isinstance(weight.shape[0], int):
                    rows.append(weight.shape[0])
            elif user.target in SAME_IDS:
                frontier.append(user)
    return min(rows) if rows else None


def _logits_size(output) -> int | None:
    """The last dimension of a model output's logits (``output.logits``, or the output itself)."""
    logits = output.logits if hasattr(output, "logits") else output
    return logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() >= 1 else None


def _config_int(config, name: str) -> int | None:
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def outputs_agree(got: torch.Tensor, want: torch.Tensor, precise: bool) -> tuple[bool, str]:
    """Whether the traced graph's output ``got`` matches the model's ``want`` on the same input,
    and the error: relative in norm, within 1e-4 when ``precise`` (fp32/fp64) and 5e-2 otherwise.
    In norm, not elementwise: rounding differences grow with depth (on CUDA the graph's matrix
    products may take other cuBLAS algorithms than the model's: SmolLM2's fp32 logits differed by
    up to 5.3e-4, about 2e-5 of their size; a half-precision model rounds differently again in a
    traced graph), while a graph that specialised something to the example is wrong by the
    output's own size."""
    if got.shape != want.shape:
        return False, "shapes differ"
    got, want = got.double(), want.double()
    error = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    return error <= (1e-4 if precise else 5e-2), f"relative error {error:.3g}"


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


@contextlib.contextmanager
def _no_cache_by_config(model: torch.nn.Module, params) -> Iterator[None]:
    """Within the block, ``model.config.use_cache`` is False where the forward takes ``use_cache``
    only through ``**kwargs`` (Granite MoE's), so the trace returns no cache: export cannot take
    the flag as a constant among the keyword arguments. Restored on exit."""
    config = getattr(model, "config", None)
    if "use_cache" in params or not hasattr(config, "use_cache"):
        yield
        return
    before, config.use_cache = config.use_cache, False
    try:
        yield
    finally:
        config.use_cache = before


# transformers' attention implementations whose graph find_attention matches
MATCHED_IMPLEMENTATIONS = ("sdpa", "eager")


@contextlib.contextmanager
def attention_through_sdpa(model: torch.nn.Module, keep: tuple[str, ...] = ("sdpa",)) -> Iterator[str | None]:
    """Within the block, a transformers model whose ``attn_implementation`` is not in ``keep``
    (flex_attention, flash_attention_2, a hub kernel...) runs its attention through SDPA: the same
    causal attention, in ops that a trace records and every device runs. Yields the implementation
    it replaced (None where it kept the model's); restored on exit. A model that cannot switch to
    SDPA is a ``CaptureError`` that says what to load it with instead."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl is None or impl in keep or not hasattr(model, "set_attn_implementation"):
        yield None
        return
    try:
        model.set_attn_implementation("sdpa")
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError or ImportError
        instead = " or ".join(repr(i) for i in keep)
        raise CaptureError(
            f"{type(model).__name__} uses attn_implementation={impl!r}; segcompile needs its attention as {instead} "
            f"here, and it cannot run SDPA ({' '.join(str(e).split())[:200]})"
            + ("; load it with attn_implementation='eager'" if "eager" in keep else "")
        ) from e
    try:
        yield impl
    finally:
        model.set_attn_implementation(impl)


def cache_off(model: torch.nn.Module) -> dict[str, Any]:
    """The keyword that keeps ``model`` from making a KV cache: ``use_cache=False`` where its
    forward takes it, by name or through ``**kwargs`` with a config that has ``use_cache`` (Granite
    MoE's takes it so, and returns a cache unless told not to); nothing for a model without one."""
    params = inspect.signature(model.forward).parameters
    by_keywords = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    takes = "use_cache" in params or (by_keywords and hasattr(getattr(model, "config", None), "use_cache"))
    return {"use_cache": False} if takes else {}


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
