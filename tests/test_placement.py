"""Placement over devices (issue #17): device_map forms and their errors, raised before any weight
is loaded; a model split in two groups matches the one-device model and transformers (logits,
caches, decode, sweeps, scoring, lm-eval); the engine puts each slot's cache with its layer and
moves hidden states between devices. This machine has one CPU and no GPU, so the transfer itself
is checked with the meta device (layers there run shape-only); the cuda:0 + cpu split runs in the
CUDA tests at the end, skipped here."""

from __future__ import annotations

import json

import pytest
import torch

import circuit_finder as cf
import circuit_finder.gguf
import circuit_finder.quants
from circuit_finder import LayerPath
from circuit_finder.placement import Placement, parse_size, plan
from circuit_finder.sweep.distributed import worker_placement
from helpers import rebuilt, report, tokens, write_gguf

N = 6
PATHS = {"identity": LayerPath.identity(N), "rys": LayerPath.duplicate(N, 2, 4),
         "triple": LayerPath.duplicate(N, 1, 3, times=3)}
SIZES = {**{f"model.layers.{i}.mlp.down_proj.weight": 100 for i in range(N)}, "model.embed_tokens.weight": 50}
CPU = torch.device("cpu")
NO_GPU = {f"cuda:{i}": 0 for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)}  # for "auto"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm device visible to torch")


# ------------------------------------------------------------------------------------ map forms
@pytest.mark.parametrize("spec", [[("cpu", 2), ("cpu", 4)], "cpu=2,cpu=4", "cpu=2+cpu=4", {str(i): "cpu" for i in range(N)},
                                  json.dumps({i: "cpu" for i in range(N)}), {i: torch.device("cpu") for i in range(N)},
                                  '[["cpu", 2], ["cpu", 4]]', "cpu", CPU])
def test_map_forms_place_every_layer(spec):
    placed = plan(spec, N, SIZES)
    assert placed.layers == (CPU,) * N and placed.main == CPU and not placed.split
    assert dict(placed.need) == {"cpu": 650}
    assert placed.as_map() == {i: "cpu" for i in range(N)}


def test_auto_fills_gpus_then_cpu():
    placed = plan("auto", N, SIZES)
    if not torch.cuda.is_available():
        assert placed.layers == (CPU,) * N
    else:
        assert placed.layers[0].type == "cuda"
        small = plan("auto", N, SIZES, max_memory={"cuda:0": 50 + 3 * 100, "cpu": "1GiB"})  # room for 3 layers
        assert [d.type for d in small.layers] == ["cuda"] * 3 + ["cpu"] * 3 and small.split


def test_placement_names_devices_of_tensors():
    p = Placement((CPU, CPU, torch.device("meta")), CPU)
    assert p.device_of("model.layers.2.mlp.up_proj.weight").type == "meta"
    assert p.device_of("model.embed_tokens.weight") == CPU and p.device_of("lm_head.weight") == CPU
    assert p.split and p.devices == [CPU, torch.device("meta")]
    assert "layers 0-1 + embedding and head" in str(p) and "meta: layers 2" in str(p)
    assert parse_size("1.5GiB", "x") == 3 * 2**29 and parse_size("20MB", "x") == 20 * 10**6 and parse_size(7, "x") == 7


BAD = [("cuda:3=6", "names cuda:3, but this torch sees"),
       ("tpu=6", "'tpu' is not a device"),
       ("meta=6", "meta is not supported"),
       ("cpu=5", "places 5 layers; the model has 6"),
       ("cpu:6", "the CPU is one device, cpu \\(for a layer count write cpu=6\\)"),
       ("cpu;6", "is not DEVICE=COUNT"),
       ({i: "cpu" for i in range(N) if i != 3}, r"no device to layer\(s\) 3"),
       ({**{i: "cpu" for i in range(N)}, 6: "cpu"}, "names layer 6; the model has layers 0..5"),
       ({"first": "cpu"}, "key 'first' is not a layer index"),
       ([("cpu", 6.0)], "must be a \\(device, layer count\\) pair"),
       ("{not json", "is not valid JSON"),
       (42, "device_map must be 'auto'")]


