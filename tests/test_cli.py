"""The `circuit-finder` command as a new user meets it: exports that refuse what they should
(existing outputs, missing models, paths past the layer count), rys=i:j resolved from the model's
metadata, and every argument checked before a model is loaded (cf.load is replaced by a function
that fails, so a check that comes too late shows). Runs in-process through cli.main."""

from __future__ import annotations

import json

import pytest

import circuit_finder as cf
import circuit_finder.loading
from circuit_finder.cli import main, model_args_text
from helpers import write_gguf


@pytest.fixture
def no_loading(monkeypatch):
    """cf.load raises: a command that reaches it has checked its arguments too late."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cf, "load", refuse)
    monkeypatch.setattr(circuit_finder.loading, "load", refuse)  # what server.serve and the lm-eval adapter call


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_export(model_dir, tmp_path, capsys):
    folder, hf = model_dir("llama")
    src = tmp_path / "src.gguf"
    write_gguf(hf, src)
    assert main(["export", "--model", str(folder), "--layers", "0..3+1..5", "--format", "hf",
                 "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 9
    assert main(["export", "--model", str(src), "--layers", "0..3,1..5", "--format", "gguf",
                 "--out", str(tmp_path / "o.gguf")]) == 0
    assert cf.load(tmp_path / "o.gguf").num_layers == 9
    assert main(["export", "--model", str(src), "--layers", "rys=1:4", "--format", "hf",
                 "--out", str(tmp_path / "from-gguf")]) == 0
    assert cf.load(tmp_path / "from-gguf").num_layers == 9
    assert main(["export", "--model", str(folder), "--layers", "0..3,1..5", "--format", "mergekit",
                 "--out", "-"]) == 0
    assert "merge_method: passthrough" in capsys.readouterr().out
    rc, _, err = run(capsys, "export", "--model", str(folder), "--layers", "0..3,1..5", "--format", "gguf",
                     "--out", str(tmp_path / "x.gguf"))
    assert rc == 2 and "needs a .gguf source" in err
    rc, _, err = run(capsys, "export", "--model", str(src), "--layers", "0..7", "--format", "gguf",
                     "--out", str(tmp_path / "y.gguf"))
    assert rc == 2 and "out of range" in err
    assert not (tmp_path / "y.gguf").exists()


def test_cli_export_mergekit(model_dir, tmp_path, capsys, monkeypatch):
    import yaml

    folder, hf = model_dir("llama")
    out = tmp_path / "rys.yaml"
    base = ["export", "--model", str(folder), "--format", "mergekit", "--out", str(out)]
    assert main([*base, "--layers", "rys=2:4"]) == 0  # resolved with the layer count from config.json
    doc = yaml.safe_load(out.read_text())
    assert [s["sources"][0]["layer_range"] for s in doc["slices"]] == [[0, 4], [2, 6]]
    capsys.readouterr()
    rc, _, err = run(capsys, *base, "--layers", "0..5")
    assert rc == 2 and "exists" in err and "--overwrite" in err
    assert "layer path 0..3,2..5" in out.read_text()  # untouched
    assert main([*base, "--layers", "0..5", "--overwrite"]) == 0
    assert "layer path 0..5" in out.read_text()
    rc, _, err = run(capsys, "export", "--model", str(tmp_path / "nope"), "--layers", "0..5", "--format",
                     "mergekit", "--out", str(tmp_path / "n.yaml"))
    assert rc == 2 and "no such model folder" in err
    rc, _, err = run(capsys, "export", "--model", str(folder), "--layers", "0..9", "--format", "mergekit",
                     "--out", str(tmp_path / "p.yaml"))
    assert rc == 2 and "out of range" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rys.yaml"]
    monkeypatch.chdir(tmp_path)
    rc, text, err = run(capsys, "export", "--model", "org/model", "--layers", "0..12,10..29", "--format",
                        "mergekit", "--out", "-")
    assert rc == 0 and "model: org/model" in text and "not checked" in err
    rc, text, _ = run(capsys, "export", "--model", "org/model", "--layers", "rys=10:13", "--num-layers", "30",
                      "--format", "mergekit", "--out", "-")
    assert rc == 0 and "[10, 30]" in text
    rc, _, err = run(capsys, "export", "--model", "org/model", "--layers", "rys=10:13", "--format", "mergekit",
                     "--out", "-")
    assert rc == 2 and "--num-layers" in err


def test_cli_export_options(model_dir, tmp_path, capsys):
    folder, hf = model_dir("llama")
    src = tmp_path / "src.gguf"
    write_gguf(hf, src)
    cases = [(["--format", "gguf", "--model", str(src), "--dtype", "bfloat16"], "--dtype does not apply"),
             (["--format", "gguf", "--model", str(src), "--max-shard-size", "1GB"], "--max-shard-size does not"),
             (["--format", "hf", "--model", str(folder), "--mergekit-model", "a/b"], "--mergekit-model does not"),
             (["--format", "hf", "--model", str(folder), "--dtype", "int4"], "not supported"),
             (["--format", "hf", "--model", str(folder), "--max-shard-size", "lots"], "max_shard_size"),
             (["--format", "mergekit", "--model", str(src)], "--mergekit-model"),
             (["--format", "mergekit", "--model", str(folder), "--force"], "--force does not apply")]
    for extra, message in cases:
        rc, _, err = run(capsys, "export", "--layers", "0..5", "--out", str(tmp_path / "x"), *extra)
        assert rc == 2 and message in err, (extra, err)
    rc, _, err = run(capsys, "export", "--model", str(src), "--layers", "0..5", "--format", "gguf", "--out", "-")
    assert rc == 2 and "only for --format mergekit" in err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    rc, _, err = run(capsys, "export", "--model", str(folder), "--layers", "0..5", "--format", "hf",
                     "--out", str(tmp_path / "mine"), "--overwrite")
    assert rc == 2 and "thesis.tex" in err and (tmp_path / "mine" / "thesis.tex").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "src.gguf"]


def test_cli_export_from_gguf_checks_before_reading_weights(model_dir, tmp_path, capsys, monkeypatch):
    import circuit_finder.gguf

    _, hf = model_dir("llama")
    src = tmp_path / "src.gguf"
    write_gguf(hf, src)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were read before the arguments were checked")

    monkeypatch.setattr(circuit_finder.gguf, "read_gguf", refuse)
    base = ["export", "--model", str(src), "--format", "hf"]
    for extra, message in [(["--layers", "0..9", "--out", str(tmp_path / "o")], "out of range"),
                           (["--layers", "0..5", "--out", str(tmp_path / "taken")], "exists"),
                           (["--layers", "0..5", "--out", str(tmp_path / "o"), "--dtype", "int4"], "not supported")]:
        rc, _, err = run(capsys, *base, *extra)
        assert rc == 2 and message in err, (extra, err)


def test_cli_names_missing_extras(model_dir, capsys, monkeypatch):
    import importlib.util

    folder, _ = model_dir("llama")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("uvicorn", "lm_eval") else real(name, *a))
    rc, _, err = run(capsys, "serve", "--model", str(folder))
    assert rc == 2 and "pip install 'circuit-finder[serve]'" in err
    rc, _, err = run(capsys, "eval", "--model", str(folder), "--tasks", "x")
    assert rc == 2 and "pip install 'circuit-finder[eval]'" in err


def test_cli_sweep_checks_before_loading(model_dir, tmp_path, capsys, no_loading):
    folder, _ = model_dir("llama")
    out = str(tmp_path / "s.jsonl")
    sweep = ["sweep", "--model", str(folder), "--no-progress"]
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "2+2?", "answer": "4"}\n{"prompt": oops}\n')
    cases = [(["--probes", str(tmp_path / "missing.jsonl"), "--out", out], "missing.jsonl: no such probe file"),
             (["--probes", str(bad_jsonl), "--out", out], "bad.jsonl:2: not valid JSON"),
             (["--probes", "maths", "--out", out], "unknown probe 'maths'"),
             (["--probes", "math", "math", "--out", out], "two probes are named 'math'"),
             (["--paths", "0..3,x", "--out", out], "--paths '0..3,x'"),
             (["--paths", "0..9", "--out", out], "out of range"),
             (["--out", str(tmp_path / "no-dir" / "s.jsonl")], "no such folder"),
             (["--out", str(tmp_path)], "is a folder"),
             (["--out", out, "--heatmap", str(tmp_path / "no-dir" / "h.png")], "no such folder"),
             (["--out", out, "--heatmap", str(tmp_path / "h.bmpx")], "unknown image format"),
             (["--out", out, "--metric", "combined_dleta"], "--metric 'combined_dleta'"),
             (["--out", out, "--metric", "math_val_delta"], "--metric 'math_val_delta'"),
             (["--out", out, "--model", str(tmp_path / "nope")], "no such model folder"),
             (["--out", out, "--device", "gpu"], "not a torch device"),
             (["--out", out, "--dtype", "float8"], "not supported"),
             (["--out", out, "--by", "math_dleta"], "by='math_dleta' is not a search column"),
             (["--out", out, "--by", "math_margin_delta"], "of a mode='generate' sweep"),
             (["--out", out, "--strategy", "beam", "--budget", "3", "--by", "combined_q"],
              "'beam' optimises combined_delta or <probe>_delta"),
             (["--out", out, "--seeds", "4"], "--seeds applies to --strategy beam, not grid"),
             (["--out", out, "--strategy", "beam", "--budget", "3", "--kappa", "2"],
              "--kappa applies to --strategy surrogate, not beam"),
             (["--out", out, "--paths", "0..5", "--refine-top", "2"], "--refine-top applies to --strategy refine"),
             (["--out", out, "--strategy", "surrogate"], "needs --budget N"),
             (["--out", out, "--strategy", "beam", "--budget", "3", "--stride", "2"], "pass refine_stride=2"),
             (["--out", out, "--refine-stride", "2"], "refine_stride= applies to strategies refine"),
             (["--out", out, "--think-tokens", "64"], "pass --thinking with it"),
             (["--out", out, "--strategy", "beam", "--budget", "3", "--paths", "0..5"], "strategy 'beam' does not take"),
             (["--out", out, "--strategy", "beam", "--budget", "3", "--times", "3"], "'beam' grows blocks that run twice")]
    for extra, message in cases:
        rc, _, err = run(capsys, *sweep, *extra)
        assert rc == 2 and message in err, (extra, err)
    assert not (tmp_path / "s.jsonl").exists()
    with pytest.raises(SystemExit):
        main([*sweep, "--out", out, "--block-sizes", "0"])


def test_cli_generate_and_serve_check_before_loading(model_dir, tmp_path, capsys, no_loading):
    folder, _ = model_dir("llama")
    cases = [(["generate", "--model", str(folder), "--layers", "0..2,0..9", "hi"], "out of range"),
             (["generate", "--model", str(folder), "--layers", "rys=4:2", "hi"], "--layers 'rys=4:2'"),
             (["generate", "--model", str(folder), "--top-p", "2", "hi"], "top_p"),
             (["generate", "--model", str(tmp_path / "nope"), "hi"], "no such model folder"),
             (["serve", "--model", str(folder), "--layers", "0..9"], "out of range"),
             (["serve", "--model", str(folder), "--port", "70000"], "not a TCP port"),
             (["generate", "--model", str(folder), "--device-map", "cpu=5", "hi"], "places 5 layers; the model has 6"),
             (["generate", "--model", str(folder), "--device-map", "cuda:9=6", "hi"], "names cuda:9"),
             (["serve", "--model", str(folder), "--device-map", '{"0": "cpu"}'], "no device to layer(s) 1-5"),
             (["generate", "--model", str(folder), "--max-memory", "cpu=1GiB", "hi"], "--max-memory budgets a"),
             (["generate", "--model", str(folder), "--device-map", "auto", "--max-memory", "cpu=x", "hi"],
              "not a size")]
    for argv, message in cases:
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and message in err, (argv, err)


def test_cli_eval_model_args(model_dir, capsys, no_loading):
    folder, _ = model_dir("llama")
    assert model_args_text("m", "0..3,1..5", None) == "pretrained=m,layers=0..3+1..5"
    assert model_args_text("m", "rys=1:4", "bfloat16", num_layers=6) == "pretrained=m,layers=rys=1:4,dtype=bfloat16"
    with pytest.raises(cf.LayerPathError):
        model_args_text("m", "rys=1:9", None, num_layers=6)
    assert (model_args_text("m", None, None, 6, "cuda:0=4, cpu=2", "cuda:0=20GiB,cpu=64GiB")
            == "pretrained=m,device_map=cuda:0=4+cpu=2,max_memory=cuda:0=20GiB+cpu=64GiB")
    with pytest.raises(ValueError, match="DEVICE=COUNT form"):
        model_args_text("m", None, None, 6, '{"0": "cpu"}')
    assert (model_args_text("m", None, None, 6, weights={"dequantize": True, "quantize": None, "activations": "float"})
            == "pretrained=m,dequantize=true")
    assert (model_args_text("m", None, None, 6, weights={"dequantize": False, "quantize": "q4_k_m", "activations": "q8"})
            == "pretrained=m,quantize=q4_k_m,activations=q8")
    rc, _, err = run(capsys, "eval", "--model", str(folder), "--layers", "0..9", "--tasks", "x")
    assert rc == 2 and "out of range" in err


def test_example_script_runs(chat_model_dir, monkeypatch, capsys):
    """examples/rys_compare.py against the current API: one section per path, an answer per question."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "rys_compare.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--model", str(chat_model_dir), "--block", "2"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    print(out)
    assert out.count("== ") == 4 and out.count(" -> ") == 12
    assert "== 0..5 (6 slots)" in out
