"""Export of layer paths: Hugging Face folders (loaded by transformers), GGUF (read back with the
gguf reader, loaded again by circuit-finder, by llama.cpp when installed), mergekit YAML; clear
errors, no partial files, ordinary permissions, and --overwrite replacing only our own exports.
The `circuit-finder export` command is tested in test_cli.py."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

import circuit_finder as cf
from circuit_finder import LayerPath
from circuit_finder.export import export_mergekit, mergekit_source, remap_config
from helpers import ATTN_IMPLEMENTATION, build_hf_model, llama_cpp_model, llama_cpp_or_skip, write_gguf

PATH = LayerPath.parse("0..3,1..3,4,5")  # RYS (1, 4) on 6 layers: 9 slots


def ids(batch=2, length=12, seed=0):
    return torch.randint(3, 160, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_hf_export_loads_in_transformers(model_dir, arch, tmp_path, shard):
    from transformers import AutoModelForCausalLM

    folder, _ = model_dir(arch)
    dst = tmp_path / "exported"
    kwargs = {"max_shard_size": shard} if shard else {}
    cf.export_hf(folder, dst, PATH, **kwargs)
    config = json.loads((dst / "config.json").read_text())
    assert config["num_hidden_layers"] == len(PATH)
    assert (dst / "model.safetensors.index.json").exists() == (shard is not None)
    hf = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32,  # Gemma 2 soft-caps: eager
                                              attn_implementation=ATTN_IMPLEMENTATION.get(arch, "sdpa"))
    x = ids()
    with torch.no_grad():
        theirs = hf(x).logits
    ours = cf.load(folder).logits(x, layers=PATH)
    diff = (theirs - ours).abs()
    print(f"{arch} HF export vs our path: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}")
    assert diff.max() < 1e-4
    if config.get("layer_types"):
        src_types = json.loads((folder / "config.json").read_text())["layer_types"]
        assert config["layer_types"] == [src_types[i] for i in PATH]


def test_hf_export_from_loaded_model_and_dtype(model_dir, tmp_path):
    from safetensors import safe_open

    folder, _ = model_dir("qwen2")
    model = cf.load(folder)
    dst = cf.export_hf(model, tmp_path / "bf16", PATH, dtype="bfloat16")
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.4.self_attn.q_proj.weight").dtype == torch.bfloat16
        assert torch.equal(f.get_tensor("model.layers.4.mlp.up_proj.weight"),
                           model.tensors["model.layers.1.mlp.up_proj.weight"].bfloat16())
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = cf.load(dst)  # a loaded export is never replaced by an export of itself
    with pytest.raises(ValueError, match="is the source model"):
        cf.export_hf(again, dst, "0..8", overwrite=True)


def test_hf_export_copies_generation_and_processor_settings(model_dir, tmp_path):
    """generation_config.json (sampling defaults) and a multimodal model's processor files go with
    the export, from a folder and from a Model loaded from one; the export is still replaceable."""
    import shutil

    folder, _ = model_dir("llama")
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    side = {"generation_config.json": {"temperature": 0.3, "top_p": 0.9},
            "preprocessor_config.json": {"image_size": 224}, "processor_config.json": {"processor_class": "X"}}
    for name, content in side.items():
        (src / name).write_text(json.dumps(content))
    for source, dst in ((src, tmp_path / "from-folder"), (cf.load(src), tmp_path / "from-model")):
        cf.export_hf(source, dst, PATH)
        assert {name: json.loads((dst / name).read_text()) for name in side} == side
        cf.export_hf(source, dst, "0..5", overwrite=True)


def test_hf_export_keeps_qwen2_full_layers_full_past_max_window_layers(tmp_path):
    """A published Qwen2 config (no layer_types) with use_sliding_window: layers from
    max_window_layers on slide. All 6 layers are full here; along a 9-slot path, slots 6..8 would
    slide in the export unless it says otherwise. Its logits in transformers equal the path's on a
    prompt longer than the window."""
    from transformers import AutoModelForCausalLM

    build_hf_model("qwen2", tmp_path / "src", use_sliding_window=True, sliding_window=8, max_window_layers=6)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config.pop("layer_types", None)
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    assert cf.load(tmp_path / "src").config.sliding_window == (0,) * 6
    dst = cf.export_hf(tmp_path / "src", tmp_path / "out", PATH)
    assert cf.load(dst).config.sliding_window == (0,) * len(PATH)
    x = ids(1, 24)
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32)(x).logits
    diff = (theirs - cf.load(tmp_path / "src").logits(x, layers=PATH)).abs()
    print(f"qwen2 export past max_window_layers vs the path: max abs diff {diff.max():.3e}")
    assert diff.max() < 1e-4


def test_remap_config_lists():
    config = {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"], "architectures": ["X"],
              "no_rope_layers": [1, 0, 1, 0], "eos_token_id": [1, 2, 3, 4]}
    out = remap_config(config, LayerPath.parse("0..2,1,2,3"))
    assert out["num_hidden_layers"] == 6 and out["layer_types"] == ["a", "b", "c", "b", "c", "d"]
    assert out["no_rope_layers"] == [1, 0, 1, 0, 1, 0] and out["eos_token_id"] == [1, 2, 3, 4]
    assert config["layer_types"] == ["a", "b", "c", "d"]  # the source is untouched
    quant = {"num_hidden_layers": 4, "quantization_config": {"ignore": ["lm_head", "re:.*layers\\.[0-9]+\\.gate",
                                                                        "model.layers.1.mlp.down_proj"]}}
    out = remap_config(quant, LayerPath.parse("0..2,1,2,3"))
    assert out["quantization_config"]["ignore"] == ["lm_head", "re:.*layers\\.[0-9]+\\.gate",
                                                    "model.layers.1.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    quant["quantization_config"]["ignore"].append("re:model\\.layers\\.3\\..*")
    assert remap_config(quant, LayerPath.parse("0..3"))["quantization_config"] == quant["quantization_config"]
    assert remap_config(quant, LayerPath.parse("0..3,1..2"))["quantization_config"]["ignore"][-1] == \
        "re:model\\.layers\\.3\\..*"  # layer 3 runs once, in slot 3: the pattern still means it
    with pytest.raises(ValueError, match=r"picks other modules in the export than in the layers its slots run "
                                         r"\(e.g. model.layers.3.block_sparse_moe.experts.0.w1\)"):
        remap_config(quant, LayerPath.parse("0..2,1,2,3"))
    for pattern, ok in (("re:.*layers\\.(1[0-5])\\..*", False), ("re:.*layers\\.[3]\\..*", False),
                        ("re:vision_tower\\.encoder\\.layers\\.3\\..*", True)):  # a vision tower is not renumbered
        wide = {"num_hidden_layers": 16, "quantization_config": {"ignore": [pattern]}}
        path = LayerPath.parse("0..12,3..15")
        if ok:
            assert remap_config(wide, path)["quantization_config"]["ignore"] == [pattern]
        else:
            with pytest.raises(ValueError, match="picks other modules"):
                remap_config(wide, path)


def test_gguf_export_reads_back(model_dir, tmp_path):
    import gguf

    _, hf = model_dir("llama", intermediate_size=128)  # Q8_0 rows need multiples of 32
    src = tmp_path / "src.gguf"
    written = write_gguf(hf, src, qtype="Q8_0", extra_arrays={"llama.custom_per_layer": list(range(10, 16)),
                                                             "general.tags": ["a", "b", "c", "d", "e", "f"],
                                                             "llama.rope.dimension_sections": [8, 4, 4, 0, 0, 0]})
    dst = cf.export_gguf(src, tmp_path / "out.gguf", PATH)
    r = gguf.GGUFReader(str(dst))
    assert r.fields["llama.block_count"].contents() == len(PATH)
    assert r.fields["llama.custom_per_layer"].contents() == [10 + i for i in PATH]
    assert r.fields["general.tags"].contents() == ["a", "b", "c", "d", "e", "f"]
    assert r.fields["llama.rope.dimension_sections"].contents() == [8, 4, 4, 0, 0, 0]  # as long as the layers: kept
    assert r.fields["llama.attention.head_count"].contents() == 4
    got = {t.name: t for t in r.tensors}
    expected = {}
    for name, (data, kind) in written.items():
        if name.startswith("blk."):
            layer, suffix = name.split(".", 2)[1:]
            for k, src_layer in enumerate(PATH):
                if src_layer == int(layer):
                    expected[f"blk.{k}.{suffix}"] = (data, kind)
        else:
            expected[name] = (data, kind)
    assert set(got) == set(expected)
    for name, (data, kind) in expected.items():
        assert got[name].tensor_type == kind, name
        assert np.asarray(got[name].data).tobytes() == np.asarray(data).tobytes(), name
    a, b = cf.load(src), cf.load(dst)
    x = ids()
    diff = (a.logits(x, layers=PATH) - b.logits(x)).abs().max()
    print(f"GGUF export (Q8_0) identity vs source along the path: max abs diff {diff:.3e}")
    assert diff == 0


def test_gguf_export_mtp_arrays_and_gemma_positions(model_dir, tmp_path):
    """A per-layer array that lists the prediction (MTP) blocks too is reordered along the path (those
    entries dropped, as the blocks are); a Gemma path that puts a layer where the other attention
    kind sits by position warns that a llama.cpp reading positions alone would differ."""
    import gguf

    _, hf = model_dir("llama")
    src = tmp_path / "mtp.gguf"
    write_gguf(hf, src, block_count=7, extra_uints={"llama.nextn_predict_layers": 1},
               extra_arrays={"llama.per_layer_with_mtp": list(range(20, 27))})
    r = gguf.GGUFReader(str(cf.export_gguf(src, tmp_path / "mtp-out.gguf", PATH)))
    assert r.fields["llama.per_layer_with_mtp"].contents() == [20 + i for i in PATH]
    assert r.fields["llama.block_count"].contents() == len(PATH) and r.fields["llama.nextn_predict_layers"].contents() == 0
    _, gemma = model_dir("gemma2")
    write_gguf(gemma, tmp_path / "gemma.gguf")
    with pytest.warns(UserWarning, match=r"slots \[4, 5, 6, 7, 8\] of this gemma2 path hold layers of the other "):
        cf.export_gguf(tmp_path / "gemma.gguf", tmp_path / "gemma-out.gguf", PATH)
    # mergekit keeps the config: the same slots would run as their position's kind
    gemma_folder, _ = model_dir("gemma2")
    with pytest.warns(UserWarning, match=r"slots \[4, 5, 6, 7, 8\] hold layers of another attention or MLP kind"):
        export_mergekit(gemma_folder, tmp_path / "gemma.yaml", PATH)
    llama_folder, _ = model_dir("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every llama layer is of one kind: nothing to warn about
        export_mergekit(llama_folder, tmp_path / "llama.yaml", PATH)


def test_exports_refuse_what_they_cannot_check(model_dir, tmp_path):
    """An architecture circuit-finder does not run is not exported unless forced (its runtime may
    derive settings from a layer's position, which the export cannot keep): a GGUF of another
    arch, and an HF folder whose config names another architecture. Forced, both are written with
    a warning. A layer tensor past num_hidden_layers (an MTP block) is a clear ValueError."""
    import shutil

    folder, hf = model_dir("llama")
    src = tmp_path / "smollm3.gguf"
    write_gguf(hf, src, arch="smollm3")
    with pytest.raises(ValueError, match="architecture 'smollm3' is not one circuit-finder runs.*force=True"):
        cf.export_gguf(src, tmp_path / "out.gguf", PATH)
    assert not (tmp_path / "out.gguf").exists()
    with pytest.warns(UserWarning, match="written anyway"):
        assert cf.export_gguf(src, tmp_path / "out.gguf", PATH, force=True).stat().st_size > 0
    other = tmp_path / "other-arch"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["SmolLM3ForCausalLM"]}))
    with pytest.raises(ValueError, match="is not one circuit-finder runs"):
        cf.export_hf(other, tmp_path / "hf-out", PATH)
    with pytest.warns(UserWarning, match="written anyway"):
        cf.export_hf(other, tmp_path / "hf-out", PATH, force=True)
    assert json.loads((tmp_path / "hf-out" / "config.json").read_text())["num_hidden_layers"] == len(PATH)
    trimmed = tmp_path / "trimmed"
    shutil.copytree(folder, trimmed)
    (trimmed / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.5\..* is of layer 5, but the config has "
                                         r"num_hidden_layers=5"):
        cf.export_hf(trimmed, tmp_path / "hf-trimmed", "0..4")


def test_gguf_export_with_llama_cpp(tmp_path):
    """The default model (Q4_1) exported along a RYS path: llama.cpp's greedy tokens equal ours."""
    llama_cpp_or_skip()
    path = LayerPath.duplicate(30, 10, 13)
    dst = cf.export_gguf(cf.default_model_path(), tmp_path / "rys.gguf", path)
    model = cf.load("default")
    prompt = [1, 504, 3458, 282, 4649, 314]
    llm = llama_cpp_model(dst, n_ctx=64, verbose=False)
    theirs = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(tok)
        if len(theirs) == 8:
            break
    ours = model.generate(torch.tensor([prompt]), layers=path, max_new_tokens=8)[0].tolist()
    assert theirs == ours


def test_gguf_export_logits_match_llama_cpp(tmp_path):
    """A full-precision (F32) GGUF exported along identity, repeated and reordered paths: llama.cpp
    (F32 KV cache) loads each file and its logits equal ours along the same path."""
    llama_cpp_or_skip()
    hf = build_hf_model("llama", tmp_path / "hf", num_hidden_layers=6, vocab_size=64)
    src = _tiny_gguf_for_llama_cpp(hf, tmp_path / "tiny.gguf")
    model = cf.load(src)
    ids = [1, 5, 9, 22, 40, 7, 13, 60]
    for k, path in enumerate(["0..5", "0..3,1..5", "0..2,4,3,5", "0..4,2..4,2..5"]):
        dst = cf.export_gguf(src, tmp_path / f"path{k}.gguf", path)
        llm = llama_cpp_model(dst, n_ctx=32, logits_all=True, verbose=False, type_k=0, type_v=0)
        llm.eval(ids)
        theirs = torch.tensor(np.array(llm.scores[:len(ids)]))
        ours = model.logits(torch.tensor([ids]), layers=path)[0]
        diff = (theirs - ours).abs()
        print(f"llama.cpp vs ours along {path}: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}")
        assert diff.max() < 1e-4
        del llm


def _tiny_gguf_for_llama_cpp(hf, dst):
    """hf written as GGUF with a placeholder tokenizer llama.cpp accepts (ids are fed directly)."""
    vocab = hf.config.vocab_size
    words = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(vocab - 3)]
    write_gguf(hf, dst, extra_strings={"tokenizer.ggml.model": "llama"},
               extra_arrays={"tokenizer.ggml.tokens": words, "tokenizer.ggml.scores": [0.0] * vocab,
                             "tokenizer.ggml.token_type": [2, 3, 3] + [1] * (vocab - 3)})
    return dst


