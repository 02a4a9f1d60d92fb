"""Quantized GGUF weights (issue #15): the default model's GGUF file through five routes, one run,
same threads — circuit-finder packed (the default: matrices stay Q4_1 / Q8_0), the same with
8-bit activations in its decode products (``activations="q8"``), circuit-finder dequantized to
fp32 (``dequantize=True``), transformers loading the same GGUF (it dequantizes to fp32), and
llama.cpp (llama-cpp-python, when installed; it builds from source: ``pip install
llama-cpp-python``; on a CPU with AMX it runs without its extra buffer types, AMX and repacked
layouts, which crashed there: tests/helpers.py's ``llama_cpp_model``).

``q8_agreement``: how often the 8-bit activations' top-1 token is the float route's, on the
default model's real weights: GSM8K validation prompts (chat template), 32 greedy tokens of the
float route, both routes teacher-forced through them one decode step at a time (batch 1, the
rows the 8-bit products take; each route's own prefill of the prompt before, in 8 bits too where
the CPU has the tiled kernels).

Per route: load time in a fresh process (tokenizer included; our tokenizer cache warmed first, as
a second load of a file would find it), resident memory added by the load (VmRSS after minus
before, in that process) and after a 64-token prompt and 16 generated tokens (every weight page
of a memory-mapped file then counts), prefill tokens/s (64-token prompt), decode tokens/s at batch 1 and 16
(greedy; per-step time = (time for 1 + n new tokens - time for 1 new token) / n, best of
--repeat). llama.cpp runs batch 1 through its high-level API (one sequence), so its batch-16 cell
is empty.

With a shape (``run.py --quant-model 8b``; run.py's RANDOM_SHAPES), the file is instead a llama
GGUF of that shape written here in llama.cpp's Q4_K_M type mix (``write_random_gguf``: random
real blocks, the default model's tokenizer), the size of the files our users sweep; the routes
whose fp32 weights do not fit in this machine's available memory are left out (with the reason),
and speed is measured at batch 1.

    .venv/bin/python benchmarks/bench_quant.py          # ~3 min on 2 cores
    .venv/bin/python benchmarks/run.py --sections quant # the same, inside the main benchmark
    .venv/bin/python benchmarks/run.py --sections quant --quant-model 8b  # a 4.5 GB file, ~6 min
    .venv/bin/python benchmarks/run.py --sections quant --quant-model 30b-a3b  # MoE: 12 of Qwen3-30B-A3B's layers
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PROMPT, NEW = 64, 32

_LOAD = r"""
import json, os, sys, time
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
route, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
import torch
torch.set_num_threads(threads)
if route == "llama.cpp":
    import llama_cpp  # noqa: F401  (imported before the baseline, as the other routes' libraries)
    sys.path.insert(0, os.path.join(sys.argv[4], "tests"))
    from helpers import llama_cpp_model
else:
    import circuit_finder as cf, transformers
before, t = rss(), time.perf_counter()
if route == "packed":
    m = cf.load(path)
elif route == "packed q8":
    m = cf.load(path, activations="q8")
elif route == "dequantized":
    m = cf.load(path, dequantize=True)
elif route == "transformers":
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
else:
    m = llama_cpp_model(path, n_threads=threads, n_ctx=512, verbose=False)
loaded, seconds = rss() - before, time.perf_counter() - t
ids = list(range(100, 164))  # then a 64-token prompt and 16 greedy tokens: every weight page read
if route in ("packed", "packed q8", "dequantized"):
    m.generate(torch.tensor([ids]), max_new_tokens=16)
elif route == "transformers":
    m.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
else:
    m.eval(ids)
    for _ in range(16):
        m.eval([100])
