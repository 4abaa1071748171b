"""Where the ONNX runner runs: the provider chosen for ``device=``, the errors where onnxruntime
lacks the CUDA provider (as on this CPU-only machine), the CLI's ``--device``, and the GPU
bench's CPU smoke run (``bench/bench_onnx_gpu.py --tiny --device cpu``) with its parity numbers.

onnxruntime runs for real; only ``get_available_providers`` is replaced, to check the choice a
machine with the GPU build would make.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import captured, load_script

import segcompile as sc
from segcompile.deploy import onnxruntime_backend
from segcompile.deploy.onnx_export import export_onnx
from segcompile.deploy.onnxruntime_backend import CPU, CUDA, CUDA_OPTIONS, OnnxSegmentedModel, choose_providers
from segcompile.errors import SegcompileError
from segcompile.testing.tolerances import tolerance

HAS_CUDA_PROVIDER = CUDA in ort.get_available_providers()
GPU_BUILD = [CUDA, CPU]  # what onnxruntime-gpu reports


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    _, graph = captured("llama")
    seg = sc.transform(graph, sc.SegmentConfig(segment_len=8, long_range=sc.HeadPlan.fraction(0.5)))
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(seg, path)
    return path


# ---- the choice --------------------------------------------------------------------------------------
def test_auto_prefers_cuda_where_onnxruntime_has_it():
    assert choose_providers(None, GPU_BUILD) == [(CUDA, CUDA_OPTIONS), CPU]
    assert choose_providers(None, ["AzureExecutionProvider", CPU]) == [CPU]


def test_an_explicit_device_is_kept():
    assert choose_providers("cpu", GPU_BUILD) == [CPU]
    assert choose_providers("cuda", GPU_BUILD) == [(CUDA, CUDA_OPTIONS), CPU]
    assert CUDA_OPTIONS == {"use_tf32": "0"}  # fp32 products as PyTorch's: the parity the bench measures


def test_the_choice_reads_this_onnxruntime(monkeypatch):
    monkeypatch.setattr(onnxruntime_backend.ort, "get_available_providers", lambda: list(GPU_BUILD))
    assert choose_providers(None)[0] == (CUDA, CUDA_OPTIONS)
    monkeypatch.setattr(onnxruntime_backend.ort, "get_available_providers", lambda: [CPU])
    assert choose_providers(None) == [CPU]


def test_an_unknown_device_is_an_error():
    with pytest.raises(SegcompileError, match="device must be 'cuda', 'cpu' or None"):
        choose_providers("gpu", GPU_BUILD)


# ---- the runner --------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA_PROVIDER, reason="this onnxruntime has the CUDA provider")
def test_cuda_without_the_provider_says_what_to_install(onnx_file):
    with pytest.raises(SegcompileError) as info:
        OnnxSegmentedModel(onnx_file, device="cuda")
    message = str(info.value)
    assert "CUDAExecutionProvider" in message and "pip install onnxruntime-gpu" in message
    assert "device 'cpu'" in message  # and what works here


def test_the_provider_that_runs_is_shown(onnx_file):
    runner = OnnxSegmentedModel(onnx_file, device="cpu")
    assert (runner.provider, runner.device, runner.providers) == (CPU, "cpu", [CPU])
    assert repr(runner) == ("OnnxSegmentedModel(tiny.onnx, provider=CPUExecutionProvider, device=cpu, "
                            "dtype=float32, S=8, T=8, G=0)")
    auto = OnnxSegmentedModel(onnx_file)
    assert auto.device == ("cuda" if HAS_CUDA_PROVIDER else "cpu")
    assert OnnxSegmentedModel(onnx_file, [CPU]).provider == CPU  # onnxruntime's own list still works


def test_device_and_providers_together_is_an_error(onnx_file):
    with pytest.raises(SegcompileError, match="not both"):
        OnnxSegmentedModel(onnx_file, [CPU], device="cpu")


def test_a_copied_state_is_a_new_buffer(onnx_file):
    # copy_state copies buffer to buffer (on the device under CUDA): same values, separate storage
    runner = OnnxSegmentedModel(onnx_file, device="cpu")
    state = runner.prefill(np.arange(20).reshape(2, 10) % 96)
    copy = runner.copy_state(state)
    for name, buffer in state.buffers.items():
        assert copy.buffers[name].data_ptr() != buffer.data_ptr()
        assert np.array_equal(copy.buffers[name].numpy(), buffer.numpy())


# ---- the command ---------------------------------------------------------------------------------------
def _run(onnx_file, tmp_path, *flags):
    from segcompile.cli.main import main

    np.save(tmp_path / "ids.npy", np.arange(20) % 96)
    return main(["run", str(onnx_file), "--prompt-ids", str(tmp_path / "ids.npy"), "--max-new-tokens", "3",
                 "--no-color", *flags])


def test_cli_names_the_provider(onnx_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert _run(onnx_file, tmp_path, "--device", "cpu") == 0
    assert "runs on CPUExecutionProvider (cpu)" in capsys.readouterr().out


@pytest.mark.skipif(not HAS_CUDA_PROVIDER, reason="needs onnxruntime-gpu and a GPU")
def test_cli_runs_on_the_cuda_provider_as_on_the_cpu(onnx_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert _run(onnx_file, tmp_path, "--device", "cpu") == 0
    on_cpu = capsys.readouterr().out
    assert _run(onnx_file, tmp_path, "--device", "cuda") == 0
    on_cuda = capsys.readouterr().out
    assert "runs on CUDAExecutionProvider (cuda)" in on_cuda
    ids = [line for line in on_cpu.splitlines() if "new ids" in line]
    assert ids and ids == [line for line in on_cuda.splitlines() if "new ids" in line]  # the same greedy tokens


@pytest.mark.skipif(HAS_CUDA_PROVIDER, reason="this onnxruntime has the CUDA provider")
def test_cli_device_cuda_without_the_provider(onnx_file, tmp_path, capsys):
    assert _run(onnx_file, tmp_path, "--device", "cuda") == 2
    captured_io = capsys.readouterr()
    assert "error: device 'cuda' needs onnxruntime's CUDAExecutionProvider" in captured_io.err
    assert "pip install onnxruntime-gpu" in captured_io.err
    assert "new ids" not in captured_io.out


# ---- the bench's CPU smoke run ------------------------------------------------------------------------
def test_bench_smoke_run_on_the_cpu_provider(tmp_path, capsys):
    bench = load_script("bench", "bench_onnx_gpu")
    bench.main(["--tiny", "--device", "cpu", "--plans", "fraction(0.25)", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench_onnx_gpu-cpu.json").read_text())
    rows = {row["dtype"]: row for row in result["rows"]}
    assert set(rows) == {"float32", "float16"}
    for dtype, row in rows.items():
        assert "error" not in row and "skipped" not in row, row
        assert row["provider"] == CPU and row["model"] == "tiny" and row["plan"] == "fraction(0.25)"
        assert row["prompt_tokens"] == 4 * 16 - 4  # the decode of 16 tokens crosses the segment end at 64
        assert row["onnx_prefill_tokens_per_s"] > 0 and row["onnx_decode_ms"] > 0 and row["torch_decode_ms"] > 0
    # the numbers, against the tolerance table, not against the bench's own verdict
    assert 0 <= rows["float32"]["max_abs_error"] < tolerance(torch.float32).logits
    assert 0 <= rows["float16"]["max_rel_error"] < tolerance(torch.float16).relative
    assert rows["float32"]["within_target"] and rows["float16"]["within_target"]
    assert "onnxruntime" in result and result["onnxruntime_providers"] == ort.get_available_providers()
    out = capsys.readouterr().out
    assert "tiny  float16 fraction(0.25) CPUExecutionProvider" in out