@pytest.mark.parametrize("arch, blocks", [("gemma2", 46), ("gemma3_text", 62)])
def test_gemma_export_at_a_27b_block_count_keeps_the_query_scale_in_llama_cpp(tmp_path, arch, blocks):
    """llama.cpp scales Gemma queries by 1/sqrt(hidden/heads) when a file has 46 (Gemma 2) or 62
    (Gemma 3) blocks, the 27B counts, else by 1/sqrt(head_dim), and reads no key for it. A path of
    that length from a model whose head size differs: the export rescales the query projection
    (Gemma 2) or query norm (Gemma 3), so llama.cpp's logits equal the path's; circuit-finder reads
    the file the same."""
    llama_cpp_or_skip()
    hf = build_hf_model(arch, tmp_path / "hf", vocab_size=64, head_dim=24, query_pre_attn_scalar=24, intermediate_size=128,
                        **({"layer_types": None} if arch == "gemma3_text" else {}))
    src = _tiny_gguf_for_llama_cpp(hf, tmp_path / "src.gguf")
    path = [k % 6 for k in range(blocks)]  # each slot keeps its position's sliding kind
    dst = cf.export_gguf(src, tmp_path / "path.gguf", path)
    prompt = [1, 5, 9, 22, 40, 7]
    ours = cf.load(src).logits(torch.tensor([prompt]), layers=path)[0]
    llm = llama_cpp_model(dst, n_ctx=32, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(prompt)
    theirs = torch.tensor(np.array(llm.scores[:len(prompt)]))
    del llm
    diff = (theirs - ours).abs()
    print(f"{arch} {blocks}-slot export: llama.cpp vs the path: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}")
    # the 6-slot path differs by ~6e-4 of the largest logit; unscaled, this one by 0.14 (Gemma 2), 0.34 (Gemma 3)
    assert diff.max() < 2e-3 * ours.abs().max()
    again = cf.load(dst).logits(torch.tensor([prompt]))[0]
    assert (again - ours).abs().max() < 1e-4 * ours.abs().max()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                   "IQ4_NL", "IQ4_XS"])