print(json.dumps({"load_s": seconds, "rss_bytes": loaded, "rss_used_bytes": rss() - before}))
"""


def load_figures(route: str, path: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _LOAD, route, path, str(threads), str(ROOT)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def ours_speed(model, batch: int, repeat: int) -> dict:
    from circuit_finder.generation import Sampling, generate_ids

    ids = torch.randint(100, 20000, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    path = model.path(None)

    def gen(n):
        return lambda: generate_ids(model, ids, None, path, Sampling(n, n, 0.0, 1.0, None))

    prefill = best(lambda: model.logits(ids), repeat)
    step = (best(gen(1 + NEW), repeat) - best(gen(1), repeat)) / NEW
    return {"prefill_tok_s": batch * PROMPT / prefill, "decode_tok_s": batch / step}


def hf_speed(model, batch: int, repeat: int) -> dict:
    ids = torch.randint(100, 20000, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)

    def gen(n):
        return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0)

    with torch.inference_mode():
        prefill = best(lambda: model(ids), repeat)
        step = (best(gen(1 + NEW), repeat) - best(gen(1), repeat)) / NEW
    return {"prefill_tok_s": batch * PROMPT / prefill, "decode_tok_s": batch / step}


def llama_cpp_speed(path: str, threads: int, repeat: int) -> dict:
    import llama_cpp
    import numpy as np

    from helpers import llama_cpp_model  # without its AMX layouts where the CPU has AMX (they crashed)

    llm = llama_cpp_model(path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=PROMPT, verbose=False)
    ids = torch.randint(100, 20000, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()

    def greedy() -> int:  # the last token's logits (llama.cpp computes only those)
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),)).argmax())

    def run(n):
        def go():
            llm.reset()
            llm.eval(ids)
            for _ in range(n):
                llm.eval([greedy()])
        return go

    prefill = best(run(0), repeat)
    step = (best(run(NEW), repeat) - prefill) / NEW
    return {"prefill_tok_s": PROMPT / prefill, "decode_tok_s": 1 / step}


def q4_k_m_type(name: str, layers: int, experts: int = 0) -> str:
    """llama.cpp's Q4_K_M choice for a GGUF matrix (``quants.mix_type``); the router float, as the
    converter keeps it."""
    from circuit_finder.quants import MixModel, mix_type

    if name.endswith("ffn_gate_inp.weight"):
        return "F32"
    return mix_type("Q4_K_M", name, MixModel(layers, experts))


# A mixture-of-experts file: Qwen3-30B-A3B's layer shape (hidden 2048, 32 / 4 heads of 128, 128
# experts of 768, top 8), `layers` of its 48 layers (the per-token time scales with them).
MOE_SHAPES = {"30b-a3b": dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8, expert_ffn=768,
                              layers=12)}
VOCAB = 49152  # the default model's tokenizer, copied into every random file


def _random_writer(dst: Path, arch: str, name: str, hidden: int, layers: int, heads: int, kv_heads: int):
    """A GGUFWriter for `arch` holding the default model's tokenizer, chat template and the rest of
    its general.* fields (copied field by field), and the shape keys every family has; the caller
    adds its own."""
    import gguf

    import circuit_finder as cf

    src, w = gguf.GGUFReader(cf.default_model_path()), gguf.GGUFWriter(str(dst), arch)
    skip = ("GGUF.", "llama.", "general.architecture", "general.file_type", "general.alignment", "general.name",
            "general.size_label")
    for f in src.fields.values():
        if not f.name.startswith(skip):
            w.add_key_value(f.name, f.contents(), f.types[0],
                            sub_type=f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    w.add_name(name), w.add_file_type(15)  # MOSTLY_Q4_K_M
    w.add_block_count(layers), w.add_context_length(8192), w.add_embedding_length(hidden)
    w.add_head_count(heads), w.add_head_count_kv(kv_heads), w.add_vocab_size(VOCAB)
    return w


def _common_shapes(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """{name: shape} of the embedding, head and each layer's attention and norms (no MLP)."""
    shapes = {"token_embd.weight": (VOCAB, hidden), "output_norm.weight": (hidden,), "output.weight": (VOCAB, hidden)}
    for i in range(layers):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (hidden,), b + "attn_q.weight": (heads * head_dim, hidden),
                       b + "attn_k.weight": (kv_heads * head_dim, hidden),
                       b + "attn_v.weight": (kv_heads * head_dim, hidden),
                       b + "attn_output.weight": (hidden, heads * head_dim), b + "ffn_norm.weight": (hidden,)})
    return shapes


