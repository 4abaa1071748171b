"""``seg.generate`` (runtime/generation.py) and ``segcompile generate``: greedy equals a decode loop
and the oracle's greedy continuation across segment boundaries; seeded sampling; the streamer;
stop tokens; ragged input; the command end to end on a tiny model with a locally built tokenizer."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

import segcompile as sc
from segcompile.cli import models as cli_models
from segcompile.cli.main import main
from segcompile.testing.tolerances import tolerance

from conftest import captured, random_ids

S = 4
PROMPT = 6  # the prompt ends inside segment 1; ten new tokens cross two more boundaries
NEW = 10
CONFIGS = {
    "T=S": sc.SegmentConfig(S, long_range=sc.HeadPlan.fraction(0.5)),
    "T<S,G>0": sc.SegmentConfig(S, tail_len=2, sink_tokens=1, long_range=sc.HeadPlan.fraction(0.5)),
    "local only": sc.SegmentConfig(S, tail_len=1, sink_tokens=2, long_range=sc.HeadPlan.none()),
}


def segmented(family: str = "llama", config: str = "T<S,G>0"):
    model, graph = captured(family)
    return model, sc.transform(graph, CONFIGS[config])


def decode_loop(seg, ids: torch.Tensor, new: int, processors=None) -> torch.Tensor:
    """Greedy by hand: prefill, then argmax and one ``seg.decode`` per token."""
    processors = processors or LogitsProcessorList()
    out = ids
    with torch.no_grad():
        state = seg.prefill(ids)
        logits = state.logits
        for _ in range(new):
            token = processors(out, logits.float()).argmax(-1, keepdim=True)
            out = torch.cat([out, token], dim=1)
            logits, state = seg.decode(state, token)
            logits = logits[:, -1]
    return out


def oracle_greedy(model, cfg, ids: torch.Tensor, new: int) -> torch.Tensor:
    """The oracle's greedy continuation: the dense segmented model over the growing sequence."""
    out = ids
    for _ in range(new):
        logits = sc.oracle.forward(model, cfg, out)[:, -1]
        top2 = logits.topk(2).values
        # a near tie would make token equality depend on summation order: fail loudly instead
        assert (top2[:, 0] - top2[:, 1]).min() > 10 * tolerance(torch.float32).logits
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out


# ---- greedy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, config", [
    ("llama", "T=S"), ("llama", "T<S,G>0"), ("llama", "local only"), ("gpt2", "T<S,G>0"), ("plain", "local only"),
])
def test_greedy_equals_a_decode_loop_and_the_oracle(family, config):
    model, seg = segmented(family, config)
    ids = random_ids(2, PROMPT)
    out = seg.generate(ids, max_new_tokens=NEW)
    assert out.shape == (2, PROMPT + NEW) and out.dtype == torch.long
    assert torch.equal(out[:, :PROMPT], ids)
    assert torch.equal(out, decode_loop(seg, ids, NEW))
    assert torch.equal(out, oracle_greedy(model, CONFIGS[config], ids, NEW))
    assert len(set(out[:, PROMPT:].flatten().tolist())) > 2  # the continuation is not one token repeated


def test_a_list_of_prompts_and_an_all_ones_mask_are_a_batch():
    _, seg = segmented()
    ids = random_ids(2, PROMPT)
    want = seg.generate(ids, max_new_tokens=3)
    assert torch.equal(seg.generate(ids.tolist(), max_new_tokens=3), want)
    assert torch.equal(seg.generate(ids.int(), attention_mask=torch.ones_like(ids), max_new_tokens=3), want)


def test_repetition_penalty_is_transformers_processor():
    _, seg = segmented()
    ids = random_ids(2, PROMPT)
    want = decode_loop(seg, ids, NEW, LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)]))
    assert torch.equal(seg.generate(ids, NEW, repetition_penalty=1.5), want)
    assert not torch.equal(want, decode_loop(seg, ids, NEW))  # the penalty changed something


def test_no_new_tokens_returns_the_prompt():
    _, seg = segmented()
    ids = random_ids(1, PROMPT)
    streamer = Recorder()
    assert torch.equal(seg.generate(ids, max_new_tokens=0, streamer=streamer), ids)
    assert len(streamer.puts) == 1 and streamer.ends == 1


def test_one_decode_step_per_new_token_but_the_last(monkeypatch):
    _, seg = segmented()
    fed = []
    decode = seg.decode

    def counting(state, ids, **options):
        fed.append(tuple(ids.shape))
        return decode(state, ids, **options)

    monkeypatch.setattr(seg, "decode", counting)
    seg.generate(random_ids(2, PROMPT), NEW)
    assert fed == [(2, 1)] * (NEW - 1)  # the last token's logits are never needed