def test_gemma2_packed_query_projections_are_rescaled_by_their_block_factors(tmp_path, qtype):
    """Gemma 2 has no query norm: a 46-block export of a 9B-like file rescales each slot's packed
    attn_q blocks (their f16 d / dmin), read back here with gguf's own dequantizer: the source's
    values times sqrt(64/24) (hidden / heads = 256 / 4 against head_dim 24), up to the f16 rounding
    of the factors. Other tensors keep their bytes."""
    import gguf

    hf = build_hf_model("gemma2", tmp_path / "hf", vocab_size=64, hidden_size=256, intermediate_size=256,
                        head_dim=24, query_pre_attn_scalar=24)
    src = tmp_path / "src.gguf"
    write_gguf(hf, src, qtype=qtype)
    path = [k % 6 for k in range(46)]
    dst = cf.export_gguf(src, tmp_path / "path.gguf", path)
    before = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    after = {t.name: t for t in gguf.GGUFReader(str(dst)).tensors}
    for k in (0, 7, 45):
        old, new = before[f"blk.{path[k]}.attn_q.weight"], after[f"blk.{k}.attn_q.weight"]
        want = gguf.quants.dequantize(old.data, old.tensor_type) * (64 / 24) ** 0.5
        got = gguf.quants.dequantize(new.data, new.tensor_type)
        assert new.tensor_type == old.tensor_type and np.allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
        assert np.array_equal(after[f"blk.{k}.attn_k.weight"].data, before[f"blk.{path[k]}.attn_k.weight"].data)
    assert float(gguf.GGUFReader(str(dst)).fields["gemma2.attention.scale"].contents()) == pytest.approx(1 / 8)