@pytest.mark.parametrize("spec,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_maps_raise_naming_the_problem(spec, message):
    if torch.cuda.is_available() and "cuda:3" in str(spec) and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    with pytest.raises(ValueError, match=message):
        plan(spec, N, SIZES)


def test_memory_budget_is_checked():
    with pytest.raises(ValueError, match=r"puts 650 B of weights on cpu, more than its budget of 600 B \(max_memory\)"):
        plan("cpu=6", N, SIZES, max_memory={"cpu": 600})
    with pytest.raises(ValueError, match="not a size"):
        plan("cpu=6", N, SIZES, max_memory={"cpu": "lots"})
    with pytest.raises(ValueError, match="not DEVICE=SIZE"):
        plan("cpu=6", N, SIZES, max_memory="cpu")
    assert dict(plan("auto", N, SIZES, max_memory={"cpu": "1KiB", **NO_GPU}).need) == {"cpu": 650}
    with pytest.raises(ValueError, match="max_memory budgets a device_map"):
        plan(None, N, SIZES, max_memory={"cpu": "1KiB"})
    with pytest.raises(ValueError, match="the placement covers 3 layers; the model has 6"):
        plan(Placement((CPU,) * 3, CPU), N, SIZES)


def test_budgets_and_ready_placements_are_read_one_way(monkeypatch):
    """float("inf") is no limit (NaN is not a size); a device given two budgets, in a dict ("cpu"
    and "cpu:0") or in text, is refused rather than one silently kept; numpy layer counts are
    counts; a ready Placement's devices are written one way (cpu:0 is cpu: not a split model) and
    max_memory beside it is refused, not dropped; device_map="cuda" is checked against its budget
    (the GPU's free memory faked here), and so is device="cuda" for a load from files, not for
    tensors handed over (they may be there already)."""
    import numpy as np

    assert dict(plan("cpu=6", N, SIZES, max_memory={"cpu": float("inf")}).need) == {"cpu": 650}
    with pytest.raises(ValueError, match="is not a size"):
        plan("cpu=6", N, SIZES, max_memory={"cpu": float("nan")})
    for budgets in ({"cpu": "1KiB", "cpu:0": "1MiB"}, "cpu=1KiB,cpu=1GiB"):
        with pytest.raises(ValueError, match="max_memory names cpu twice"):
            plan("cpu=6", N, SIZES, max_memory=budgets)
    assert plan([("cpu", np.int64(2)), ("cpu", np.int32(4))], N, SIZES).layers == (CPU,) * N
    ready = plan(Placement((torch.device("cpu", 0),) * N, CPU), N, SIZES)
    assert ready.layers == (CPU,) * N and not ready.split
    with pytest.raises(ValueError, match="not a ready Placement"):
        plan(Placement((CPU,) * N, CPU), N, SIZES, max_memory={"cpu": 1})
    import circuit_finder.placement as placement

    monkeypatch.setattr(placement, "as_device", lambda d, where: torch.device("cuda", 0))
    monkeypatch.setattr(placement, "free_memory", lambda d: 100)
    with pytest.raises(ValueError, match=r"puts 650 B of weights on cuda:0, more than its budget of 90 B"):
        plan("cuda", N, SIZES)
    with pytest.raises(ValueError, match=r"puts 650 B of weights on cuda:0"):  # a load from files: budgeted
        plan(None, N, SIZES, device="cuda", budget_device=True)
    assert plan(None, N, SIZES, device="cuda").layers == (torch.device("cuda", 0),) * N  # tensors handed over


def test_cgroup_room_reads_the_tightest_limit(tmp_path):
    """A container's or a Slurm job's memory cgroup (v2 or v1) limits the CPU budget: the least of
    limit - used + reclaimable page cache over the cgroup and its parents; no limit is None."""
    from circuit_finder.placement import cgroup_room

    def cgroup(folder, limit, used, inactive, names=("memory.max", "memory.current", "inactive_file")):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / names[0]).write_text(f"{limit}\n")
        (folder / names[1]).write_text(f"{used}\n")
        (folder / "memory.stat").write_text(f"anon 5\n{names[2]} {inactive}\n")

    v2 = tmp_path / "v2"
    cgroup(v2, "max", 10**9, 0)
    cgroup(v2 / "job", 8000, 3000, 500)  # 5500 left
    cgroup(v2 / "job" / "step", "max", 3000, 500)
    table = tmp_path / "cgroup"
    table.write_text("0::/job/step\n")
    assert cgroup_room(str(v2), str(table)) == 5500
    cgroup(v2 / "job" / "step", 4000, 3000, 0)  # a tighter child: 1000 left
    assert cgroup_room(str(v2), str(table)) == 1000
    v1 = tmp_path / "v1"
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    cgroup(v1 / "memory", 9223372036854771712, 10, 0, names)  # v1's "no limit"
    table.write_text("4:cpu,memory:/\n1:cpu:/x\n")
    assert cgroup_room(str(v1), str(table)) is None
    cgroup(v1 / "memory", 2000, 1500, 100, names)
    assert cgroup_room(str(v1), str(table)) == 600
    assert cgroup_room(str(tmp_path / "none"), str(table)) is None and cgroup_room(table=str(tmp_path / "no")) is None
    table.write_text("garbage\n4:memory:/\n")  # a line that is not a cgroup's is skipped
    (v1 / "memory" / "memory.stat").unlink()  # no page-cache figure: the limit still holds, nothing counted back
    assert cgroup_room(str(v1), str(table)) == 500