def _write_random_tensors(w, dst: Path, shapes: dict, layers: int, experts: int = 0) -> Path:
    """Writes `shapes` ({name: shape}; vectors F32 ones, matrices and stacked [E, rows, K] experts in
    Q4_K_M's mix of random real blocks) one tensor at a time: the table first, then the data."""
    import gguf
    import numpy as np
    from bench_quant_gpu import random_blocks

    kinds = {name: "F32" if len(shape) == 1 else q4_k_m_type(name, layers, experts) for name, shape in shapes.items()}
    for name, shape in shapes.items():  # the tensor table first: sizes from the shapes, no data yet
        kind = gguf.GGMLQuantizationType[kinds[name]]
        block, size = gguf.GGML_QUANT_SIZES[kind]
        float_ = kinds[name] == "F32"
        stored = shape if float_ else (*shape[:-1], shape[-1] // block * size)
        dtype = np.dtype(np.float32 if float_ else np.uint8)
        w.add_tensor_info(name, stored, dtype, math.prod(stored) * dtype.itemsize, raw_dtype=kind)
    w.write_header_to_file(path=str(dst))
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    gen, made = torch.Generator().manual_seed(0), {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, np.float32))
        elif kinds[name] == "F32":  # a float matrix (the router): N(0, 0.02^2)
            w.write_tensor_data((torch.randn(shape, generator=gen) * 0.02).numpy())
        else:
            blocks = random_blocks(kinds[name], math.prod(shape[:-1]), shape[-1], "cpu", gen, made)
            w.write_tensor_data(blocks.view(*shape[:-1], -1).numpy())
    w.close()
    return dst