def test_export_errors_leave_no_partial_files(model_dir, tmp_path, monkeypatch):
    import gguf

    folder, hf = model_dir("llama")
    src = tmp_path / "src.gguf"
    write_gguf(hf, src)
    with pytest.raises(cf.LayerPathError, match="slot 2"):
        cf.export_gguf(src, tmp_path / "bad.gguf", "0,1,6")
    with pytest.raises(cf.LayerPathError, match="slot 2"):
        cf.export_hf(folder, tmp_path / "bad-hf", "0,1,9")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        cf.export_hf(folder, tmp_path / "taken", PATH)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        cf.export_gguf(src, tmp_path / "missing" / "x.gguf", PATH)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        cf.export_hf(folder, tmp_path / "file" / "x", PATH)

    def boom(self, tensor, tensor_endianess=None):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", boom)
    with pytest.raises(OSError, match="disk full"):
        cf.export_gguf(src, tmp_path / "out.gguf", PATH)
    monkeypatch.undo()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        cf.export_hf(folder, tmp_path / "out-hf", PATH)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["file", "src.gguf", "taken"], left


def test_a_killed_exports_leftovers_are_cleared_by_the_next(model_dir, tmp_path):
    """A run killed mid-write leaves a hidden temporary (gigabytes, for a real model); killed
    between a folder replacement's two renames, no target but the previous export moved aside. The
    next export to that name removes the first and puts the second back before replacing it; the
    names of a live process (a concurrent export) are left alone."""
    import subprocess
    import sys

    from circuit_finder.files import staged

    folder, _ = model_dir("llama")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    with staged(tmp_path / "probe") as probe:  # .probe.TAG-PID-RANDOM.tmp: this machine's tag
        owner = probe.name.split(".")[2].split("-")[0]
        assert probe.name.split(".")[2].split("-")[1] == str(os.getpid())
    (tmp_path / "probe").unlink()
    torn = tmp_path / f".out.{owner}-{dead}-00aa.tmp"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"half")
    aside = tmp_path / f".out.{owner}-{dead}-00bb.old"
    cf.export_hf(folder, aside, "0..5")
    live = tmp_path / f".out.{owner}-{os.getpid()}-00cc.tmp"
    live.mkdir()
    with staged(tmp_path / "out", folder=True) as tmp:  # what the next export does first
        assert sorted(p.name for p in tmp_path.iterdir() if p != tmp) == [live.name, "out"]
        assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6  # put back
        (tmp / "x").write_text("new")
    assert (tmp_path / "out" / "x").read_text() == "new" and live.exists()