def test_callers_processors_and_criteria_apply_after_the_built_in_ones():
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= PROMPT + 3)

    _, seg = segmented()
    ids = random_ids(2, PROMPT)
    penalty = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])
    assert torch.equal(seg.generate(ids, NEW, logits_processor=penalty), seg.generate(ids, NEW, repetition_penalty=1.5))
    stop = StoppingCriteriaList([AfterThree()])
    assert torch.equal(seg.generate(ids[:1], NEW, stopping_criteria=stop), seg.generate(ids[:1], 3))
    assert torch.equal(seg.generate(ids, NEW, stopping_criteria=stop, pad_token_id=0), seg.generate(ids, 3))
    with pytest.raises(sc.SegcompileError, match="needs a pad_token_id"):
        seg.generate(ids, NEW, stopping_criteria=stop)


# ---- sampling ----------------------------------------------------------------------------------
def sample(seg, ids, seed: int, **options) -> torch.Tensor:
    return seg.generate(ids, NEW, do_sample=True, generator=torch.Generator().manual_seed(seed), **options)


def test_seeded_sampling_is_reproducible():
    _, seg = segmented()
    ids = random_ids(2, PROMPT)
    first = sample(seg, ids, seed=0)
    assert torch.equal(first[:, :PROMPT], ids)
    assert torch.equal(sample(seg, ids, seed=0), first)
    # 2 x 10 draws from a near-uniform distribution over 96 tokens: another seed agrees on all of
    # them with negligible probability
    assert not torch.equal(sample(seg, ids, seed=1), first)
    assert not torch.equal(first, seg.generate(ids, NEW))  # sampling is not greedy
    # without a generator, the global RNG: seeded, reproducible too
    torch.manual_seed(3)
    global_first = seg.generate(ids, NEW, do_sample=True)
    torch.manual_seed(3)
    assert torch.equal(seg.generate(ids, NEW, do_sample=True), global_first)


def test_sampling_with_one_candidate_is_greedy():
    _, seg = segmented()
    ids = random_ids(2, PROMPT)
    greedy = seg.generate(ids, NEW)
    assert torch.equal(sample(seg, ids, seed=0, top_k=1), greedy)
    assert torch.equal(sample(seg, ids, seed=0, top_p=1e-6), greedy)  # top-p keeps at least one token
    assert torch.equal(sample(seg, ids, seed=0, temperature=1e-4), greedy)


def test_top_k_samples_among_the_k_most_likely():
    _, seg = segmented()
    ids = random_ids(2, PROMPT)
    out = sample(seg, ids, seed=0, top_k=3, temperature=5.0)
    with torch.no_grad():
        logits = seg(out).logits  # position i scores token i + 1
    for t in range(PROMPT, PROMPT + NEW):
        top3 = logits[:, t - 1].topk(3).indices
        assert (top3 == out[:, t : t + 1]).any(dim=1).all(), t
    assert not torch.equal(out, seg.generate(ids, NEW))  # 3 candidates at a high temperature: not greedy


def test_sampling_options_without_do_sample_warn_and_are_ignored():
    _, seg = segmented()
    ids = random_ids(1, PROMPT)
    with pytest.warns(UserWarning, match="temperature, top_k apply to sampling only"):
        out = seg.generate(ids, 3, temperature=0.5, top_k=2)
    assert torch.equal(out, seg.generate(ids, 3))


# ---- the streamer ------------------------------------------------------------------------------
class Recorder:
    """transformers' streamer protocol: put(ids), end()."""

    def __init__(self):
        self.puts: list[torch.Tensor] = []
        self.ends = 0

    def put(self, value):
        assert self.ends == 0, "put after end"
        self.puts.append(value)

    def end(self):
        self.ends += 1


def test_the_streamer_gets_the_prompt_then_every_token_then_end():
    _, seg = segmented()
    ids = random_ids(2, PROMPT)
    streamer = Recorder()
    out = seg.generate(ids, NEW, streamer=streamer)
    assert streamer.ends == 1
    assert [tuple(p.shape) for p in streamer.puts] == [(2, PROMPT)] + [(2,)] * NEW
    assert all(p.device.type == "cpu" for p in streamer.puts)
    assert torch.equal(torch.cat([streamer.puts[0], torch.stack(streamer.puts[1:], dim=1)], dim=1), out)


