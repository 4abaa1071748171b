"""Which transformers causal-LM families segcompile compiles, and how it refuses the others.

Every family below is built from a tiny random-init config (nothing is downloaded), with each
attention implementation asked for, and compiled with ``segcompile.transform`` at S = 16, T = S,
2 sinks, half the KV heads long-range. A family that compiles is checked against the oracle over
40 tokens (three segments) and, in the first segment (where segmented attention is full
attention), against the model itself; one that does not is listed with the error segcompile
raised: a ``SegcompileError`` that names what is unsupported is the expected refusal, anything
else is a defect. Prints a table and writes ``results/families-<device>.json``.

    python bench/families.py                       # every family, sdpa and eager (CPU, ~2 minutes)
    python bench/families.py --families llama mixtral --impls sdpa
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

import segcompile as sc
from segcompile.files import atomic_write_text
from segcompile.quality.report import recorded_command

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, num_hidden_layers=2, pad_token_id=0)
GPT_STYLE = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512)
MOE = dict(num_experts_per_tok=2)
# family: (model class, config class, the config's arguments)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", COMMON),
    "mistral": ("MistralForCausalLM", "MistralConfig", {**COMMON, "sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", COMMON),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {**COMMON, "head_dim": 8}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {**COMMON, "head_dim": 8}),
    "phi": ("PhiForCausalLM", "PhiConfig", COMMON),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", COMMON),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", COMMON),
    "granite": ("GraniteForCausalLM", "GraniteConfig", COMMON),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", COMMON),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", {**COMMON, "sliding_window": None}),
    "cohere": ("CohereForCausalLM", "CohereConfig", COMMON),
    "smollm3": ("SmolLM3ForCausalLM", "SmolLM3Config", COMMON),
    "glm": ("GlmForCausalLM", "GlmConfig", {**COMMON, "head_dim": 8}),
    "helium": ("HeliumForCausalLM", "HeliumConfig", {**COMMON, "head_dim": 8}),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {**GPT_STYLE, "bos_token_id": 0, "eos_token_id": 0}),
    "gptj": ("GPTJForCausalLM", "GPTJConfig", {**GPT_STYLE, "rotary_dim": 4}),
    "codegen": ("CodeGenForCausalLM", "CodeGenConfig", {**GPT_STYLE, "rotary_dim": 4}),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig", GPT_STYLE),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {k: v for k, v in COMMON.items() if k != "num_key_value_heads"}),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4,
                                                         num_hidden_layers=2, new_decoder_architecture=True, num_kv_heads=2)),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                                                num_hidden_layers=2, max_position_embeddings=512, word_embed_proj_dim=32)),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", {**COMMON, **MOE, "num_local_experts": 4, "sliding_window": None}),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", {**COMMON, **MOE, "num_experts": 4, "moe_intermediate_size": 16,
                                                            "shared_expert_intermediate_size": 16}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", {**COMMON, **MOE, "head_dim": 8, "num_experts": 4,
                                                            "moe_intermediate_size": 16}),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", {**COMMON, **MOE, "num_experts": 4}),
    "granitemoe": ("GraniteMoeForCausalLM", "GraniteMoeConfig", {**COMMON, **MOE, "num_local_experts": 4}),
    # refused, each for its own reason
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {**COMMON, "head_dim": 8}),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {**COMMON, "head_dim": 8}),
    "lfm2": ("Lfm2ForCausalLM", "Lfm2Config", {**COMMON, "layer_types": ["conv", "full_attention"]}),
    "qwen3_next": ("Qwen3NextForCausalLM", "Qwen3NextConfig", {
        **COMMON, **MOE, "head_dim": 8, "layer_types": ["linear_attention", "full_attention"], "num_experts": 4,
        "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "linear_num_value_heads": 2,
        "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8}),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config", {
        **COMMON, **MOE, "n_routed_experts": 4, "moe_intermediate_size": 16, "first_k_dense_replace": 1,
        "kv_lora_rank": 8, "q_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
        "n_group": 1, "topk_group": 1}),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(vocab_size=VOCAB, hidden_size=32, n_head=4, n_layer=2)),
}
SEGMENT, LENGTH = 16, 40


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--impls", nargs="+", choices=("sdpa", "eager"), default=["sdpa", "eager"])
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return p.parse_args(argv)


def build(family: str, impl: str) -> torch.nn.Module:
    """The tiny model; transformers' own error where this version lacks the family or the family
    has no such attention implementation."""
    model_class, config_class, arguments = FAMILIES[family]
    if not hasattr(transformers, model_class):
        raise LookupError(f"transformers {transformers.__version__} has no {model_class}")
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**arguments, attn_implementation=impl)
    return getattr(transformers, model_class)(config).eval()


def row(family: str, impl: str) -> dict:
    out = dict(family=family, impl=impl)
    try:
        model = build(family, impl)
    except (LookupError, ValueError) as e:  # not segcompile's: the family or the implementation is not there
        return {**out, "status": "no model", **_error(e)}
    cfg = sc.SegmentConfig(SEGMENT, sink_tokens=2, long_range=sc.HeadPlan.fraction(0.5))
    ids = torch.randint(1, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    try:
        graph = sc.capture(model)
        seg = sc.transform(graph, cfg)
        every_head = sc.transform(graph, sc.SegmentConfig(SEGMENT, sink_tokens=2, long_range=sc.HeadPlan.all()))
    except sc.SegcompileError as e:
        return {**out, "status": "refused", **_error(e)}
    except Exception as e:  # noqa: BLE001 - the table says what escaped, which is a defect
        return {**out, "status": "FAILED", **_error(e)}
    try:
        with torch.no_grad():
            got, full = seg(ids).logits, model(ids).logits
            checks = dict(max_abs_first_segment_vs_model=_max_abs(got[:, :SEGMENT], full[:, :SEGMENT]),
                          max_abs_every_head_long_range_vs_model=_max_abs(every_head(ids).logits, full))
            try:
                checks["max_abs_vs_oracle"] = _max_abs(got, sc.oracle.forward(model, cfg, ids))
            except sc.SegcompileError as e:  # the oracle cannot run every model: the two checks above still hold
                out["oracle"] = _error(e)["detail"]
    except Exception as e:  # noqa: BLE001 - compiled, but running it failed: a defect
        return {**out, "status": "FAILED", **_error(e)}
    ok = all(error <= 1e-4 for error in checks.values())
    status = ("ok" if "oracle" not in out else "ok*") if ok else "MISMATCH"
    return {**out, "status": status, "attention_layers": len(seg.sites), **checks, "seconds": time.perf_counter() - start}


def _error(e: Exception) -> dict:
    """The error's class and message, a source file named from its package on (no path of the
    machine that ran this)."""
    detail = re.sub(r"\S*(site|dist)-packages/", "", " ".join(str(e).split()))
    return {"error": type(e).__name__, "detail": detail[:300]}


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore")  # the families' own deprecation chatter; the table is the output
    transformers.logging.set_verbosity_error()
    rows = [row(f, impl) for f in args.families for impl in args.impls]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; S={SEGMENT}, {LENGTH} tokens, fp32, CPU")
    print(f"{'family':12} {'impl':6} {'status':9} {'vs oracle':>10} {'1st seg':>9} {'all long':>9}  refusal")
    for r in rows:
        errors = " ".join(f"{r[key]:{width}.1e}" if key in r else " " * width for key, width in (
            ("max_abs_vs_oracle", 10), ("max_abs_first_segment_vs_model", 9), ("max_abs_every_head_long_range_vs_model", 9)))
        refusal = f"{r.get('error', '')}: {r['detail'][:110]}" if "detail" in r else ""
        print(f"{r['family']:12} {r['impl']:6} {r['status']:9} {errors}  {refusal}")
    if any(r["status"] == "ok*" for r in rows):
        print("ok*: the oracle cannot run the model (its attention does not call SDPA); the model's own checks hold")
    meta = dict(command=recorded_command("bench/families.py", argv or sys.argv[1:], {"--out"}),
                transformers=transformers.__version__, torch=torch.__version__, segment_len=SEGMENT, tokens=LENGTH,
                sinks=2, plan="fraction(0.5); every head long-range against the model itself")
    document = dict(meta=meta, rows=rows)
    path = Path(args.out) / "families-cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(document, indent=1) + "\n")
    print(f"wrote {path}")
    return 1 if any(r["status"] in ("FAILED", "MISMATCH") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