def test_mergekit_config():
    import yaml

    text = cf.mergekit_config("0..12,10..29", model="org/model", num_layers=30)
    doc = yaml.safe_load(text)
    assert doc["merge_method"] == "passthrough"
    assert [s["sources"][0]["layer_range"] for s in doc["slices"]] == [[0, 13], [10, 30]]
    assert all(s["sources"][0]["model"] == "org/model" for s in doc["slices"])
    doc = yaml.safe_load(cf.mergekit_config([0, 1, 2, 1, 5, 4]))
    rebuilt = [i for s in doc["slices"] for i in range(*s["sources"][0]["layer_range"])]
    assert rebuilt == [0, 1, 2, 1, 5, 4]
    with pytest.raises(cf.LayerPathError):
        cf.mergekit_config("0..30", num_layers=30)
    doc = yaml.safe_load(cf.mergekit_config("rys=2:4", num_layers=6, dtype="bf16"))
    assert [s["sources"][0]["layer_range"] for s in doc["slices"]] == [[0, 4], [2, 6]]
    assert doc["dtype"] == "bfloat16"
    with pytest.raises(cf.LayerPathError, match="num_layers"):
        cf.mergekit_config("rys=2:4")
    with pytest.raises(ValueError, match="not supported"):
        cf.mergekit_config("0..3", dtype="int8")


