"""The GPU check's CPU-safe part: argument parsing, the 8B shape built on meta, and the whole measurement
path and report on a tiny shape on this CPU, so the script a GPU machine runs cannot rot."""

import json

from benchmarks import gpu_check


def test_arguments_default_to_the_product_shape_on_cuda():
    args = gpu_check.parse_args([])
    assert (args.device, args.shape, args.clients) == ("cuda", "llama-3-8b", 64)


def test_the_8b_shape_builds_on_meta_with_llama_3_8b_size(capsys):
    from benchmarks.tiny_model import real_shape_model

    model = real_shape_model("llama-3-8b", 128256, __import__("torch").bfloat16, "meta")
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Llama-3-8B's parameter count
    assert gpu_check.main(["--dry-run"]) == 0
    assert "8.03 B parameters, 16.06 GB" in capsys.readouterr().out


def test_measurement_path_and_report_on_cpu(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert gpu_check.main(["--device", "cpu", "--shape", "tiny", "--skip-tests", "--clients", "3",
                           "--output-len", "6", "--single-requests", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    serve = report["serve"]
    assert serve["batch1_decode_tok_s"] > 0 and serve["clients_output_tok_s"] > 0
    assert serve["hf_batch"]["batch"] == 3 and serve["hf_batch1"]["requests"] == 2
    assert serve["ttft_s"]["p50"] <= serve["ttft_s"]["p99"]
    text = capsys.readouterr().out
    assert "batch-1 decode" in text and "3 clients" in text and "TPOT p50/p99" in text


def test_report_names_failed_tests():
    report = {"device_name": "NVIDIA H100", "shape": "llama-3-8b", "weights_gb": 16.06, "dtype": "bfloat16",
              "device": "cuda", "tests": {"summary": "1 failed, 99 passed", "returncode": 1,
                                          "failures": ["FAILED tests/model/test_families.py::x[gemma]"]}}
    text = gpu_check.report_text(report)
    assert "1 failed, 99 passed (exit 1)" in text and "x[gemma]" in text


def test_without_cuda_the_check_says_so(capsys):
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    assert gpu_check.main(["--skip-tests"]) == 2
    assert "no CUDA device here" in capsys.readouterr().err
