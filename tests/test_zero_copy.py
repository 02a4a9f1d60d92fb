"""No copies of the weights: the tensors the engine runs are the memory-mapped safetensors file.

Two independent witnesses, both Linux-only: /proc/self/maps (every weight's bytes lie inside a
mapping of a checkpoint file, not in the heap) and the process's anonymous resident memory (loading
and running a ~220 MB model adds far less than its size; a copy would add all of it). Applies when
the checkpoint's dtype is the compute dtype on CPU; a dtype conversion or a device move copies once,
by design.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

import pytest
import torch

import circuit_finder as cf
from circuit_finder import LayerPath
from helpers import make_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps and /proc/self/status")


def file_mappings(files) -> list[tuple[int, int, str]]:
    """(start, end, file) of every mapping in this process whose backing file is one of `files`."""
    wanted = {os.path.realpath(f) for f in files}
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() in wanted:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end, parts[5].strip()))
    return out


def outside_mappings(tensors: dict[str, torch.Tensor], maps) -> list[str]:
    """Names of tensors whose bytes are not wholly inside one of `maps`."""
    bad = []
    for name, t in tensors.items():
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        if not any(start <= lo and hi <= end for start, end, _ in maps):
            bad.append(name)
    return bad


def rss_anon_bytes() -> int:
    """Anonymous resident memory of this process, after handing freed heap back to the OS (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


@pytest.mark.parametrize("sharded", [False, True])
def test_engine_tensors_live_in_the_checkpoint_mapping(model_dir, tmp_path, sharded):
    _, hf = model_dir("qwen2")  # qkv biases too
    folder = tmp_path / "ckpt"
    total = sum(t.numel() * t.element_size() for t in hf.state_dict().values())
    hf.save_pretrained(str(folder), max_shard_size=total // 3 if sharded else "10GB")
    files = sorted(str(p) for p in folder.glob("*.safetensors"))
    assert (len(files) > 1) == sharded, files
    model = cf.load(folder)
    assert model.dtype == torch.float32
    maps = file_mappings(files)
    print(f"{len(files)} file(s): {len(maps)} mappings of the checkpoint files, {len(model.tensors)} tensors")
    assert {os.path.realpath(m[2]) for m in maps} == {os.path.realpath(f) for f in files}
    expected = {k for k in hf.state_dict() if k != "lm_head.weight" or not hf.config.tie_word_embeddings}
    assert expected <= set(model.tensors)
    assert outside_mappings(model.tensors, maps) == []

    # the engine runs those very tensors, in every slot of a repeated path
    path = LayerPath.duplicate(6, 2, 5, times=3)
    engine_ptrs = {layer: {k: t.data_ptr() for k, t in model.engine.layer_tensors(layer).items()} for layer in range(6)}
    out = model.logits(torch.tensor([[5, 6, 7, 8]]), layers=path)
    assert out.shape == (1, 4, hf.config.vocab_size)
    for layer in range(6):
        now = {k: t.data_ptr() for k, t in model.engine.layer_tensors(layer).items()}
        assert now == engine_ptrs[layer]
        assert now["q_proj"] == model.tensors[f"model.layers.{layer}.self_attn.q_proj.weight"].data_ptr()
        assert now["down_proj"] == model.tensors[f"model.layers.{layer}.mlp.down_proj.weight"].data_ptr()
        assert outside_mappings(model.engine.layer_tensors(layer), maps) == []


def test_the_mapping_check_sees_copies(model_dir):
    """The control: clones of the mapped tensors, and a bfloat16 load (which must convert), are
    reported outside the mapping while the mapping is alive."""
    folder, _ = model_dir("qwen2")
    raw = cf.load_safetensors(str(folder))  # holds a mapping of the file
    model = cf.load(folder, dtype="bfloat16")
    maps = file_mappings([str(p) for p in folder.glob("*.safetensors")])
    assert maps and outside_mappings(raw, maps) == []
    assert set(outside_mappings({k: v.clone() for k, v in raw.items()}, maps)) == set(raw)
    assert set(outside_mappings(model.tensors, maps)) == set(model.tensors)


def test_loading_a_large_model_adds_little_anonymous_memory(tmp_path):
    """~220 MB of float32 weights: loading them and running a repeated path (which reads every page)
    grows anonymous resident memory by well under their size; a copy would grow it by all of it."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = make_config("llama", vocab_size=16000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True, rope_scaling=None,
                         max_position_embeddings=64)
    folder = tmp_path / "big"
    config.save_pretrained(str(folder))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()
                  if k != "lm_head.weight"}
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=g) * 0.02 if len(s) == 2 else torch.ones(s)) for k, s in shapes.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    gc.collect()
    assert size > 200e6

    before = rss_anon_bytes()
    model = cf.load(folder)
    loaded = rss_anon_bytes()
    out = model.logits(torch.tensor([[1, 5, 9, 13]]), layers="0..3,1,2,3")
    ran = rss_anon_bytes()
    assert torch.isfinite(out).all()
    print(f"weights {size / 1e6:.0f} MB; anonymous RSS +{(loaded - before) / 1e6:.1f} MB after load, "
          f"+{(ran - before) / 1e6:.1f} MB after a forward along a repeated path")
    assert loaded - before < 0.1 * size
    assert ran - before < 0.25 * size
    assert outside_mappings(model.tensors, file_mappings([str(folder / "model.safetensors")])) == []


def test_weight_bytes_counts_the_engines_own_copies(model_dir):
    """Gemma's norms run as the engine's (1 + w) copies, fp32: weight_bytes() counts every one of
    them (q / k norms and the final norm included) beside the loaded tensors, by the transformers
    model's own parameter list."""
    folder, hf = model_dir("gemma3_text")
    model = cf.load(folder)
    loaded = sum(t.numel() * t.element_size() for t in model.tensors.values())
    norms = {k: v.numel() * 4 for k, v in hf.state_dict().items() if "norm" in k}
    print(f"gemma3 held {model.weight_bytes()}, loaded {loaded} B, {len(norms)} norms {sum(norms.values())} B")
    assert any("q_norm" in k for k in norms) and "model.norm.weight" in norms
    assert model.weight_bytes() == {"cpu": loaded + sum(norms.values())}


def test_weight_bytes_counts_each_storage_once(model_dir, tmp_path):
    """Model.weight_bytes(): the checkpoint's bytes (from the safetensors header, not our tensors),
    each tensor once (the tied embedding is one storage), the same at any layer path run; halved
    in bf16; a split placement reports each device's share."""
    import json
    import struct

    folder, _ = model_dir("llama")  # tied embeddings
    files = sorted(folder.glob("*.safetensors"))
    on_disk = 0
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        on_disk += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    model = cf.load(folder)
    got = model.weight_bytes()
    print(f"weight_bytes {got}, checkpoint tensors {on_disk} bytes")
    assert got == {"cpu": on_disk}
    model.logits(torch.tensor([[5, 6, 7]]), layers=LayerPath.duplicate(model.num_layers, 1, 4, times=3))
    assert model.weight_bytes() == got  # repeating layers adds no weights
    assert cf.load(folder, dtype="bfloat16").weight_bytes() == {"cpu": on_disk // 2}
    n, cpu = model.num_layers, torch.device("cpu")
    placement = cf.Placement(tuple(cpu if i < 3 else torch.device("meta") for i in range(n)), cpu)
    split = cf.load_from_tensors(model.config, dict(model.tensors), device_map=placement)
    kept = sum(t.numel() * t.element_size() for name, t in model.tensors.items()
               if not any(name.startswith(f"model.layers.{i}.") for i in range(3, n)))
    assert split.weight_bytes() == {"cpu": kept} and kept < on_disk  # meta layers hold nothing