def test_export_mergekit(model_dir, tmp_path, monkeypatch):
    import yaml

    folder, hf = model_dir("llama")
    dst = tmp_path / "rys.yaml"
    export_mergekit(folder, dst, "rys=1:4")
    doc = yaml.safe_load(dst.read_text())
    assert doc["slices"][0]["sources"][0]["model"] == str(folder)
    assert [s["sources"][0]["layer_range"] for s in doc["slices"]] == [[0, 4], [1, 6]]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_mergekit(folder, dst, "0..5")
    export_mergekit(folder, dst, "0..5", overwrite=True)
    assert "layer path 0..5" in dst.read_text()
    with pytest.raises(cf.LayerPathError, match="out of range"):
        export_mergekit(folder, tmp_path / "past.yaml", "0..5,4..9")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        export_mergekit(tmp_path / "missing-model", tmp_path / "m.yaml", "0..5")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        export_mergekit(tmp_path, tmp_path / "m.yaml", "0..5")
    src = tmp_path / "src.gguf"
    write_gguf(hf, src)
    with pytest.raises(ValueError, match="not GGUF files"):
        export_mergekit(src, tmp_path / "g.yaml", "0..5")
    assert mergekit_source(src, model="org/base") == ("org/base", 6)
    # a hub id that is no local path: written as is, checked only against a given layer count
    monkeypatch.chdir(tmp_path)
    assert mergekit_source("org/model") == ("org/model", None)
    assert mergekit_source("org/model", num_layers=30) == ("org/model", 30)
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        mergekit_source("models/llama")  # models/ is a local folder: a missing local path, not a hub id
    with pytest.raises(ValueError, match="disagrees"):
        mergekit_source(folder, num_layers=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "rys.yaml", "src.gguf"]


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exports_follow_the_umask(model_dir, tmp_path, umask):
    folder, hf = model_dir("llama")
    src = tmp_path / "src.gguf"
    write_gguf(hf, src)
    old = os.umask(umask)
    try:
        gguf_out = cf.export_gguf(src, tmp_path / "out.gguf", PATH)
        hf_out = cf.export_hf(folder, tmp_path / "hf", PATH)
        yaml_out = export_mergekit(folder, tmp_path / "out.yaml", PATH)
    finally:
        os.umask(old)
    assert _mode(gguf_out) == _mode(yaml_out) == 0o666 & ~umask
    assert _mode(hf_out) == 0o777 & ~umask
    assert {_mode(f) for f in hf_out.iterdir()} == {0o666 & ~umask}


