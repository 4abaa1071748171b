"""bench/tbptt_regimes.py --quick runs every regime on CPU and writes a well-formed result."""

from __future__ import annotations

import importlib.util
import json

from conftest import load_script


def load_bench():
    return load_script("bench", "tbptt_regimes")


def test_quick_run_writes_all_four_regimes(tmp_path, capsys):
    bench = load_bench()
    bench.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "tbptt_regimes-quick-cpu.json").read_text())

    assert list(report["regimes"]) == ["full", "full->seg", "seg k=1", "seg k=0"]
    n_buckets = report["config"]["seq_len"] // report["config"]["segment_len"]
    for name, r in report["regimes"].items():
        assert 0 <= r["accuracy"] <= 1, name
        assert set(r["accuracy_by_segments_back"]) <= {str(b) for b in range(n_buckets)}, name
        assert all(0 <= a <= 1 for a in r["accuracy_by_segments_back"].values()), name
        assert sum(r["answers_by_segments_back"].values()) == report["config"]["eval_batches"] * report["config"]["batch_size"] * report["config"]["queries"]
        assert r["train_seconds"] > 0 and r["loss_curve"][-1][0] == report["config"]["steps"]
    assert report["regimes"]["full->seg"]["loss_curve"] == report["regimes"]["full"]["loss_curve"]  # one trained model
    assert report["command"] == "python bench/tbptt_regimes.py --quick"  # where it wrote is left out
    out = capsys.readouterr().out
    assert "answer accuracy by segments back" in out and "seg k=0" in out


def test_accuracy_against_steps_is_recorded_for_every_regime(tmp_path):
    bench = load_bench()
    report = bench.main(["--quick", "--eval-every", "10", "--regimes", "full", "full->seg", "seg k=1", "seg k=0",
                         "--out", str(tmp_path)])
    assert report["command"] == "python bench/tbptt_regimes.py --quick --eval-every 10 --regimes full 'full->seg' 'seg k=1' 'seg k=0'"
    steps = report["config"]["steps"]
    for name, r in report["regimes"].items():
        curve = r["accuracy_curve"]
        assert [p[0] for p in curve] == list(range(10, steps + 1, 10)), name
        assert curve[-1][1] == r["accuracy"] and curve[-1][2] == r["accuracy_by_segments_back"], name  # the last point is the final model
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional, as the script says
        assert (tmp_path / "tbptt_regimes-quick-cpu.png").exists()


def test_the_full_to_segmented_probe_sees_every_update():
    """full->seg is transformed before the full regime trains and evaluated along the way: it must
    read the weights as they are, not as they were when it was captured."""
    import torch

    import segcompile as sc
    from segcompile.testing import recall_task

    bench = load_bench()
    args = bench.parse_args(["--quick"])
    args.steps = 3
    vocab = bench.vocab_of(args)
    model = bench.build_model(args, vocab.size, torch.device("cpu"))
    early = sc.transform(model, bench.segment_config(args, 1))
    ids, _, _ = recall_task.batch(torch.Generator().manual_seed(5), 2, args.seq_len, pairs=args.pairs,
                                  queries=args.queries, vocab=vocab)
    with torch.no_grad():
        before = early(ids).logits
    bench.train("full", model, bench.full_backward(model), args, torch.device("cpu"))
    with torch.no_grad():
        after = early(ids).logits
        fresh = sc.transform(model, bench.segment_config(args, 1))(ids).logits
    assert (after - before).abs().max() > 1e-3  # training moved the weights it reads
    torch.testing.assert_close(after, fresh, rtol=1e-5, atol=1e-5)
