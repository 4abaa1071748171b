"""``SegmentedModel``: the driver that runs the segment-step graph over a sequence.

The step graph (built by the passes) processes up to one segment's worth of tokens given the
carried state (``runtime/state.py``); the driver cuts the input at segment boundaries, feeds the
state in, and at the end of every segment moves keys between the state's parts
(docs/design.md sections 1 and 6):

    current (<= S) --> tail (last T of the segment) --> history (long-range KV heads only)
                                                    \\-> sinks (first G positions, all KV heads)

A local KV head therefore holds at most G + T + S entries whatever the length; a long-range KV
head keeps everything. The same loop serves ``forward`` (whole sequence), ``prefill`` and
``decode`` (any number of tokens, usually one); ``segments`` runs it one whole segment at a time
for training (``runtime/training.py`` consumes it). ``generate`` is prefill and decode in
``runtime/generation.py``'s loop. Prefill and decode without autograd run variants of the step
graph (``runtime/variants/``): prefill keeps the last position's logits and frees old tails;
decode reads the query, key and value projections as one product and sums its reductions in
fp64, as the CUDA-graph decoder does, so that the two decode paths round alike.

State semantics. ``prefill`` and ``decode`` are functional: they return a new ``SegmentState``
and never change the one passed in, which stays valid and can be continued again (to branch:
two decodes from one state give two independent continuations; the history buffer they share
is copied before one would write where the other reads, ``state.append_history``). The one
exception is decoding through CUDA graphs (``enable_cuda_graphs``): the state lives in fixed
buffers updated in place, so each decode makes the state it continued stale, and decoding from a
stale state is a ``StateError`` (``state.to_segment_state()`` copies one out to branch from).
A state belongs to the program that made it (``SegmentState.program_id``: the parameters, the
segment sizes, the head plan, the K/V layout); another program's state is a ``StateError``,
and a state of an equivalent program (another transform of the same model and config, another
implementation or ``tbptt_k``, compiled or not) is accepted.

Input checks (``segcompile/inputs.py``). Each call checks its ids once, before any step runs:
an integer ``[batch, tokens]`` tensor (any integer dtype, converted to int64) on the captured
device, inside the vocabulary (one min/max reduction, so one device sync per call on CUDA);
``tbptt_backward`` checks its labels the same way.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.utils.checkpoint
import torch.utils._pytree as pytree

from ..config import SegmentConfig, segment_pieces
from ..errors import ConfigError, InputError, SegcompileError
from ..ir import AttentionSite
from ..kernels.problem import slot_table
from ..kernels.history_format import QuantizedHistory
from .. import ir
from . import generation, training
from ..inputs import check_token_tensor, token_ids
from .state import (
    CARRIED_NAMES,
    CONSTANT_NAMES,
    LayerState,
    ProgramId,
    SegmentState,
    append_history_pair,
    carried_dtype,
    check_state_program,
    compiled_layout,
    empty_state,
    layer_tensors,
    reserve_history,
    storage_id,
    storages,
)
from .static_decode import StaticDecoder, StaticState
from .variants.fused_projections import fuse_projections, refresh_fused_projections
from .variants.keep_last_logits import keep_last_logits
from .variants.release_tails import release_tails
from .variants.wide_reductions import wide_reductions
from .wrapping import check_sync_owner

log = logging.getLogger(__name__)


class SegmentRun(NamedTuple):
    """One segment of ``SegmentedModel.segments``, yielded once its step has run."""

    tokens: slice  # the segment's positions in input_ids
    logits: torch.Tensor  # [B, tokens, V], in the step's autograd graph
    # Empty unless ``segments`` was given ``tails``: every layer's tail_k, tail_v as the step read
    # them, and the last T entries of every layer's K/V as the step returned them, which the next
    # segment reads as its tail (the segment end passes them on detached)
    tail_inputs: list[torch.Tensor]
    tail_outputs: list[torch.Tensor]


class SegmentedModel(torch.nn.Module):
    """A model rewritten into a segment loop. Build it with ``segcompile.transform``."""

    def __init__(self, step_graph: fx.GraphModule, cfg: SegmentConfig):
        super().__init__()
        self.step_graph = step_graph
        self.cfg = cfg
        self.sites: list[AttentionSite] = step_graph.meta[ir.SITES]
        self.capture_info = step_graph.meta[ir.CAPTURE]
        self.implementations: dict[int, str] = step_graph.meta[ir.IMPL]
        self._num_outputs = step_graph.meta[ir.NUM_MODEL_OUTPUTS]
        self.pass_timings: dict[str, float] = dict(step_graph.meta.get(ir.PASS_TIMINGS, {}))
        # ids must be below this (the rows of the input embedding; None: unknown, not checked)
        self.vocab_size: int | None = self.capture_info.vocab_size
        # what every state this model makes carries, and what a state given to it must match
        self.program_id = ProgramId.of(self.capture_info.model_class, step_graph.parameters(), self.sites, cfg)
        self._last_logits_graph: fx.GraphModule | None = None  # built on the first prefill
        self._releasing_tails_graph: fx.GraphModule | None = None  # the same, freeing the old tails
        # the decode variant, built on the first eager decode; in a dict, not an attribute, so that
        # its stacked weights (1.5 GB for an 8B model) are no buffers of this module
        self._decode_graphs: dict[str, fx.GraphModule] = {}
        # set by compile(): graph -> (its torch.compile'd callable, the config naming its dynamic lengths)
        self._compiled: dict[fx.GraphModule, tuple[Callable, dict[str, str]]] = {}
        self._compile_options: dict = {}
        # what synchronises the gradients at the end of tbptt_backward: set by
        # segcompile.distributed.fsdp / ddp, None for a program that is not wrapped
        self.gradient_sync = None
        # set by enable_cuda_graphs(): decode runs the fixed-shape step (runtime/static_decode.py)
        self._static: StaticDecoder | None = None
        self.last_decode_path: str | None = None  # "eager", "compiled", "static" or "cuda-graph"

    # ---- public API -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, **kwargs):
        """Segmented forward over the whole sequence; returns the model's own output type."""
        if kwargs:
            raise SegcompileError(
                f"SegmentedModel.forward takes only input_ids; got {sorted(kwargs)}. Positions are "
                "implicit and masks are the segment semantics (padding is not supported)"
            )
        input_ids = self._checked_ids(input_ids)  # before anything reads input_ids.shape
        if self.cfg.tbptt_k and input_ids.shape[1] > self.cfg.segment_len and _builds_graph(self):
            warnings.warn(
                "gradients through SegmentedModel.forward carry no state across segments (tbptt_k=0 "
                f"semantics), but this config has tbptt_k={self.cfg.tbptt_k}: train with "
                "seg.tbptt_backward(input_ids, labels), or run the forward under torch.no_grad()",
                stacklevel=2,
            )
        self._start_graph_generation()
        outputs, _ = self._feed(self.initial_state(input_ids), input_ids, collect=True)
        return outputs

    def prefill(self, input_ids: torch.Tensor, state: SegmentState | None = None, *, free_tails: bool = True) -> SegmentState:
        """Run ``input_ids`` through the loop and return the state (``state.logits`` = last token's).

        ``state``: continue from it (a ``SegmentState``, or a ``StaticState`` from decoding with
        CUDA graphs, copied out first) instead of the empty state; it must come from this model's
        program (``SegmentState.program_id``, else a ``StateError``) and is not changed: the new
        state is returned, and ``state`` can be continued again (module docstring).

        Each step computes the logits of its last position only, the long-range history is
        allocated once for the whole prompt, and a step over a whole segment frees each layer's
        old tail once its layer has read it (``_step_releasing_tails``), except the tails of the
        ``state`` passed in, which the caller may continue from again. ``free_tails=False``:
        free none (the same state to the bit, with every old tail alive until its step returns)."""
        input_ids = self._checked_ids(input_ids)
        if state is not None:
            check_state_program(state, self.program_id, self.sites, self.cfg, "prefill")
            self._check_batch(state, input_ids, "prefill")
        total = (state.position if state is not None else 0) + input_ids.shape[1]  # history positions to hold
        if self._static is not None:  # room for the static decoder to take the buffer over, uncopied
            total = max(total, self._static.history_slots(total), self._static.max_context or 0)
        if isinstance(state, StaticState):  # decoded with CUDA graphs: continue from a copy, made with that room
            state = state.to_segment_state(history_capacity=total, token_major=bool(self._compiled))
        if state is None:  # a state passed in may hold outputs of the generation it was made in
            self._start_graph_generation()
        state = state or self.initial_state(input_ids)
        foreign = storages([*layer_tensors(state, CARRIED_NAMES), state.logits]) if free_tails else None
        state = reserve_history(state, total, token_major=bool(self._compiled))
        _, state = self._feed(state, input_ids, collect=False, foreign=foreign)
        return state

    def decode(self, state: SegmentState, next_ids: torch.Tensor, *,
               check_ids: bool = True) -> tuple[torch.Tensor, SegmentState]:
        """Feed ``next_ids [B, n]`` after ``state``; returns their logits ``[B, n, V]`` and the new state.

        Functional: ``state`` is not changed and can be decoded from again (a branch), except on
        the CUDA-graph path (``enable_cuda_graphs``), where the returned ``StaticState`` replaces
        it in place and ``state`` becomes stale (module docstring). ``state`` must come from this
        model's program (``SegmentState.program_id``), else a ``StateError`` says what differs.
        ``check_ids=False`` skips the vocabulary check of ``next_ids`` (a min/max reduction, one
        device sync on CUDA): for ids the model chose itself, as ``generate`` does."""
        next_ids = self._checked_ids(next_ids, check_range=check_ids)
        check_state_program(state, self.program_id, self.sites, self.cfg, "decode")
        self._check_batch(state, next_ids, "decode")
        if self._static is not None and not _builds_graph(self):
            self._note_decode_path(self._static.path)
            return self._static.decode(state, next_ids)
        if isinstance(state, StaticState):  # CUDA graphs turned off, or autograd recording: eager from a copy
            state = state.to_segment_state()
        self._note_decode_path("compiled" if self._compiled else "eager")
        graph = None if self._compiled or _builds_graph(self) else self.decode_graph()
        outputs, state = self._feed(state, next_ids, collect=True, graph=graph)
        return _logits_of(outputs), state

    @staticmethod
    def _check_batch(state, ids: torch.Tensor, what: str) -> None:
        if ids.shape[0] != state.batch_size:
            raise InputError(
                f"{what}: batch size {ids.shape[0]} does not match the state's {state.batch_size}; "
                f"{what} with the batch the state was prefilled with"
            )

    def enable_cuda_graphs(self, *, history_block: int | None = None, max_context: int | None = None,
                           capture: bool | None = None, kernel: bool | None = None,
                           compile: bool | dict = False) -> SegmentedModel:
        """Decode one token a step through a program of fixed shapes, replayed from CUDA graphs
        (``runtime/static_decode.py``; docs/design.md section 6). Returns ``self``.

        A prefill sizes its history buffer for the decoder (to the end of the segment being decoded,
        or ``max_context``); the first ``decode`` after it loads the state into fixed buffers (per
        batch size), taking that history buffer over instead of copying it (docs/design.md
        section 6), and each token then replays a graph captured once per batch size and
        history bucket (the history rounded up to ``history_block`` positions, default S). Off
        CUDA the same program runs eagerly (on CUDA too with ``capture=False``: to tell a capture
        problem from a program problem). ``max_context``: reserve the history for that many
        positions at once (else it grows by half when full, which captures the graphs again).
        The state is updated in place: only the state the last decode returned can be continued
        (``state.to_segment_state()`` keeps a copy to branch from). With autograd recording,
        decode runs eagerly. Calling it again frees the buffers and graphs; ``disable_cuda_graphs``
        goes back to the eager step graph. ``kernel``: attention by the Triton kernel that reads
        the position from the device (default on CUDA) or by PyTorch products over masks (default
        elsewhere). ``compile``: run the fixed-shape step under ``torch.compile`` (``True``: with
        Inductor rounding as the eager step does; or a dict of its arguments) before the capture, which fuses the elementwise work between the
        layers' matrix products; one compile serves every history bucket."""
        self._static = StaticDecoder(self.step_graph, self.cfg, self.capture_info.device, self.program_id,
                                     history_block=history_block, max_context=max_context, capture=capture,
                                     kernel=kernel, compile=compile)
        return self

    def disable_cuda_graphs(self) -> SegmentedModel:
        """Decode with the step graph again (eager, or compiled after ``compile``); frees the static
        buffers and graphs. A state from the static path is copied back on its next decode."""
        self._static = None
        return self

    def _refuse_quantized_history(self, what: str) -> None:
        # the compiled step graph takes the history in the carried dtype only (Dynamo does not
        # trace the QuantizedHistory subclass that carries the scales through it)
        if self.cfg.history_dtype is not None:
            raise ConfigError(
                f"{what} does not support history_dtype={self.cfg.history_dtype} yet; for fast decoding use "
                "seg.enable_cuda_graphs(compile=True), or transform with history_dtype=None"
            )

    def _note_decode_path(self, path: str) -> None:
        if path != self.last_decode_path:
            log.debug("decode runs the %s path", path)
        self.last_decode_path = path

    def generate(
        self,
        input_ids,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        streamer=None,
        **options,
    ) -> torch.Tensor:
        """Generate up to ``max_new_tokens`` after the prompts ``input_ids [B, N]`` (one length; a
        list of prompts of one length works too); returns ``[B, N + new]``: each prompt followed
        by its tokens, as transformers' ``generate``. ``prefill``, then one ``decode`` per token,
        under ``torch.no_grad()``.

        Greedy by default; ``do_sample=True`` samples after ``temperature``, ``top_k`` and
        ``top_p`` (transformers' logits warpers), from ``generator=`` (a ``torch.Generator`` on the
        model's device: the same seed gives the same tokens) or else the global RNG. Keyword
        options: ``repetition_penalty``, ``stop_token_ids`` (stop like ``eos_token_id``, which
        defaults to none: pass the tokenizer's), ``pad_token_id`` (what a stopped row gets while
        others go on; default the first stop token), ``attention_mask`` (all ones: padding is an
        error), ``logits_processor`` and ``stopping_criteria`` (transformers' lists, applied after
        the built-in ones). ``streamer`` (``put``/``end``, as ``transformers.TextStreamer``) gets
        the prompt, then each new token ``[B]``, then ``end()``. How: ``runtime/generation.py``."""
        return generation.generate(
            self, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, streamer, **options
        )

    def initial_state(self, input_ids: torch.Tensor) -> SegmentState:
        """The empty state a sequence of ``input_ids``' batch starts from."""
        self._check_ids(input_ids)
        return empty_state(self.sites, input_ids.shape[0], input_ids.device, self.program_id)

    def tbptt_backward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        checkpoint: bool = False,
    ):
        """Exact truncated-BPTT gradients (``cfg.tbptt_k``) into the model's parameters' ``.grad``.

        ``labels`` default to ``input_ids`` (position i predicts labels[i+1]; -100 is ignored);
        ``reduction="mean"`` divides by the label tokens of the whole sequence (HF's causal-LM
        loss), ``"sum"`` does not. Returns the loss. Keeps at most ``tbptt_k + 1`` segment graphs;
        with ``checkpoint=True`` they hold only their inputs and recompute activations in backward.
        Under ``torch.autocast`` the segment steps run in the autocast dtype. Wrapped by
        ``segcompile.distributed``, the gradients are synchronised over the ranks once, after the
        sequence's last backward. Python's garbage collector does not run by itself while the
        segments run; the young generations are collected once after them (unless the caller turned
        the collector off). How: ``runtime/training.py``.
        """
        check_sync_owner(self)
        if self.gradient_sync is None:
            return training.tbptt_backward(self, input_ids, labels, reduction, checkpoint)
        with self.gradient_sync.sequence(self):
            return training.tbptt_backward(self, input_ids, labels, reduction, checkpoint)

    def segments(
        self,
        input_ids: torch.Tensor,
        *,
        checkpoint: bool = False,
        tails: Callable[[torch.Tensor], torch.Tensor] | None = None,
        check_ids: bool = True,
    ) -> Iterator[SegmentRun]:
        """Run ``input_ids`` from the empty state, one step per segment, yielding each segment's
        ``SegmentRun`` before the next step starts: the loop that training drives.

        ``tails``: applied to every layer's carried ``tail_k`` and ``tail_v`` before the step that
        reads them (TBPTT makes them autograd leaves, to collect the gradient that reaches them);
        the runs then hold those tails and the step's own tail outputs. ``checkpoint``: as in
        ``run_step``. Nothing of a run is kept here once the next one is asked for: a consumer
        that drops it frees it. The long-range history has one buffer for the whole input.
        ``check_ids=False``: the caller checked ``input_ids`` against the vocabulary already
        (``tbptt_backward``)."""
        input_ids = self._checked_ids(input_ids, check_range=check_ids)
        # growing the history by copies would, at each growth, hold the old and the new buffer at
        # once (2.5x the history) while the graphs of earlier segments keep views of the old
        state = reserve_history(self.initial_state(input_ids), input_ids.shape[1], token_major=bool(self._compiled))
        for tokens in segment_pieces(0, input_ids.shape[1], self.cfg.segment_len):
            run, state = self._run_segment(state, input_ids[:, tokens], tokens, checkpoint, tails)
            yield run
            del run

    def compile(self, **kwargs) -> SegmentedModel:
        """Run the segment step under ``torch.compile(**kwargs)`` (``backend``, ``mode``, ``options``...)
        in ``forward``, ``prefill``, ``decode`` and ``tbptt_backward``, without a recompile per step.

        A plainly compiled ``step_graph`` recompiles as the carried state grows: Dynamo
        specialises lengths 0 and 1 (the tail, sinks and history are empty in the first segment,
        the current segment passes 0 and 1 in every one), guards the strides of views of longer
        buffers (the history, the tail, the sinks), and so falls back to eager at its recompile
        limit. Here the carried tensors' lengths, and the token count of a prefill step, are
        unbacked (Dynamo neither specialises nor guards them), and every step gets the state in
        one layout whatever its lengths, none of it a view (``state.compiled_layout``;
        docs/design.md section 6): sinks, tail and history token-major (``[entries, batch,
        kv_heads, head_dim]`` in memory, strides that do not depend on the entries; the history
        buffer is token-major), the current segment contiguous. Decoding then compiles one graph
        for prefill steps and one for one-token decode steps (two if the first decode step starts
        a segment), however many tokens follow; another batch size, dtype or grad mode compiles
        again. Every attention site keeps its ``impl``.

        With CUDA graphs (``mode="reduce-overhead"`` or ``"max-autotune"``, or Inductor's
        ``triton.cudagraphs`` option) the lengths are backed dynamic sizes instead: Inductor captures
        no graph with an unbacked size. Dynamo then compiles one graph for the lengths 0 and 1 and
        one for the others, and Inductor's CUDA-graph trees record one graph per distinct set of
        lengths: the segments of a training sequence once each, meant to be replayed by every later
        sequence of the same length (``tbptt_backward`` makes each sequence one generation of the
        graph trees; bench/README.md, training, says what an H200 measured). The first two
        sequences of each length compile, then record: minutes for long ones (32K tokens of a 443M
        model on an H200: 158 s and 340 s, then 0.86 s a step). ``forward``, and
        ``prefill`` from the empty state, are one generation a call too: their outputs may be
        overwritten by the next such call (clone what you keep). ``decode`` continues the
        generation of the prefill it follows and records a graph per token: decode with
        ``seg.generate`` and ``enable_cuda_graphs``, whose static step is captured once.

        Compiles in place and returns ``self``; ``step_graph`` stays the uncompiled ``GraphModule``
        (what export, ``print(seg)`` and the pass pages show).
        """
        self._refuse_quantized_history("compile()")
        graphs = [self.step_graph, self.prefill_graph()]
        # Dynamo names the step's arguments L['<name>'] (torch.compiler.config's *_sources)
        lengths = "dynamic_sources" if captures_cuda_graphs(kwargs) else "unbacked_sources"
        self._compiled = {}
        for graph in graphs:
            names = list(inspect.signature(graph.forward).parameters)  # input_ids, position_offset, state...
            sources = [f"L['{name}']:2" for name in names[2:]]
            if graph is not self.step_graph:  # prefill: any prompt length, 1 included, in one graph
                sources.append(f"L['{names[0]}']:1")
            self._compiled[graph] = (torch.compile(graph, **kwargs), {lengths: ",".join(sources)})
        self._compile_options = dict(kwargs)
        if self.uses_cuda_graphs:
            log.info("compiled with CUDA graphs: the first two calls at each sequence length compile and record "
                     "(three graphs a segment in tbptt_backward), which takes minutes for long sequences")
        return self

    def _start_graph_generation(self) -> None:
        """Under CUDA graphs, start a generation of Inductor's graph trees (``compile``): a call
        that starts from the empty state is one generation, and the outputs of the one before may
        be overwritten from then on."""
        if self.uses_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether the compiled steps capture CUDA graphs (``compile`` with such options)."""
        return bool(self._compiled) and captures_cuda_graphs(self._compile_options)

    def use_step_graph(self, graph: fx.GraphModule) -> None:
        """Run ``graph`` in place of ``step_graph`` from now on: a graph that computes the same
        values from the same inputs (``runtime/variants/layer_units.py``, which
        ``segcompile.distributed.fsdp`` shards layer by layer). The graphs derived from the old one
        are derived again at once (and compiled again with the same options if the program was
        compiled): prefill's hold the parameters too, and a wrapper that swaps parameters (FSDP2)
        swaps them in every module that holds them when it is applied, not in a copy made later."""
        compiled = bool(self._compiled)
        self.step_graph = graph
        self._last_logits_graph = None
        self._releasing_tails_graph = None
        self._decode_graphs = {}  # built again on the next decode, over the modules ``graph`` holds
        self._compiled = {}
        self._releasing_graph()  # builds prefill_graph() first
        if compiled:
            self.compile(**self._compile_options)

    def prefill_graph(self) -> fx.GraphModule:
        """The step graph ``prefill`` runs: the ``keep_last_logits`` variant of ``step_graph``
        (``runtime/variants/``), or ``step_graph`` itself when its output has no single logits
        tensor. Built on first use."""
        if self._last_logits_graph is None:
            self._last_logits_graph = keep_last_logits(self.step_graph) or self.step_graph
        return self._last_logits_graph

    def decode_graph(self) -> fx.GraphModule:
        """The step graph an eager ``decode`` runs without autograd: ``step_graph`` with the
        small projections of one input as one matrix product (``fuse_projections``) and its
        reductions summed in fp64 (``wide_reductions``), as the CUDA-graph decoder's program
        computes them: both decode paths, compiled or not, then round alike (the two variants'
        module docstrings say by how much they otherwise differ). Built on first use; its
        stacked weights are refreshed before each use."""
        graph = self._decode_graphs.get("fused")
        if graph is None:
            graph = fx.GraphModule(self.step_graph, copy.deepcopy(self.step_graph.graph), class_name="SegmentDecodeStep")
            graph.meta.update(self.step_graph.meta)
            graph = self._decode_graphs["fused"] = fuse_projections(wide_reductions(graph))
        refresh_fused_projections(graph)  # weights changed in place since (a training step)
        return graph

    def logits_of(self, leaves: list) -> torch.Tensor:
        """The logits among a step's flattened model outputs."""
        return _logits_of(pytree.tree_unflatten(leaves, self.capture_info.out_spec))

    # ---- the loop ---------------------------------------------------------------------------
    def _feed(self, state: SegmentState, input_ids: torch.Tensor, collect: bool, foreign: set[int] | None = None,
              graph: fx.GraphModule | None = None):
        """Run ``input_ids`` after ``state``, one step per piece of a segment. ``foreign`` (prefill):
        the storages the caller holds; steps that may free the old tails then do. ``graph``: the
        variant of the step graph that collecting steps run (decode's). ``input_ids`` were checked
        by the caller (``_checked_ids``)."""
        pieces = []
        for piece in segment_pieces(state.position, input_ids.shape[1], self.cfg.segment_len):
            chunk = input_ids[:, piece]
            if foreign is not None and self._can_release_tails(state, chunk, foreign):
                leaves, state = self._step_releasing_tails(state, chunk)
            else:
                leaves, state = self.step(state, chunk, last_logits_only=not collect, graph=graph)
            if collect:
                pieces.append(leaves)
        if not collect:
            return None, state
        return _join(pieces, self.capture_info.out_spec), state

    def _run_segment(self, state: SegmentState, chunk: torch.Tensor, tokens: slice, checkpoint: bool, tails):
        """One step of ``segments``: its run, and the state after it (the segment ended if whole)."""
        tail_inputs = []
        if tails is not None:
            if self._compiled:
                # the leaves are then the compiled layout's own copies: a leaf that aliased the
                # previous step's output would keep that output alive as long as the graph that
                # read the leaf exists, and under CUDA graphs the replayed outputs keep their
                # graphs (Inductor's graph trees then see an output alive that died when they
                # recorded, and record the step again)
                state = compiled_layout(state)
            state = _with_tails(state, tails)
            tail_inputs = layer_tensors(state, ("tail_k", "tail_v"))
        leaves, state = self.run_step(state, chunk, checkpoint=checkpoint)
        logits = self.logits_of(leaves)
        del leaves  # the step's other outputs are not kept past the segment
        run = SegmentRun(tokens, logits, tail_inputs, self._tail_outputs(state) if tails is not None else [])
        return run, self._end_segment_if_full(state)

    def step(self, state: SegmentState, chunk: torch.Tensor, last_logits_only: bool = False,
             graph: fx.GraphModule | None = None) -> tuple[list, SegmentState]:
        """Run the step graph (or ``graph``, a variant of it) once on ``chunk`` (which must not
        cross a segment boundary), and move the segment into the carried state if ``chunk``
        finished it. ``last_logits_only``: the logits leaf holds the last position's only."""
        leaves, state = self.run_step(state, chunk, graph=self.prefill_graph() if last_logits_only else graph)
        return leaves, self._end_segment_if_full(state)

    def _end_segment_if_full(self, state: SegmentState) -> SegmentState:
        return self.end_segment(state) if self.cfg.offset_in_segment(state.position) == 0 else state

    def _can_release_tails(self, state: SegmentState, chunk: torch.Tensor, foreign: set[int]) -> bool:
        """Whether a prefill step over ``chunk`` may free ``state``'s tails once they are read.

        Only a step over a whole segment (it ends the segment: nothing reads the old tails after
        it), with no autograd graph (one would save the tails for backward) and not compiled, and
        only tails that are not empty and whose storage is the prefill's own: neither the
        caller's (``foreign``: a user may continue two branches from one state) nor shared with
        sinks or history, which the next state may keep. The storage of an old tail is then the
        previous step's ``current`` buffer (a fresh concatenation; with T < S a copy of its last
        T entries), which only the old tail refers to."""
        starts_segment = self.cfg.offset_in_segment(state.position) == 0
        if not starts_segment or chunk.shape[1] != self.cfg.segment_len or self._compiled or _builds_graph(self):
            return False
        kept = foreign | storages(layer_tensors(state, CONSTANT_NAMES))
        return all(t.numel() > 0 and storage_id(t) not in kept for t in layer_tensors(state, ("tail_k", "tail_v")))

    def _step_releasing_tails(self, state: SegmentState, chunk: torch.Tensor) -> tuple[list, SegmentState]:
        """``step`` over a whole segment in a graph that frees every layer's old tail after its
        layer's attention has read it (``runtime/variants/release_tails.py``). What
        ``end_segment`` does with the old tails is done before the step (``_retire_tails``), the
        rest after it: a freed tail is never read again."""
        retired = self._retire_tails(state)
        leaves, state = self.run_step(state, chunk, graph=self._releasing_graph())
        return leaves, self.end_segment(state, retired=retired)

    def run_step(
        self, state: SegmentState, chunk: torch.Tensor, checkpoint: bool = False, graph: fx.GraphModule | None = None
    ) -> tuple[list, SegmentState]:
        """Run the step graph (or ``graph``, a variant of it) once; the new tokens' K/V are
        appended to ``current``. Every step of every entry point runs here.

        ``checkpoint``: keep no activations inside the segment; recompute them in backward.
        """
        graph = graph if graph is not None else self.step_graph
        compiled = self._compiled.get(graph)
        if compiled is not None:
            state = compiled_layout(state)
            chunk = chunk.clone()  # not a view of the caller's ids (their offset and base would be guarded)
            for site in self.sites:  # made here, outside any CUDA graph's memory pool (slot_table says why)
                slot_table(tuple(site.long_range), site.num_kv_heads, chunk.device)
        # filled on the device: torch.tensor(position, device=...) copies from pageable host memory,
        # a blocking cudaMemcpy a step (bench/profile_training.py counts them as synchronisations)
        offset = torch.full((), state.position, dtype=torch.long, device=chunk.device)
        flat = [t for layer in state.layers for t in layer.tensors()]
        if compiled is not None:
            flat = [t.detach() if t._base is not None and not t.requires_grad else t for t in flat]
            graph = functools.partial(_call_compiled, *compiled)
        if checkpoint:
            outs = torch.utils.checkpoint.checkpoint(graph, chunk, offset, *flat, use_reentrant=False)
        else:
            outs = graph(chunk, offset, *flat)
        leaves, currents = list(outs[: self._num_outputs]), outs[self._num_outputs :]
        layers = tuple(
            replace(layer, current_k=currents[2 * i], current_v=currents[2 * i + 1])
            for i, layer in enumerate(state.layers)
        )
        position = state.position + chunk.shape[1]
        return leaves, replace(state, position=position, layers=layers, logits=self.logits_of(leaves)[:, -1],
                               program_id=self.program_id)

    def _releasing_graph(self) -> fx.GraphModule:
        if self._releasing_tails_graph is None:
            self._releasing_tails_graph = release_tails(self.prefill_graph())
        return self._releasing_tails_graph

    def _tail_outputs(self, state: SegmentState) -> list[torch.Tensor]:
        """Every layer's last T entries of ``current`` (k, v), still in the step's graph."""
        S, T = self.cfg.segment_len, self.cfg.tail_len
        return [getattr(layer, f"current_{kv}")[:, :, S - T :] for layer in state.layers for kv in ("k", "v")]

    # ---- the end of a segment ---------------------------------------------------------------
    def end_segment(self, state: SegmentState, retired: tuple[dict, ...] | None = None) -> SegmentState:
        """Move a finished segment into tail, history and sinks (all detached; docs/design.md section 6).

        ``retired``: per layer, the sinks and history the old tail has already moved into
        (``_retire_tails``, before a step that frees the old tails); only the segment's first
        S - T entries are left to move, and the old tail is not read."""
        S, T = self.cfg.segment_len, self.cfg.tail_len
        layers = []
        for i, (site, layer) in enumerate(zip(self.sites, state.layers)):
            if retired is not None:
                layer = replace(layer, **retired[i])
            moved, leaving = {}, {}
            for kv in ("k", "v"):
                current = getattr(layer, f"current_{kv}").detach()
                leaving[kv] = current[:, :, : S - T]
                if retired is None:
                    tail = getattr(layer, f"tail_{kv}").detach()  # a TBPTT leaf: sinks and history are constants
                    # the tail follows the K/V dtype of the run
                    leaving[kv] = torch.cat([tail.to(current.dtype), leaving[kv]], dim=2)
                # views would keep the whole segment's buffer alive with the tail (S entries a
                # layer where T are carried): with T < S the tail gets its own copy
                tail = current[:, :, S - T :]
                moved[f"tail_{kv}"] = tail.clone() if T < S else tail
                moved[f"current_{kv}"] = current.new_empty(*current.shape[:2], 0, current.shape[3])
            moved.update(self._leave(site, layer, leaving, state.history_room))
            layers.append(replace(layer, **moved))
        return replace(state, layers=tuple(layers))

    def _retire_tails(self, state: SegmentState) -> tuple[dict, ...]:
        """Per layer, the sinks and history with the old tail moved in, as ``end_segment`` would
        move it at the end of the coming step, for ``end_segment(..., retired=)``. The step
        itself still sees the old sinks and history: the tail's long-range heads are written
        past the end of the history view it reads (in place, in a buffer ``reserve_history``
        sized), and new sinks are new tensors. A tail made by this prefill has the K/V dtype of
        its steps, so it leaves in the dtype ``end_segment`` would convert it to."""
        retired = []
        for site, layer in zip(self.sites, state.layers):
            leaving = {kv: getattr(layer, f"tail_{kv}").detach() for kv in ("k", "v")}
            retired.append(self._leave(site, layer, leaving, state.history_room))
        return tuple(retired)

    def _leave(self, site: AttentionSite, layer: LayerState, leaving: dict[str, torch.Tensor],
               room: int) -> dict[str, torch.Tensor]:
        """``layer``'s sinks and histories with ``leaving`` (``{"k": ..., "v": ...}``, the entries
        that leave the tail, in position order) appended: the sinks while they have fewer than G
        entries, the histories for the long-range KV heads (K's and V's together: one kernel for
        a quantised pair; a new history buffer holds at least ``room`` positions: the state's
        ``history_room``). All are constants, in ``carried_dtype``."""
        G = self.cfg.sink_tokens
        constant = {kv: carried_dtype(entries.dtype, entries.device.type) for kv, entries in leaving.items()}
        moved = {}
        for kv, entries in leaving.items():
            sinks = getattr(layer, f"sink_{kv}").to(constant[kv])
            if sinks.shape[2] < G:
                # only the entries the sinks take: a slice of the whole concatenation would keep every
                # leaving entry alive with them (a segment's K/V a layer, for good)
                sinks = torch.cat([sinks, entries[:, :, : G - sinks.shape[2]].to(sinks.dtype)], dim=2)
            moved[f"sink_{kv}"] = sinks
        if site.long_range:
            kvs = ("k", "v")  # append_history_pair takes K first
            index = _head_index(tuple(site.long_range), leaving["k"].device)
            histories = tuple(getattr(layer, f"hist_{kv}") for kv in kvs)
            # a quantised history's kernel reads the long-range heads in place (no gather) from K/V
            # already in the carried dtype; otherwise they are gathered first, so that only they
            # are converted (autocast's fp32 K/V)
            if isinstance(histories[0], QuantizedHistory) and all(leaving[kv].dtype == constant[kv] for kv in kvs):
                news, heads = tuple(leaving[kv] for kv in kvs), index
            else:
                news, heads = tuple(leaving[kv].index_select(1, index).to(constant[kv]) for kv in kvs), None
            stores = tuple(getattr(layer, f"hist_store_{kv}") for kv in kvs)
            appended = append_history_pair(stores, histories, news, token_major=bool(self._compiled), heads=heads,
                                           room=room)
            for kv, (store, history) in zip(kvs, appended):
                moved[f"hist_store_{kv}"], moved[f"hist_{kv}"] = store, history
        return moved

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        """An integer ``[batch, tokens]`` tensor on the captured device type (no sync)."""
        check_token_tensor(input_ids, self.capture_info.device, self.capture_info.model_class)

    def _checked_ids(self, input_ids: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """``input_ids`` checked (``_check_ids``; ``check_range``: inside the vocabulary, one
        reduction) as int64: what every public entry point runs once, before its first step."""
        return token_ids(input_ids, vocab_size=self.vocab_size, device=self.capture_info.device,
                         owner=self.capture_info.model_class, check_range=check_range)

    # ---- display ----------------------------------------------------------------------------
    def __repr__(self) -> str:
        # The step graph's module tree repeats the original model's; show what was compiled instead.
        body = self.extra_repr().replace("\n", "\n  ")
        return f"SegmentedModel(\n  {body}\n)"

    def extra_repr(self) -> str:
        c = self.cfg
        lines = [
            f"model={self.capture_info.model_class}, segment_len={c.segment_len}, tail_len={c.tail_len}, "
            f"sink_tokens={c.sink_tokens}, tbptt_k={c.tbptt_k}, long_range={c.long_range.describe()}"
            + (f", history_dtype={c.history_dtype}" if c.history_dtype is not None else ""),
        ]
        for site in self.sites:
            lines.append(
                f"layer {site.layer}: {site.module} [{site.kind}] heads={site.num_heads} kv_heads={site.num_kv_heads} "
                f"long_range_kv_heads={list(site.long_range)} impl={self.implementations[site.layer]}"
            )
        if self._compiled:
            options = ", ".join(f"{k}={v!r}" for k, v in self._compile_options.items())
            lengths = "backed (CUDA graphs: one a set of lengths)" if captures_cuda_graphs(self._compile_options) else "unbacked"
            lines.append(f"step: torch.compile({options}), {lengths} state lengths (SegmentedModel.compile)")
        lines.append(self._static.describe() if self._static is not None else "decode: the step graph, eager" + (
            " (compiled)" if self._compiled else ""))
        if self.last_decode_path is not None:
            lines.append(f"last decode ran: {self.last_decode_path}")
        return "\n".join(lines)


def _with_tails(state: SegmentState, make: Callable[[torch.Tensor], torch.Tensor]) -> SegmentState:
    layers = tuple(replace(layer, tail_k=make(layer.tail_k), tail_v=make(layer.tail_v)) for layer in state.layers)
    return replace(state, layers=layers)


def _call_compiled(step: Callable, lengths: dict[str, str], *args):
    # the dynamic lengths, named by the step's arguments; in effect only while the step traces
    with torch.compiler.config.patch(**lengths):
        return step(*args)


def captures_cuda_graphs(compile_options: dict) -> bool:
    """Whether ``torch.compile(**compile_options)`` has Inductor capture CUDA graphs."""
    inductor = compile_options.get("options") or {}
    return compile_options.get("mode") in ("reduce-overhead", "max-autotune") or bool(inductor.get("triton.cudagraphs"))


@functools.cache
def _head_index(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # made once per device: a fresh host-to-device copy per layer and segment stalls the stream
    return torch.tensor(heads, device=device)


def _builds_graph(module: torch.nn.Module) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


def _logits_of(output):
    return output.logits if hasattr(output, "logits") else output


def _join(pieces: list[list], out_spec):
    """Concatenate each output leaf of the chunks along the token axis and rebuild the output."""
    if len(pieces) == 1:
        return pytree.tree_unflatten(pieces[0], out_spec)
    joined = [torch.cat(parts, dim=1) for parts in zip(*pieces)]
    return pytree.tree_unflatten(joined, out_spec)