def test_overwrite_replaces_only_our_exports(model_dir, tmp_path):
    folder, hf = model_dir("llama")
    dst = cf.export_hf(folder, tmp_path / "hf", PATH)
    cf.export_hf(folder, dst, "0..5", overwrite=True)  # an export of ours: replaced
    assert json.loads((dst / "config.json").read_text())["num_hidden_layers"] == 6
    (dst / "notes.txt").write_text("mine")
    (dst / "runs").mkdir()
    with pytest.raises(FileExistsError, match=r"notes\.txt, runs/"):
        cf.export_hf(folder, dst, PATH, overwrite=True)
    assert (dst / "notes.txt").read_text() == "mine" and (dst / "model.safetensors").exists()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "results.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match="does not look like a model folder"):
        cf.export_hf(folder, tmp_path / "data", PATH, overwrite=True)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        cf.export_hf(folder, tmp_path / "a-file", PATH, overwrite=True)
    (tmp_path / "empty").mkdir()
    cf.export_hf(folder, tmp_path / "empty", PATH, overwrite=True)
    assert (tmp_path / "empty" / "config.json").exists()
    with pytest.raises(ValueError, match="is the source model"):
        cf.export_hf(folder, folder, PATH, overwrite=True)
    src = tmp_path / "src.gguf"
    write_gguf(hf, src)
    with pytest.raises(ValueError, match="is the source model"):
        cf.export_gguf(src, src, PATH, overwrite=True)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        cf.export_gguf(src, tmp_path / "empty", PATH, overwrite=True)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_hf_export_from_gguf_file(model_dir, tmp_path):
    _, hf = model_dir("llama")
    src = tmp_path / "src.gguf"
    write_gguf(hf, src)
    dst = cf.export_hf(src, tmp_path / "from-gguf", "rys=1:4")
    a, b = cf.load(src), cf.load(dst)
    assert b.num_layers == 9
    x = ids()
    diff = (a.logits(x, layers="rys=1:4") - b.logits(x)).abs().max()
    print(f"HF export of a GGUF vs the GGUF along the path: max abs diff {diff:.3e}")
    assert diff == 0


@pytest.mark.slow
def test_default_model_gguf_export(tmp_path):
    path = LayerPath.duplicate(30, 10, 13)
    dst = cf.export_gguf(cf.default_model_path(), tmp_path / "rys.gguf", path)
    assert os.path.getsize(dst) > os.path.getsize(cf.default_model_path())
    a, b = cf.load("default"), cf.load(dst)
    x = torch.tensor([[1, 504, 3458, 282, 4649, 314, 260, 1345]])
    diff = (a.logits(x, layers=path) - b.logits(x)).abs().max()
    print(f"default model RYS(10, 13) GGUF export vs path: max abs diff {diff:.3e}")
    assert diff == 0
    assert b.generate("Name three colors.", chat=True, max_new_tokens=12) == a.generate(
        "Name three colors.", layers=path, chat=True, max_new_tokens=12)
