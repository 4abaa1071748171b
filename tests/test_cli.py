"""The `segcompile` command line: the demo end to end, user errors, dispatch and the entry point."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model, random_ids

from segcompile.cli import UsageError, demo
from segcompile.cli.main import COMMANDS, main

# 2 layers x 2 KV heads, fraction 0.25 -> one long-range KV head (layer 0); 200 tokens = 6 full
# segments of 32 and a short one of 8; then 4 decoded tokens.
SMALL = ["--layers", "2", "--tokens", "200", "--segment-len", "32", "--decode-tokens", "4", "--no-color"]
PASS_STEMS = ["00-capture", "01-find_attention", "02-plan_heads", "03-segment_loop", "04-lower"]
# per pass: text dump, the visualiser's page and DOT graph (and SVG where Graphviz is installed); index.html
PASS_DUMPS = [f"{stem}.{kind}" for stem in PASS_STEMS
              for kind in ["dot", "html", *(["svg"] if shutil.which("dot") else []), "txt"]] + ["index.html"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # rich wraps table cells at 80 columns when stdout is not a terminal; keep each row on one line
    monkeypatch.setenv("COLUMNS", "200")


def _row(out: str, check: str) -> str:
    rows = [line for line in out.splitlines() if line.strip().startswith(check)]
    assert len(rows) == 1, f"no single row for {check!r} in:\n{out}"
    return " ".join(rows[0].split())


def test_demo_writes_dumps_and_passes_every_check(tmp_path, capsys):
    rc = main(["demo", *SMALL, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out

    dumps = tmp_path / "passes"
    assert sorted(p.name for p in dumps.iterdir()) == PASS_DUMPS
    assert "segcompile.segment_attention" in (dumps / "04-lower.txt").read_text()

    assert _row(out, "forward vs oracle").endswith("< 1e-04 PASS")
    assert _row(out, "decode vs oracle").startswith("decode vs oracle (5 positions)")  # position N-1 and 4 decoded
    assert _row(out, "decode vs oracle").endswith("< 1e-04 PASS")
    # G + T + S = 4 + 32 + 32, reached at the last token of every full segment and never exceeded
    assert _row(out, "peak local-head cache") == "peak local-head cache 68 <= G+T+S = 68 PASS"
    # after 204 tokens: segment start 192, so tail 32 and current 12 -> history 160
    assert _row(out, "long-range history") == "long-range history 160 204 - 32 - 12 = 160 PASS"
    assert "2 segment_attention nodes (2 layers)" in out
    assert _row(out, "layer 0") == "layer 0 long-range KV heads [0], local [1]; sdpa -> reference"
    # the exported step program, run by onnxruntime, serves the same logits
    assert _row(out, "ONNX vs PyTorch (5 pos.)").endswith("< 1e-04 PASS")
    assert (tmp_path / "model.onnx").is_file()
    assert f"pass dumps: {dumps}" in out
    assert f"pages: {dumps / 'index.html'}" in out
    assert "all 5 checks passed" in out
    assert "\x1b[" not in out  # --no-color and not a terminal: plain text


def test_demo_exits_1_when_a_check_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "TOLERANCE", -1.0)  # no difference is below it
    rc = main(["demo", "--layers", "1", "--tokens", "40", "--segment-len", "16", "--decode-tokens", "0",
               "--long-range", "0", "--no-color", "--no-export", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert _row(out, "forward vs oracle").endswith("FAIL")
    assert _row(out, "prefill vs oracle (1 position)").endswith("FAIL")
    assert _row(out, "peak local-head cache").endswith("PASS")
    assert _row(out, "long-range history") == "long-range history - no long-range heads n/a"
    assert "FAIL: forward vs oracle" in out


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_config_error_is_one_line_without_traceback(tmp_path, capsys):
    rc = main(["demo", "--tail-len", "100", "--segment-len", "32", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 2
    errors = _error_lines(captured.err)
    assert len(errors) == 1 and "tail_len must be an int in [0, segment_len=32], got 100" in errors[0]
    assert "hint:" in captured.err and "--debug" in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "passes").exists()  # refused before any work


def test_config_error_with_debug_shows_traceback(tmp_path, capsys):
    rc = main(["demo", "--tail-len", "100", "--segment-len", "32", "--out", str(tmp_path), "--debug"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback (most recent call last)" in err
    assert "segcompile.errors.ConfigError" in err
    assert len(_error_lines(err)) == 1


def test_debug_before_the_subcommand_counts_too(tmp_path, capsys):
    assert main(["--debug", "demo", "--tail-len", "100", "--segment-len", "32", "--out", str(tmp_path)]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_validate_rejects_too_many_positions(capsys):
    assert main(["demo", "--tokens", "9000"]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [
        "error: --tokens 9000 + --decode-tokens 16 = 9016 positions, but the built-in tiny model has "
        "max_position_embeddings=8192"
    ]
    assert "hint: use --tokens 8176 or fewer" in err


@pytest.mark.parametrize("flags, message", [
    (["--tokens", "0"], "argument --tokens: must be an integer >= 1, got '0'"),
    (["--long-range", "1.5"], "argument --long-range: must be a fraction in [0, 1] or a plan JSON file, got '1.5'"),
    (["--sinks", "x"], "argument --sinks: must be an integer, got 'x'"),
])
def test_bad_flag_values_are_argparse_errors(flags, message, capsys):
    assert main(["demo", *flags]) == 2
    assert message in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+demo\s+compile the built-in tiny Llama", out, re.M)


def test_registry_imports_only_the_chosen_command(monkeypatch, capsys):
    """A command is one registry line; the others are not imported (here one cannot be)."""
    seen = {}
    fake = types.ModuleType("fake_command")
    fake.name, fake.help = "fake", "a test command"

    def subparser_init(subparsers):
        parser = subparsers.add_parser("fake", help=fake.help)
        parser.add_argument("--n", type=int, default=1)
        return parser

    def validate(args):
        if args.n > 3:
            raise UsageError(f"--n {args.n} is more than 3", hint="use --n 3 or less")

    def cmd(args):
        seen["n"] = args.n
        return 0

    fake.subparser_init, fake.validate, fake.cmd = subparser_init, validate, cmd
    monkeypatch.setitem(sys.modules, "fake_command", fake)
    monkeypatch.setitem(COMMANDS, "fake", "fake_command")
    monkeypatch.setitem(COMMANDS, "broken", "no_such_module_for_segcompile_tests")

    assert main(["fake", "--n", "2"]) == 0 and seen == {"n": 2}
    assert main(["fake", "--n", "5"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: --n 5 is more than 3", "hint: use --n 3 or less"]


def _segcompile_command() -> list[str]:
    """The installed console script beside this Python, else the module."""
    script = Path(sys.executable).parent / "segcompile"
    return [str(script)] if script.exists() else [sys.executable, "-m", "segcompile.cli.main"]


@pytest.mark.parametrize("command", [_segcompile_command(), [sys.executable, "-m", "segcompile.cli.main"]],
                         ids=["entry-point", "module"])
def test_entry_point_help(command):
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: segcompile")
    assert "demo" in done.stdout


def test_entry_point_user_error_exit_status():
    done = subprocess.run([*_segcompile_command(), "demo", "--tail-len", "100", "--segment-len", "32"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: tail_len must be an int")
    assert "Traceback" not in done.stderr


# ---- output locations: checked before any work ----------------------------------------------------
def _argv(command: str, out: Path, tmp_path: Path) -> list[str]:
    """``command`` with ``--out out`` and whatever else it needs to pass its checks."""
    if command == "run":
        model, ids = tmp_path / "model.onnx", tmp_path / "ids.npy"
        model.write_bytes(b"")  # validate checks that it exists; the command never gets to read it
        np.save(ids, np.arange(8))
        return ["run", str(model), "--prompt-ids", str(ids), "--out", str(out)]
    return [command, "--out", str(out)]


OUT_COMMANDS = ["export", "demo", "viz", "heads", "run"]


@pytest.mark.parametrize("command", OUT_COMMANDS)
def test_an_out_under_a_file_fails_before_any_work(command, tmp_path, capsys):
    # a place nobody can write (root included): under a regular file. The export used to fail so
    # only after its work (about 23 s), with a PermissionError traceback.
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    out = blocker / "sub" / ("out" if command in ("demo", "viz") else "out.file")
    assert main(_argv(command, out, tmp_path)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no stage started
    errors = _error_lines(captured.err)
    assert len(errors) == 1 and f"--out {out}" in errors[0] and f"{blocker} is a file, not a folder" in errors[0]
    assert "Traceback" not in captured.err and "hint:" in captured.err
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes in a read-only folder; the test above covers a place root cannot write")
@pytest.mark.parametrize("command", OUT_COMMANDS)
def test_an_out_in_a_read_only_folder_fails_before_any_work(command, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        out = locked / ("out" if command in ("demo", "viz") else "out.file")
        assert main(_argv(command, out, tmp_path)) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert f"cannot write in {locked}" in captured.err and "Traceback" not in captured.err
    finally:
        locked.chmod(0o755)


def test_demo_in_a_folder_it_cannot_write(tmp_path, capsys, monkeypatch):
    # the default --out, segcompile-out, is made in the current folder
    blocker = tmp_path / "here"
    blocker.write_text("")
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "here/segcompile-out"]) == 2
    err = capsys.readouterr().err
    assert "--out here/segcompile-out: cannot create" in err and "Traceback" not in err


def test_demo_refuses_a_passes_folder_of_other_files(tmp_path, capsys):
    # OUT/passes is replaced as a whole: a folder holding other files is never deleted
    passes = tmp_path / "passes"
    passes.mkdir()
    (passes / "mine.txt").write_text("keep")
    assert main(["demo", *SMALL, "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "holds files that an earlier run did not write (mine.txt)" in captured.err
    assert (passes / "mine.txt").read_text() == "keep"


def test_export_of_an_moe_model_runs_its_experts_as_batched_products(tmp_path, capsys):
    # transformers runs a Mixtral's experts with its grouped_mm op, which torch.onnx cannot
    # translate: the command loads them as batched products, says so, and the file runs
    folder = tmp_path / "mixtral"
    make_model("mixtral").save_pretrained(folder)
    out = tmp_path / "moe.onnx"
    assert main(["export", str(folder), "--segment-len", "8", "--out", str(out)]) == 0
    assert "batched products (the model's grouped_mm does not export to ONNX)" in capsys.readouterr().out
    ids = random_ids(1, 19)
    np.save(tmp_path / "ids.npy", ids.numpy())
    assert main(["run", str(out), "--prompt-ids", str(tmp_path / "ids.npy"), "--max-new-tokens", "2"]) == 0


# ---- a damaged model folder -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def truncated_model(tmp_path_factory) -> Path:
    """A saved tiny Llama whose model.safetensors lost its second half (an interrupted copy)."""
    folder = tmp_path_factory.mktemp("truncated")
    make_model("llama", layers=1).save_pretrained(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder


@pytest.mark.parametrize("command", ["export", "viz", "heads", "generate"])
def test_a_truncated_weights_file_is_named(command, truncated_model, tmp_path, capsys):
    argv = [command, str(truncated_model), "--out", str(tmp_path / "out")]
    if command == "generate":
        np.save(tmp_path / "ids.npy", np.arange(8))
        argv = [command, str(truncated_model), "--prompt-ids", str(tmp_path / "ids.npy")]
    if command == "export":
        argv[-1] += ".onnx"
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = _error_lines(err)
    assert len(errors) == 1, err
    assert f"{truncated_model / 'model.safetensors'} is not a complete safetensors file" in errors[0]
    assert "hint: the file is truncated or damaged" in err and "Traceback" not in err
