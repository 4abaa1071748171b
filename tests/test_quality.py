"""Quality measures (segcompile.quality) and `segcompile eval`, on the tiny Llama whose tokens are
UTF-8 bytes: band bookkeeping against full attention and the oracle, passkey prompts and their
scoring (with a stub model whose logits the test controls), and the command end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import segcompile as sc
from segcompile.cli.main import main
from segcompile.quality import (
    BANDS,
    ByteTokenizer,
    EvalError,
    band_token_counts,
    build_prompt,
    documents,
    greedy_tokens,
    last_logits,
    measure_passkey,
    measure_perplexity,
    passkey_prompts,
    score_trial,
    split_of,
    token_nll,
    token_sequences,
)
from segcompile.quality import passkey as passkey_module
from segcompile.quality import plot
from segcompile.quality.texts import encode
from segcompile.testing.models import tiny_llama
from segcompile.testing.tolerances import assert_close, tolerance

S, T, G = 16, 8, 2
N = 100  # 6 segments of 16 and a short one: every band has tokens
FP32 = tolerance(torch.float32)
TOKENS = ByteTokenizer()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich would wrap table rows at 80 columns


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(num_layers=2)
    return model, sc.capture(model)


@pytest.fixture(scope="module")
def sequences():
    return token_sequences(TOKENS, N, 2)


def config(plan: sc.HeadPlan) -> sc.SegmentConfig:
    return sc.SegmentConfig(segment_len=S, tail_len=T, sink_tokens=G, long_range=plan)


# ---- texts ------------------------------------------------------------------------------------------
def test_texts_split_by_name_and_sequences_are_document_prefixes(sequences):
    heldout, calibration = documents("heldout"), documents("calibration")
    assert heldout and calibration
    assert not {d.name for d in heldout} & {d.name for d in calibration}
    assert {d.name for d in heldout} | {d.name for d in calibration} == {d.name for d in documents(None)}
    assert all(split_of(d.name) == "heldout" for d in heldout)
    assert len(sequences) == 2 and len({s.document.name for s in sequences}) == 2
    for s in sequences:
        assert s.ids.tolist() == encode(TOKENS, s.document.text())[:N]
        assert s.describe()["split"] == "heldout" and len(s.describe()["sha256"]) == 64


# ---- perplexity -------------------------------------------------------------------------------------
def test_band_token_counts():
    assert band_token_counts(N, S) == {"segment 0": 16, "1 back": 16, "2+ back": 67}
    assert band_token_counts(17, 16) == {"segment 0": 16, "1 back": 0, "2+ back": 0}  # position 16 predicts nothing
    assert band_token_counts(40, 16) == {"segment 0": 16, "1 back": 16, "2+ back": 7}


def test_segmented_bands_against_full_attention_and_oracle(llama, sequences):
    model, graph = llama
    cfg = config(sc.HeadPlan.none())
    seg = sc.transform(graph, cfg)
    full = measure_perplexity(model, sequences, S)
    local = measure_perplexity(seg, sequences, S)
    for result in (full, local):
        assert {b: result.bands[b].tokens for b in BANDS} == {b: 2 * c for b, c in band_token_counts(N, S).items()}
        assert result.overall.tokens == 2 * (N - 1) == sum(s.tokens for s in result.by_segment)
        assert result.overall.nll == pytest.approx(sum(result.bands[b].nll for b in BANDS), rel=1e-12)
    # the first segment has nothing before it: segmented == full there
    assert local.bands["segment 0"].mean_nll == pytest.approx(full.bands["segment 0"].mean_nll, abs=FP32.logits)
    # ... token by token, and not two segments back, where the local heads lose their history
    ids = sequences[0].ids
    change = (token_nll(seg, ids) - token_nll(model, ids)).abs()
    assert change[:S].max() <= FP32.logits and change[2 * S:].max() > 1e-2
    # every scored token, against the dense oracle
    logprobs = torch.log_softmax(sc.oracle.forward(model, cfg, ids[None])[0, :-1].double(), -1)
    want = -logprobs.gather(-1, ids[1:, None])[:, 0]
    assert_close(token_nll(seg, ids), want, torch.float32, what="segmented token NLL vs oracle")


def test_plan_all_equals_full_attention_in_every_band(llama, sequences):
    model, graph = llama
    seg = sc.transform(graph, config(sc.HeadPlan.all()))
    for s in sequences:
        assert_close(token_nll(seg, s.ids), token_nll(model, s.ids), torch.float32, what="plan all vs the model")
    full, every = measure_perplexity(model, sequences, S), measure_perplexity(seg, sequences, S)
    for band in BANDS:
        assert every.bands[band].tokens == full.bands[band].tokens
        assert every.bands[band].mean_nll == pytest.approx(full.bands[band].mean_nll, abs=FP32.logits)


def test_perplexity_refuses_mixed_lengths(sequences):
    shorter = token_sequences(TOKENS, N - 1, 1)
    with pytest.raises(EvalError, match="one length"):
        measure_perplexity(torch.nn.Linear(1, 1), [*sequences, *shorter], S)


# ---- passkey prompts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0.2, 0.5, 0.7])
def test_passkey_prompt_has_the_length_and_the_key_at_the_depth(depth):
    length, key = 1000, "31415"  # bytes: the instruction alone is 144 tokens
    prompt = build_prompt(TOKENS, length, depth, key)
    assert prompt.ids.numel() == length
    text = TOKENS.decode(prompt.ids.tolist())
    needle = passkey_module.NEEDLE.format(key=key)
    assert TOKENS.decode(prompt.ids[prompt.needle_start: prompt.needle_end].tolist()) == needle
    assert text.count(key) == 2  # stated twice in the needle, nowhere else
    longest_sentence = max(len(s) for s in passkey_module.FILLER)
    assert abs(prompt.needle_start - depth * length) <= longest_sentence / 2 + 1
    assert text.endswith(passkey_module.QUESTION)
    assert TOKENS.decode(prompt.answer.tolist()) == " " + key
    assert prompt.scored == (False, True, True, True, True, True)  # the space is fed, the digits scored


def test_passkey_prompts_are_seeded_and_spread_over_depths():
    first, again = passkey_prompts(TOKENS, [320, 400], 4, seed=0), passkey_prompts(TOKENS, [320, 400], 4, seed=0)
    assert [p.key for p in first] == [p.key for p in again]
    assert [p.key for p in first] != [p.key for p in passkey_prompts(TOKENS, [320, 400], 4, seed=1)]
    assert [p.depth for p in first[:4]] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert all(len(p.key) == 5 and p.key.isdigit() for p in first)


def test_passkey_prompt_too_short_is_refused():
    with pytest.raises(EvalError, match="needs at least"):
        build_prompt(TOKENS, 100, 0.5, "12345")


# ---- passkey scoring ----------------------------------------------------------------------------------
class ScriptedLM(torch.nn.Module):
    """A stand-in model whose argmax at position i is ``script[i + 1]``: it "knows" a fixed text."""

    def __init__(self, script: torch.Tensor, vocab: int = 256):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the stub a device

    def forward(self, input_ids):
        n = input_ids.shape[1]
        logits = torch.zeros(1, n, self.vocab)
        logits[0, torch.arange(n), self.script[1: n + 1]] = 10.0
        return SimpleNamespace(logits=logits)


def scripted(prompt, answer: str) -> ScriptedLM:
    return ScriptedLM(torch.cat([prompt.ids, torch.tensor(encode(TOKENS, answer))]))


def test_passkey_scoring_counts_every_digit_argmax_as_correct():
    prompt = build_prompt(TOKENS, 320, 0.5, "27182")
    right = score_trial(scripted(prompt, " 27182"), prompt)
    assert (right.correct, right.digits_correct, right.digits) == (True, 5, 5)
    one_digit_off = score_trial(scripted(prompt, " 27183"), prompt)
    assert (one_digit_off.correct, one_digit_off.digits_correct) == (False, 4)
    unscored_space_wrong = score_trial(scripted(prompt, "_27182"), prompt)
    assert unscored_space_wrong.correct
    result = measure_passkey(scripted(prompt, " 27182"), [prompt, prompt])
    assert result.by_length() == {320: {"correct": 2, "trials": 2, "accuracy": 1.0}}
    assert result.by_depth()["30%-50%"]["trials"] == 0 and result.by_depth()["50%-70%"]["correct"] == 2


def test_segmented_answer_logits_match_oracle_and_generation_matches_model(llama):
    model, graph = llama
    prompt = build_prompt(TOKENS, 320, 0.3, "16180")
    fed = torch.cat([prompt.ids, prompt.answer[:-1]])[None]
    count = prompt.answer.numel()
    cfg = sc.SegmentConfig(segment_len=64, sink_tokens=G, long_range=sc.HeadPlan.none())
    seg = sc.transform(graph, cfg)
    assert_close(last_logits(seg, fed, count), sc.oracle.forward(model, cfg, fed)[0, -count:], torch.float32,
                 what="segmented answer logits vs oracle")
    with torch.no_grad():
        want = model(fed).logits[0, -count:]
    assert_close(last_logits(model, fed, count), want, torch.float32, what="the model's last logits")
    every = sc.transform(graph, sc.SegmentConfig(segment_len=64, sink_tokens=G, long_range=sc.HeadPlan.all()))
    assert greedy_tokens(every, prompt.ids[None], 4) == greedy_tokens(model, prompt.ids[None], 4)
    trial = score_trial(every, prompt, TOKENS, generate=True)
    assert trial.generated is not None and trial.generated_correct is not None


# ---- segcompile eval -------------------------------------------------------------------------------------
TINY = ["--layers", "2", "--segment-len", str(S), "--tail-len", str(T), "--sinks", str(G), "--no-color"]


def test_eval_ppl_writes_the_table_and_result_file(tmp_path, capsys, monkeypatch):
    out, png = tmp_path / "ppl.json", tmp_path / "ppl.png"
    monkeypatch.setattr(plot, "available", lambda: False)  # as without matplotlib: said, and skipped
    rc = main(["eval", "--task", "ppl", "--lengths", str(N), "--long-range", "full", "none", "all",
               "--sequences", "2", "--out", str(out), "--plot", str(png), *TINY])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "matplotlib is not installed" in printed and not png.exists()
    for plan in ("full", "none", "all"):
        assert any(line.split()[:2] == [plan, str(N)] for line in printed.splitlines()), printed
    result = json.loads(out.read_text())
    assert result["task"] == "ppl" and result["command"].startswith("segcompile eval --task ppl --layers 2")
    assert result["model"]["class"] == "LlamaForCausalLM" and result["device"]["device"] == "cpu"
    assert result["config"] == {"segment_len": S, "tail_len": T, "sink_tokens": G, "lengths": [N], "seed": 0,
                                "history_dtypes": ["model"]}
    used = result["texts"]["sequences"][str(N)]
    heldout = {d.name for d in documents("heldout")}
    assert len(used) == 2 and all(t["name"] in heldout and t["tokens_used"] == N for t in used)
    counts = band_token_counts(N, S)
    full, every = result["results"]["full"][str(N)], result["results"]["all"][str(N)]
    for band in BANDS:
        assert result["results"]["none"][str(N)]["bands"][band]["tokens"] == 2 * counts[band]
        assert every["bands"][band]["mean_nll"] == pytest.approx(full["bands"][band]["mean_nll"], abs=FP32.logits)
    assert result["plans"]["none"]["long_range_share"] == "0/4"


def test_eval_runs_each_plan_per_history_dtype_as_the_oracle_of_its_config(tmp_path, capsys, llama, sequences):
    out = tmp_path / "ppl.json"
    rc = main(["eval", "--task", "ppl", "--lengths", str(N), "--long-range", "full", "0.5",
               "--history-dtype", "model", "fp8", "--sequences", "2", "--out", str(out), *TINY])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    result = json.loads(out.read_text())
    assert list(result["results"]) == ["full", "fraction(0.5)", "fraction(0.5) fp8"]  # full: once, no history
    assert "--history-dtype model fp8" in result["command"]
    assert result["plans"]["fraction(0.5)"]["history_dtype"] == "model"
    assert result["plans"]["fraction(0.5) fp8"]["history_dtype"] == "float8_e4m3fn"
    assert any(line.split()[:3] == ["fraction(0.5)", "fp8", str(N)] for line in printed.splitlines()), printed
    model, _ = llama
    total = {}
    for label, dtype in (("fraction(0.5)", None), ("fraction(0.5) fp8", torch.float8_e4m3fn)):
        cfg = sc.SegmentConfig(segment_len=S, tail_len=T, sink_tokens=G, long_range=sc.HeadPlan.fraction(0.5),
                               history_dtype=dtype)
        total[label] = 0.0
        for s in sequences:  # the eval's sequences: the first 2 held-out documents of N tokens
            logprobs = torch.log_softmax(sc.oracle.forward(model, cfg, s.ids[None])[0, :-1].double(), -1)
            total[label] += -logprobs.gather(-1, s.ids[1:, None]).sum().item()
        got = result["results"][label][str(N)]["overall"]["nll"]
        assert got == pytest.approx(total[label], abs=2 * (N - 1) * FP32.logits), label
    # the two histories give different numbers: the fp8 row is not the model-dtype row again
    fp8, unquantised = (result["results"][k][str(N)]["overall"]["nll"] for k in ("fraction(0.5) fp8", "fraction(0.5)"))
    assert abs(fp8 - unquantised) > 2 * (N - 1) * FP32.logits


def test_eval_passkey_writes_accuracy_by_length_and_depth(tmp_path, capsys):
    out = tmp_path / "passkey.json"
    rc = main(["eval", "--task", "passkey", "--lengths", "320", "--long-range", "none", "--trials", "2",
               "--out", str(out), *TINY])
    assert rc == 0, capsys.readouterr().out
    result = json.loads(out.read_text())["results"]["none"]
    assert result["by_length"]["320"]["trials"] == 2 and len(result["trials"]) == 2
    assert sum(v["trials"] for v in result["by_depth"].values()) == 2


@pytest.mark.parametrize("flags, message", [
    (["--task", "ppl", "--long-range", "fraction(2)"], "fraction"),
    (["--task", "ppl", "--long-range", "layers(a)"], "layers"),
    (["--task", "ppl", "--long-range", "none", "none"], "more than once"),
    (["--task", "ppl", "--long-range", "no-such-plan.json"], "no such plan file"),
    (["--task", "ppl", "--trials", "3"], "for --task passkey only"),
    (["--task", "ppl", "--generate"], "for --task passkey only"),
    (["--task", "passkey", "--sequences", "3"], "for --task ppl only"),
    (["--task", "ppl", "--segment-len", "16", "--tail-len", "32"], "tail_len"),
    (["--task", "passkey", "--lengths", "100", "--layers", "1"], "needs at least"),
    (["--task", "ppl", "--lengths", "100000000", "--layers", "1"], "has 100000000 tokens"),
    (["no-such-model", "--task", "ppl"], "no-such-model"),
    (["--task", "ppl", "--layers", "1", "--lengths", "1"], "at least 2 tokens"),
])
def test_eval_refuses_bad_arguments(tmp_path, capsys, flags, message):
    out = tmp_path / "result.json"
    rc = main(["eval", *flags, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not out.exists()


def test_eval_refuses_an_output_folder(tmp_path, capsys):
    assert main(["eval", "--task", "ppl", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_eval_draws_the_plots_where_matplotlib_is_installed(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the plot is optional: pip install matplotlib")
    for task, lengths in (("ppl", [str(N)]), ("passkey", ["320"])):
        png = tmp_path / f"{task}.png"
        rc = main(["eval", "--task", task, "--lengths", *lengths, "--long-range", "full", "none",
                   "--out", str(tmp_path / f"{task}.json"), "--plot", str(png), *TINY,
                   *(["--sequences", "1"] if task == "ppl" else ["--trials", "1"])])
        assert rc == 0, capsys.readouterr().out
        assert png.read_bytes().startswith(b"\x89PNG")


def test_eval_refuses_an_output_under_a_file_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for flag in ("--out", "--plot"):
        assert main(["eval", "--task", "ppl", flag, str(blocker / "result")]) == 2
        assert f"{flag} {blocker / 'result'}" in capsys.readouterr().err