def write_random_gguf(dst: Path, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int) -> Path:
    """A llama GGUF of this shape in Q4_K_M's type mix: random real blocks (bench_quant_gpu's
    random_blocks: rows of N(0, 0.02^2) weights quantized by our quantizers), norms of ones, and the
    default model's tokenizer and 49152-token vocabulary. What a published Q4_K_M file of that size
    holds, without a download."""
    if hidden % 256 or ffn % 256:
        raise ValueError(f"a Q4_K_M file needs rows of whole 256-value blocks: hidden {hidden}, intermediate {ffn}")
    head_dim = hidden // heads
    w = _random_writer(dst, "llama", f"random llama {hidden}x{layers} Q4_K_M", hidden, layers, heads, kv_heads)
    w.add_feed_forward_length(ffn), w.add_rope_freq_base(500000.0), w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    shapes = _common_shapes(hidden, layers, heads, kv_heads, head_dim)
    for i in range(layers):
        shapes.update({f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    return _write_random_tensors(w, dst, shapes, layers)


def write_random_moe_gguf(dst: Path, hidden: int, heads: int, kv_heads: int, head_dim: int, experts: int, top_k: int,
                          expert_ffn: int, layers: int) -> Path:
    """A qwen3moe GGUF of this shape (every layer sparse, q / k norms, a float router) in Q4_K_M's
    type mix, as write_random_gguf: stacked ffn_{gate,up,down}_exps as llama.cpp's converter writes
    them."""
    w = _random_writer(dst, "qwen3moe", f"random qwen3moe {hidden}x{layers} {experts}x{expert_ffn} Q4_K_M", hidden,
                       layers, heads, kv_heads)
    w.add_feed_forward_length(4 * hidden), w.add_key_length(head_dim), w.add_value_length(head_dim)
    w.add_rope_freq_base(1000000.0), w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(experts), w.add_expert_used_count(top_k), w.add_expert_feed_forward_length(expert_ffn)
    shapes = _common_shapes(hidden, layers, heads, kv_heads, head_dim)
    for i in range(layers):
        b = f"blk.{i}."
        shapes.update({b + "attn_q_norm.weight": (head_dim,), b + "attn_k_norm.weight": (head_dim,),
                       b + "ffn_gate_inp.weight": (experts, hidden),
                       b + "ffn_gate_exps.weight": (experts, expert_ffn, hidden),
                       b + "ffn_up_exps.weight": (experts, expert_ffn, hidden),
                       b + "ffn_down_exps.weight": (experts, hidden, expert_ffn)})
    return _write_random_tensors(w, dst, shapes, layers, experts)


def available_bytes() -> int:
    """MemAvailable of this machine (/proc/meminfo), or 0 where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_quant(repeat: int = 2, batches=(1, 16), shape: tuple | str | None = None) -> dict:
    """The table's figures (see the module docstring): the default model's file, or with `shape`
    (hidden, intermediate, layers, heads, kv_heads, _) a random Q4_K_M file of that shape, or (a
    MOE_SHAPES name) a random qwen3moe Q4_K_M file of that shape; random files at batch 1."""
    import circuit_finder as cf

    with tempfile.TemporaryDirectory() as tmp:
        if shape is None:
            path, label = cf.default_model_path(), "default model GGUF"
        elif isinstance(shape, str):
            m = MOE_SHAPES[shape]
            path = str(write_random_moe_gguf(Path(tmp) / "random.gguf", **m))
            label = (f"random qwen3moe GGUF in Q4_K_M, {m['hidden']} hidden x {m['layers']} layers, "
                     f"{m['experts']} experts of {m['expert_ffn']}, top {m['top_k']}")
            batches = (1,)
        else:
            path = str(write_random_gguf(Path(tmp) / "random.gguf", *shape[:5]))
            label, batches = f"random llama GGUF in Q4_K_M, {shape[0]} hidden x {shape[2]} layers", (1,)
        res = _run_routes(path, repeat, batches)
        res["label"] = label
        if shape is None:  # random weights have no meaningful top-1
            res["q8_agreement"] = q8_agreement(path)
            print(json.dumps(res["q8_agreement"]), flush=True)
        return res


def _run_routes(path: str, repeat: int, batches) -> dict:
    import gguf

    import circuit_finder as cf

    threads, available = torch.get_num_threads(), available_bytes()
    cf.load(path)  # warms the tokenizer cache (keyed by the file's metadata), as any second load finds it
    fp32_bytes = 4 * sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)
    rows = []
    for route in ("packed", "packed q8", "dequantized", "transformers", "llama.cpp"):
        if route == "llama.cpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                rows.append({"route": route, "missing": "pip install llama-cpp-python"})
                continue
        if route in ("dequantized", "transformers") and 0 < available < fp32_bytes / 0.8:
            rows.append({"route": route, "missing": f"fp32 weights ~{fp32_bytes / 1e9:.0f} GB, "
                                                   f"{available / 1e9:.0f} GB available"})
            continue
        row, model = {"route": route, **load_figures(route, path, threads)}, None
        if route in ("packed", "packed q8", "dequantized"):
            model = cf.load(path, dequantize=route == "dequantized", activations="q8" if route == "packed q8" else "float")
            row["weight_bytes"] = model.weight_bytes()["cpu"]
            row.update({f"b{b}": ours_speed(model, b, repeat) for b in batches})
        elif route == "transformers":
            from transformers import AutoModelForCausalLM

            folder, name = os.path.split(path)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
            row.update({f"b{b}": hf_speed(model, b, repeat) for b in batches})
        else:
            row["b1"] = llama_cpp_speed(path, threads, repeat)
        del model
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"file_bytes": os.path.getsize(path), "threads": threads, "prompt": PROMPT, "new": NEW, "rows": rows}


def decode_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits [B, T - prompt, V] predicting tokens prompt.. of ids [B, T]: the prompt in one
    forward, then one decode step per token (B rows each, as generation runs them)."""
    layers = list(model.path(None))
    B, T = ids.shape
    positions = torch.arange(T).expand(B, T).contiguous()
    cache = model.engine.new_cache(layers, B, T)
    with torch.inference_mode():
        out = [model.engine.forward(ids[:, :prompt], positions[:, :prompt].contiguous(), None, layers, cache, True)]
        for t in range(prompt, T - 1):
            out.append(model.engine.forward(ids[:, t:t + 1], positions[:, t:t + 1].contiguous(), None, layers, cache,
                                            True))
    return torch.cat(out, 1).float()


def q8_agreement(path: str | None = None, items: int = 20, steps: int = 32) -> dict:
    """Top-1 agreement of activations="q8" with the float route (see the module docstring), with the
    largest logit difference relative to the float logits' range."""
    import circuit_finder as cf
    from circuit_finder.probes import get_probe

    path = path or cf.default_model_path()
    exact, q8 = cf.load(path), cf.load(path, activations="q8")
    same = total = whole = 0
    worst = 0.0
    for item in get_probe("gsm8k").items("validation")[:items]:
        prompt = exact.tokenizer.apply_chat_template([{"role": "user", "content": item.prompt}],
                                                     add_generation_prompt=True, return_tensors="pt")
        prompt = torch.as_tensor(prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]).reshape(1, -1)
        new = exact.generate(prompt, max_new_tokens=steps, min_new_tokens=steps)
        ids = torch.cat([prompt, new], 1)
        a, b = decode_logits(exact, ids, prompt.shape[1]), decode_logits(q8, ids, prompt.shape[1])
        agree = a.argmax(-1) == b.argmax(-1)
        same, total, whole = same + int(agree.sum()), total + agree.numel(), whole + int(agree.all())
        worst = max(worst, float((a - b).abs().max() / (a.max() - a.min())))
    return {"top1_agreement": same / total, "steps": total, "sequences_all_agree": whole, "sequences": items,
            "max_logit_diff_rel": worst}


def _cell(row: dict, batch: str, key: str) -> str:
    if batch not in row:
        return "-"
    value = row[batch][key]
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def markdown(res: dict) -> str:
    size = res["file_bytes"]
    lines = [f"{res.get('label', 'default model GGUF')} ({size / 1e6:.1f} MB file), {res['threads']} threads, prompt {res['prompt']}, "
             f"decode over {res['new']} tokens",
             "", "| route | load s | resident MB after load / after use (x file) | weights MB | prefill tok/s b1 / b16 | "
                 "decode tok/s b1 | decode tok/s b16 |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "missing" in r:
            lines.append(f"| {r['route']} | not run: {r['missing']} | | | | | |")
            continue
        weights = f"{r['weight_bytes'] / 1e6:.0f}" if "weight_bytes" in r else "-"
        lines.append(f"| {r['route']} | {r['load_s']:.2f} | {r['rss_bytes'] / 1e6:.0f} / {r['rss_used_bytes'] / 1e6:.0f} "
                     f"({r['rss_used_bytes'] / size:.2f}) | "
                     f"{weights} | {_cell(r, 'b1', 'prefill_tok_s')} / {_cell(r, 'b16', 'prefill_tok_s')} | "
                     f"{_cell(r, 'b1', 'decode_tok_s')} | {_cell(r, 'b16', 'decode_tok_s')} |")
    if "q8_agreement" in res:
        a = res["q8_agreement"]
        lines += ["", f"packed q8 vs packed: top-1 agreement {100 * a['top1_agreement']:.1f}% over {a['steps']} "
                      f"teacher-forced decode steps ({a['sequences_all_agree']} of {a['sequences']} sequences agree at "
                      f"every step; largest logit difference {100 * a['max_logit_diff_rel']:.1f}% of the logits' range)"]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="The default model's GGUF through every route (see the module text); "
                                             "a random file of a real shape: run.py --sections quant --quant-model 8b")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per figure, the best kept (default 2)")
    args = ap.parse_args()
    print(markdown(run_quant(repeat=args.repeat)))