def test_packed_matrices_are_budgeted_at_their_size_where_they_stay_packed(model_dir, monkeypatch, tmp_path):
    """A quantized matrix is counted at its blocks' size on a device that runs it packed (the CPU;
    a GPU in a build with GPU kernels) and at its float size where it would be dequantized."""
    packed = {f"model.layers.{i}.mlp.down_proj.weight": 30 for i in range(N)}
    assert dict(plan("cpu=6", N, SIZES, packed=packed).need) == {"cpu": 50 + 6 * 30}
    assert dict(plan("auto", N, SIZES, max_memory={"cpu": 230, **NO_GPU}, packed=packed).need) == {"cpu": 230}
    monkeypatch.setattr(circuit_finder.quants, "packs_on", lambda d: False)  # a device that dequantizes
    assert dict(plan("cpu=6", N, SIZES, packed=packed).need) == {"cpu": 650}
    monkeypatch.undo()
    with pytest.raises(ValueError, match="device: meta is not supported"):
        plan(None, N, SIZES, device="meta")
    # a Q8_0 GGUF on the CPU: budgeted and held at the file's size, not the float32 size
    folder, hf = model_dir("llama", intermediate_size=128)  # Q8_0 rows need multiples of 32
    gguf_file = tmp_path / "q8.gguf"
    write_gguf(hf, gguf_file, "Q8_0")
    m = cf.load(gguf_file)
    held = m.weight_bytes()["cpu"]
    floats = sum(t.numel() * 4 for t in hf.parameters())
    print(f"Q8_0 weights held {held} B, as float32 {floats} B")
    assert held < 0.6 * floats
    placed = cf.load(gguf_file, device_map="cpu=6", max_memory={"cpu": int(held * 1.1)})
    need = dict(placed.placement.need)["cpu"]
    assert abs(need - held) <= 0.1 * held and placed.weight_bytes() == m.weight_bytes()
    quantized = cf.load(folder, quantize="q8_0", device_map="cpu=6", max_memory={"cpu": int(held * 1.3)})
    assert dict(quantized.placement.need)["cpu"] <= held * 1.3