def test_text_streamer_prints_the_continuation(tmp_path, capsys):
    from transformers import TextStreamer

    tokenizer = word_tokenizer(tmp_path)
    _, seg = segmented()
    ids = random_ids(1, PROMPT)
    out = seg.generate(ids, NEW, streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out == tokenizer.decode(out[0, PROMPT:]) + "\n"


# ---- stopping ----------------------------------------------------------------------------------
def stopped(free: torch.Tensor, stops: list[int], pad: int) -> torch.Tensor:
    """``free`` (a run without stop tokens) as a run with ``stops``: each row padded after its
    first stop token, cut where every row has stopped."""
    rows, ends = [], []
    for row in free.tolist():
        new = row[PROMPT:]
        end = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
        rows.append(row[:PROMPT] + new[:end] + [pad] * (len(new) - end))
        ends.append(end)
    return torch.tensor(rows)[:, : PROMPT + max(ends)]


def test_stop_tokens_stop_each_row_and_pad_it():
    _, seg = segmented()
    ids = random_ids(2, PROMPT)
    free = seg.generate(ids, NEW)
    eos = free[0, PROMPT + 2].item()  # row 0 stops at its third new token
    assert eos not in free[0, PROMPT : PROMPT + 2].tolist()
    out = seg.generate(ids, NEW, eos_token_id=eos)
    assert torch.equal(out, stopped(free, [eos], pad=eos))
    assert out[0, PROMPT + 3 :].eq(eos).all()  # padded with the eos (no pad_token_id given)

    # stop tokens besides the eos, a pad id of its own; the loop ends once every row stopped
    other = free[1, PROMPT + 1].item()
    out = seg.generate(ids, NEW, eos_token_id=[eos], stop_token_ids=[other], pad_token_id=0)
    assert torch.equal(out, stopped(free, [eos, other], pad=0))
    assert out.shape[1] < PROMPT + NEW


def test_one_prompt_ends_at_its_stop_token():
    _, seg = segmented()
    ids = random_ids(1, PROMPT)
    free = seg.generate(ids, NEW)
    eos = free[0, PROMPT + 4].item()
    streamer = Recorder()
    out = seg.generate(ids, NEW, eos_token_id=eos, streamer=streamer)
    first = free[0, PROMPT:].tolist().index(eos)
    assert torch.equal(out, free[:, : PROMPT + first + 1])
    assert len(streamer.puts) == 1 + first + 1 and streamer.ends == 1


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts, options, message", [
    ([[1, 2, 3], [4, 5]], {}, r"prompts of different lengths \[2, 3\] \(a ragged batch\).*no padding"),
    (torch.ones(2, 3, dtype=torch.long), {"attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])},
     "attention_mask masks some prompt tokens \\(padding\\).*no padding"),
    (torch.ones(3, dtype=torch.long), {}, r"integer tensor \[batch, tokens\], got torch.int64 of shape \(3,\)"),
    (torch.ones(1, 3), {}, "integer tensor"),
    (torch.ones(1, 3, dtype=torch.long), {"max_new_tokens": -1}, "max_new_tokens must be an int >= 0"),
    (torch.ones(1, 3, dtype=torch.long), {"do_sample": True, "temperature": 0.0}, "temperature must be a number > 0"),
    (torch.ones(1, 3, dtype=torch.long), {"do_sample": True, "top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
    (torch.ones(1, 3, dtype=torch.long), {"eos_token_id": "2"}, "must be ids"),
])
def test_ragged_prompts_and_bad_options_are_errors(prompts, options, message):
    _, seg = segmented()
    with pytest.raises(sc.SegcompileError, match=message):
        seg.generate(prompts, **options)


# ---- the command -------------------------------------------------------------------------------
CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w4{% endif %}"


def word_tokenizer(folder, chat_template: str | None = CHAT_TEMPLATE, eos: str = "</s>"):
    """A word-level tokenizer over the tiny models' 96 ids (<pad> <s> </s> <unk> w4 .. w95), made
    here (nothing downloaded), saved to ``folder`` and loaded back as transformers does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 96)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token=eos,
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns when stdout is not a terminal
    folder = tmp_path / "model"
    captured("llama")[0].save_pretrained(folder)
    return folder


def continuation(config: str, prompt_ids: list[int], new: int) -> list[int]:
    """The greedy continuation the command should find: the same model and config, in process."""
    _, seg = segmented("llama", config)
    return seg.generate(torch.tensor([prompt_ids]), new)[0, len(prompt_ids):].tolist()


SEGMENT_FLAGS = ["--segment-len", "4", "--tail-len", "2", "--sinks", "1", "--long-range", "0.5", "--no-color"]


def test_generate_command_streams_the_text_through_the_chat_template(model_dir, capsys):
    # the template makes <s> w10 .. w14 w4 (7 tokens, no second <s>); the tokenizer's eos is the
    # 4th token of the free continuation, so the command must stop there
    free = continuation("T<S,G>0", [1, 10, 11, 12, 13, 14, 4], 12)
    eos = free[3]
    assert eos >= 4 and eos not in free[:3] and 2 not in free[:4]  # a word, first seen there
    tokenizer = word_tokenizer(model_dir, eos=f"w{eos}")
    rc = main(["generate", str(model_dir), "--prompt", "w10 w11 w12 w13 w14", "--max-new-tokens", "12",
               *SEGMENT_FLAGS])
    out = capsys.readouterr().out
    assert rc == 0, out
    want = tokenizer.decode(free[:3])
    assert len(want.split()) == 3 and want + "\n" in out  # the eos itself is a special token, not printed
    assert "prompt: 1 x 7 tokens (chat template)" in out
    lines = out.splitlines()
    assert re.match(r"\[1/3\] load .*model and its tokenizer +\d+\.\d\d s$", lines[0])
    assert re.fullmatch(
        r"4 new tokens x 1 \(end of sequence, greedy\): prefill 7 tokens \d+\.\d\d s, "
        r"decode \d+\.\d tokens/s \(eager\); impl reference; S=4 T=2 G=1", lines[-1]), lines[-1]


def test_generate_command_decodes_through_the_fixed_shape_step_when_asked(model_dir, capsys):
    # off CUDA the CUDA-graph path runs its fixed-shape program eagerly: same tokens, path shown
    free = continuation("T<S,G>0", [1, 10, 11, 12, 13, 14, 4], 6)
    word_tokenizer(model_dir, eos="w4")
    rc = main(["generate", str(model_dir), "--prompt", "w10 w11 w12 w13 w14", "--max-new-tokens", "6",
               "--ignore-eos", "--cuda-graphs", *SEGMENT_FLAGS])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"decode \d+\.\d tokens/s \(static\); impl reference", out.splitlines()[-1]), out
    want = word_tokenizer(model_dir, eos="w4").decode(free, skip_special_tokens=True)
    assert want in out


def test_generate_command_without_chat_and_with_sampling(model_dir, capsys):
    word_tokenizer(model_dir)
    argv = ["generate", str(model_dir), "--prompt", "w10 w11 w12", "--no-chat", "--max-new-tokens", "6",
            "--ignore-eos", "--do-sample", "--top-k", "5", "--seed", "7", *SEGMENT_FLAGS]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "prompt: 1 x 4 tokens\n" in first  # the tokenizer's <s>, then the words
    assert re.search(r"^6 new tokens x 1 \(--max-new-tokens, sampled \(seed 7\)\)", first, re.M)
    assert main(argv) == 0
    again = capsys.readouterr().out

    def streamed(out):
        return out.split("tokens\n", 1)[1].splitlines()[0]
    assert streamed(again) == streamed(first) and len(streamed(first).split()) == 6


def test_generate_command_with_prompt_ids_on_the_built_in_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]]))
    flags = ["--layers", "1", "--max-new-tokens", "5", "--ignore-eos", *SEGMENT_FLAGS]
    assert main(["generate", "--prompt-ids", str(ids), *flags]) == 0
    out = capsys.readouterr().out
    rows = out.split("prompt: 2 x 5 tokens\n", 1)[1].splitlines()[:2]  # a batch: each row at the end
    assert [row.split()[0] for row in rows] == ["[0]", "[1]"]
    assert re.search(r"^5 new tokens x 2 \(--max-new-tokens, greedy\)", out, re.M)

    np.save(ids, np.array([5, 6, 7, 8, 9]))  # one prompt: its ids stream
    assert main(["generate", "--prompt-ids", str(ids), *flags]) == 0
    out = capsys.readouterr().out
    streamed = out.split("prompt: 1 x 5 tokens\n", 1)[1].splitlines()[0].split()
    assert streamed == rows[0].split()[1:]
    assert re.search(r"^5 new tokens x 1 \(--max-new-tokens, greedy\)", out, re.M)


def test_generate_command_stores_the_history_in_fp8_when_asked(tmp_path, capsys, monkeypatch):
    from segcompile.testing.models import tiny_llama

    monkeypatch.setenv("COLUMNS", "200")
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]  # 3 segments: the last one's heads see 6 history positions
    np.save(tmp_path / "ids.npy", np.array(prompt))
    assert main(["generate", "--prompt-ids", str(tmp_path / "ids.npy"), "--layers", "1", "--max-new-tokens", "6",
                 "--ignore-eos", *SEGMENT_FLAGS, "--history-dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    cfg = sc.SegmentConfig(4, tail_len=2, sink_tokens=1, long_range=sc.HeadPlan.fraction(0.5),
                           history_dtype=torch.float8_e4m3fn)
    want = sc.transform(tiny_llama(num_layers=1), cfg).generate(torch.tensor([prompt]), 6)[0, len(prompt):]
    assert out.split("prompt: 1 x 11 tokens\n", 1)[1].splitlines()[0].split() == [str(t) for t in want.tolist()]
    assert out.splitlines()[-1].endswith("S=4 T=2 G=1, history fp8")


@pytest.mark.parametrize("argv, message, hint", [
    (["--prompt", "hi"], "the built-in tiny Llama has no tokenizer", "--prompt-ids"),
    (["--prompt-ids", "missing.npy"], "--prompt-ids missing.npy: no such file", "numpy.save"),
    ([], "one of the arguments --prompt --prompt-ids is required", None),
])
def test_generate_command_user_errors(argv, message, hint, capsys):
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    if hint:
        assert "hint: " in err and hint in err


def test_generate_command_refuses_what_it_cannot_run(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "w10"]) == 2  # no tokenizer saved yet
    err = capsys.readouterr().err
    assert "has no tokenizer" in err and "tokenizer.save_pretrained" in err

    word_tokenizer(model_dir)
    assert main(["generate", str(model_dir), "--prompt", "w10", "--temperature", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--temperature: for sampling only" in err and "add --do-sample" in err

    assert main(["generate", str(model_dir), "--prompt", "w10", "--do-sample", "--top-p", "0"]) == 2
    assert "--top-p 0 keeps no token" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--prompt", "w10", "--compile"]) == 2
    assert "--compile compiles the CUDA-graph decode step" in capsys.readouterr().err
    np.save(model_dir / "ids.npy", np.array([5, 6]))
    assert main(["generate", str(model_dir), "--prompt-ids", str(model_dir / "ids.npy"), "--chat"]) == 2
    assert "--chat applies to --prompt text" in capsys.readouterr().err

    word_tokenizer(model_dir, chat_template=None)
    (model_dir / "chat_template.jinja").unlink()
    assert main(["generate", str(model_dir), "--prompt", "w10", "--chat"]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_generate_command_names_the_packages_a_gguf_file_needs(tmp_path, capsys, monkeypatch):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(cli_models, "missing_gguf_packages", lambda: ["gguf"])
    for model in (tmp_path / "model.gguf", tmp_path):  # the file, or a folder holding it
        assert main(["generate", str(model), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err
        assert "a GGUF model, but gguf not installed" in err
        assert 'pip install "gguf>=0.10" accelerate' in err
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "holds 2 .gguf files" in capsys.readouterr().err


def write_tiny_gguf(path, model) -> None:
    """``model`` (the tiny Llama) as a GGUF file, the way llama.cpp's converter lays it out: its
    tensor names, q/k rows permuted, a byte-level tokenizer of one character a token."""
    import gguf

    c = model.config

    def permuted(w, heads):  # llama.cpp's rotary layout, which transformers' loader undoes
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<pad>", "<s>", "</s>", "<unk>"] + [chr(i) for i in range(33, 33 + c.vocab_size - 4)])
    writer.add_token_types([3, 3, 3, 2] + [1] * (c.vocab_size - 4))
    writer.add_token_scores([0.0] * c.vocab_size)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            array = permuted(array, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = permuted(array, c.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_generate_command_on_a_gguf_file(tmp_path, capsys, monkeypatch):
    if cli_models.missing_gguf_packages():
        pytest.skip(f"needs {' and '.join(cli_models.missing_gguf_packages())} ({cli_models.GGUF_HINT})")
    from transformers import AutoTokenizer

    monkeypatch.setenv("COLUMNS", "200")
    model = captured("llama")[0]
    write_tiny_gguf(tmp_path / "tiny.gguf", model)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    prompt = tokenizer("abcdef")["input_ids"]
    want = tokenizer.decode(continuation("T<S,G>0", prompt, 8), skip_special_tokens=True)
    for given in (tmp_path / "tiny.gguf", tmp_path):  # the file, or the folder holding it
        rc = main(["generate", str(given), "--prompt", "abcdef", "--max-new-tokens", "8", "--ignore-eos",
                   *SEGMENT_FLAGS])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert f"prompt: 1 x {len(prompt)} tokens\n{want}\n" in out