def test_bad_maps_fail_before_any_weight_loads(model_dir, monkeypatch, tmp_path):
    folder, hf = model_dir("llama")
    gguf_file = tmp_path / "tiny.gguf"
    write_gguf(hf, gguf_file, "F16")
    assert cf.load(gguf_file, device_map="cpu=3,cpu=3").placement.layers == (CPU,) * N

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was loaded before the device map was checked")

    monkeypatch.setattr(circuit_finder.gguf, "_dequantize", refuse)
    with pytest.raises(ValueError, match="more than its budget"):  # GGUF: nothing dequantized
        cf.load(gguf_file, device_map="cpu=6", max_memory={"cpu": "1KB"})
    with pytest.raises(ValueError, match="places 4 layers"):
        cf.load(gguf_file, device_map="cpu=4")
    monkeypatch.setattr(torch.Tensor, "to", refuse)  # safetensors: nothing moved or converted
    with pytest.raises(ValueError, match="more than its budget"):
        cf.load(folder, device_map="cpu=6", max_memory={"cpu": "1KB"})
    with pytest.raises(ValueError, match="no device to layer"):
        cf.load(folder, device_map={0: "cpu"})


# ----------------------------------------------------------------------- a split model's parity
def test_split_model_matches_one_device_and_transformers(model_dir, arch):
    folder, hf = model_dir(arch)
    one = cf.load(folder)
    split = cf.load(folder, device_map=[("cpu", 3), ("cpu", 3)])
    assert [split.engine.layer_device(i) for i in range(N)] == ["cpu"] * N
    ids = tokens(2, 20, seed=4)
    for name, path in PATHS.items():
        out = split.logits(ids, layers=path)
        with torch.no_grad():
            ref = rebuilt(hf, list(path))(ids).logits
        assert report(f"{arch} split {name}", out, ref) < 1e-4
        assert torch.equal(out, one.logits(ids, layers=path))
    mask = torch.ones_like(ids[:, :9])
    mask[1, :4] = 0
    a = split.generate(ids[:, :9], layers=PATHS["rys"], attention_mask=mask, max_new_tokens=6, min_new_tokens=6)
    b = one.generate(ids[:, :9], layers=PATHS["rys"], attention_mask=mask, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(a, b)


def test_split_model_caches_equal_one_device(model_dir):
    folder, _ = model_dir("gemma3_text")
    one, split = cf.load(folder), cf.load(folder, device_map={i: "cpu" for i in range(N)})
    path = list(PATHS["rys"])
    ids = tokens(2, 12, seed=5)
    pos = torch.arange(12).expand(2, 12).contiguous()
    caches = []
    for m in (one, split):
        cache = m.engine.new_cache(path, 2, 16)
        with torch.inference_mode():
            m.engine.forward(ids, pos, None, path, cache, False)
        caches.append(cache)
    assert caches[1].length == 12
    for s in range(len(path)):
        assert caches[1].device(s) == "cpu"
        assert torch.equal(caches[0].keys(s), caches[1].keys(s)) and torch.equal(caches[0].values(s), caches[1].values(s))


def test_split_model_sweeps_scores_and_lm_eval(chat_model_dir, tmp_path):
    one = cf.load(chat_model_dir)
    split = cf.load(chat_model_dir, device_map="cpu=4+cpu=2")
    kw = dict(probes=["math"], block_sizes=[2], mode="generate", max_items=2, progress=False)
    r1 = cf.sweep(one, results=tmp_path / "one.jsonl", **kw).to_pandas(n_boot=10)
    r2 = cf.sweep(split, results=tmp_path / "split.jsonl", **kw).to_pandas(n_boot=10)
    assert r1["combined"].tolist() == r2["combined"].tolist() and len(r2) > 2
    assert split.score("2 + 2 =", " 4", layers="rys=2:4") == one.score("2 + 2 =", " 4", layers="rys=2:4")
    pytest.importorskip("lm_eval")
    from lm_eval.utils import simple_parse_args_string

    from circuit_finder.lm_eval import CircuitFinderLM

    args = simple_parse_args_string(f"pretrained={chat_model_dir},device_map=cpu=3+cpu=3,max_memory=cpu=1GiB")
    lm = CircuitFinderLM(**args)
    assert lm.cf_model.placement.layers == (CPU,) * N


def test_cli_generate_with_a_device_map(chat_model_dir, capsys):
    from circuit_finder.cli import main

    argv = ["generate", "--model", str(chat_model_dir), "--max-new-tokens", "4", "--layers", "rys=2:4", "2 + 2 ="]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--device-map", "cpu=3,cpu=3", "--max-memory", "cpu=4GiB"]) == 0
    assert capsys.readouterr().out == plain and plain.strip()


def test_worker_placement_renumbers_gpus():
    p = Placement((torch.device("cuda", 2), torch.device("cuda", 2), torch.device("cuda", 5), CPU), torch.device("cuda", 2))
    placed, gpus = worker_placement(Placement(p.layers, p.main, (("cuda:2", 300), ("cuda:5", 100), ("cpu", 50))))
    assert gpus == 2 and placed.as_map() == {0: "cuda:0", 1: "cuda:0", 2: "cuda:1", 3: "cpu"}
    assert placed.main == torch.device("cuda", 0) and dict(placed.need) == {"cuda:0": 300, "cuda:1": 100, "cpu": 50}
    assert worker_placement(Placement((CPU,) * 3, CPU)) == (None, 0)


# --------------------------------------------------- the engine's per-layer devices (meta device)
def _meta_engine(model, layers):
    """The model's engine rebuilt with `layers` on the meta device (no data: shapes only)."""
    moved = {n: t.to("meta") if any(n.startswith(f"model.layers.{i}.") for i in layers) else t
             for n, t in model.tensors.items()}
    return cf._C.Engine(json.dumps(model.config.raw), "<meta test>", moved)


def test_engine_puts_each_slot_with_its_layer(model_dir):
    folder, _ = model_dir("llama")
    model = cf.load(folder)
    engine = _meta_engine(model, [3, 4, 5])
    assert [engine.layer_device(i) for i in range(N)] == ["cpu"] * 3 + ["meta"] * 3 and engine.device == "cpu"
    path = [0, 1, 2, 3, 4, 5, 3, 4, 5]
    cache = engine.new_cache(path, 2, 8)
    assert [cache.device(s) for s in range(9)] == ["cpu"] * 3 + ["meta"] * 6
    sub = cache.select_rows(torch.tensor([1]), 5)
    assert [sub.device(s) for s in range(5)] == ["cpu"] * 3 + ["meta"] * 2
    ids, pos = torch.zeros(2, 3, dtype=torch.long), torch.arange(3).expand(2, 3).contiguous()
    with pytest.raises(cf.InputError, match="the KV cache's slot 2 is on meta but layer 2 runs on cpu"):
        engine.forward(ids, pos, None, [0, 1, 2, 3], engine.new_cache([0, 1, 3, 3], 2, 8), False)
    with pytest.raises(cf.InputError, match="shared cache's slot 2 belongs to another model or layer"):
        engine.new_cache([0, 1, 2, 3], 2, 8, engine.new_cache([0, 1, 3], 2, 8), 3)


@pytest.mark.parametrize("arch_name", ["gemma3_text", "mistral", "phi3", "qwen3_5_text"])
def test_hidden_states_cross_devices_with_their_inputs(model_dir, arch_name):
    """Slots on the meta device (Qwen3.5: a full-attention and a linear layer) run with the call's
    positions, masks, real-token flags and cache (or linear state) moved there: the
    only error is the first copy of meta data back to the CPU, at the slot after the meta block (a
    mask, table or write index left on the CPU would fail earlier, with a device mismatch)."""
    folder, _ = model_dir(arch_name)
    engine = _meta_engine(cf.load(folder), [2, 3])
    ids, pos = torch.zeros(2, 14, dtype=torch.long), torch.arange(14).expand(2, 14).contiguous()
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[0, :3] = 0
    path = [0, 1, 2, 3, 2, 3, 4, 5]
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        engine.forward(ids, pos, mask, path, engine.new_cache(path, 2, 16), False)
    cache = engine.new_cache([0, 1, 2, 3], 2, 16)
    key_mask = torch.zeros(2, 16, dtype=torch.bool)
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):  # the fixed-shape decode step
        engine.decode_step(ids[:, :1], pos[:, :1], key_mask, torch.tensor([0]), [0, 1, 2, 3], cache)
    h = engine.run_slots(engine.embed(ids), pos, mask, path, None, 0, 2)  # slots on the CPU alone: no transfer
    assert h.device.type == "cpu"


# ------------------------------------------------------------------------ cuda:0 + cpu (GPU only)
@cuda
def test_cuda_cpu_split_matches_one_device(model_dir, arch, tmp_path):
    folder, hf = model_dir(arch)
    one = cf.load(folder, device="cuda")
    split = cf.load(folder, device_map={0: "cuda:0", 1: "cuda:0", 2: "cuda:0", 3: "cpu", 4: "cpu", 5: "cpu"})
    assert split.device == torch.device("cuda", 0) and split.placement.split
    ids = tokens(2, 20, seed=6).cuda()
    for name, path in PATHS.items():  # rys runs 0,1,2,3,2,3,4,5: crosses to the CPU and back
        out = split.logits(ids, layers=path)
        assert out.device.type == "cuda"
        assert report(f"{arch} cuda+cpu {name} vs cuda", out, one.logits(ids, layers=path)) < 2e-3  # CPU vs GPU sums
        with torch.no_grad():
            ref = rebuilt(hf, list(path))(ids.cpu()).logits
        assert report(f"{arch} cuda+cpu {name} vs transformers", out.cpu(), ref) < 2e-3
    mask = torch.ones_like(ids[:, :9])
    mask[1, :4] = 0
    new = split.generate(ids[:, :9], layers=PATHS["rys"], attention_mask=mask, max_new_tokens=8, min_new_tokens=8)
    full = torch.cat([ids[:, :9], new], 1)  # teacher-forced on the one-device model: each token its greedy pick
    logits = one.logits(full, layers=PATHS["rys"], attention_mask=torch.cat([mask, torch.ones_like(new)], 1)).clone()
    logits[..., 2] = float("-inf")  # EOS (2) was held back by min_new_tokens
    picked = logits[:, 8:-1].gather(-1, new.unsqueeze(-1)).squeeze(-1)
    gap = (logits[:, 8:-1].max(-1).values - picked).max().item()
    print(f"{arch} cuda+cpu greedy: largest gap to the one-device argmax {gap:.2e}")
    assert gap < 2e-3
    cache = split.engine.new_cache(list(PATHS["rys"]), 1, 4)
    assert [cache.device(s) for s in range(8)] == ["cuda:0"] * 3 + ["cpu", "cuda:0", "cpu", "cpu", "cpu"]
    cpu_first = cf.load(folder, device_map="cpu=2,cuda:0=4")  # embedding and head go to the GPU all the same
    assert cpu_first.device == torch.device("cuda", 0)
    assert report(f"{arch} cpu+cuda vs cuda", cpu_first.logits(ids), one.logits(ids)) < 2e-3


@cuda
def test_cuda_auto_map_splits_by_budget(chat_model_dir, tmp_path):
    folder = chat_model_dir
    one = cf.load(folder)
    per_layer = sum(t.numel() * 4 for n, t in one.tensors.items() if n.startswith("model.layers.0."))
    other = sum(t.numel() * 4 for n, t in one.tensors.items() if not n.startswith("model.layers."))
    split = cf.load(folder, device_map="auto", max_memory={"cuda:0": other + 2 * per_layer + 16, "cpu": "4GiB"})
    assert [d.type for d in split.placement.layers] == ["cuda"] * 2 + ["cpu"] * 4
    ids = tokens(1, 10, seed=7).cuda()
    assert report("auto split vs cpu", split.logits(ids).cpu(), one.logits(ids.cpu())) < 2e-3
    kw = dict(probes=["math"], block_sizes=[2], mode="likelihood", max_items=2, progress=False)
    assert len(cf.sweep(split, results=tmp_path / "s.jsonl", **kw)) > 2
