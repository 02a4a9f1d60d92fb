"""Quantized GGUF weights (issue #15): the default model's GGUF file through four routes, one run,
same threads — circuit-finder packed (the default: matrices stay Q4_1 / Q8_0), circuit-finder
dequantized to fp32 (``dequantize=True``), transformers loading the same GGUF (it dequantizes to
fp32), and llama.cpp (llama-cpp-python, when installed; it builds from source: ``pip install
llama-cpp-python``).

Per route: load time in a fresh process (tokenizer included; our tokenizer cache warmed first, as
a second load of a file would find it), resident memory added by the load (VmRSS after minus
before, in that process) and after a 64-token prompt and 16 generated tokens (every weight page
of a memory-mapped file then counts), prefill tokens/s (64-token prompt), decode tokens/s at batch 1 and 16
(greedy; per-step time = (time for 1 + n new tokens - time for 1 new token) / n, best of
--repeat). llama.cpp runs batch 1 through its high-level API (one sequence), so its batch-16 cell
is empty.

    .venv/bin/python benchmarks/bench_quant.py          # ~3 min on 2 cores
    .venv/bin/python benchmarks/run.py --sections quant # the same, inside the main benchmark
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEW = 64, 32

_LOAD = r"""
import json, os, sys, time
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
route, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
import torch
torch.set_num_threads(threads)
if route == "llama.cpp":
    import llama_cpp
else:
    import circuit_finder as cf, transformers
before, t = rss(), time.perf_counter()
if route == "packed":
    m = cf.load(path)
elif route == "dequantized":
    m = cf.load(path, dequantize=True)
elif route == "transformers":
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
else:
    m = llama_cpp.Llama(path, n_threads=threads, n_ctx=512, verbose=False)
loaded, seconds = rss() - before, time.perf_counter() - t
ids = list(range(100, 164))  # then a 64-token prompt and 16 greedy tokens: every weight page read
if route in ("packed", "dequantized"):
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
    out = subprocess.run([sys.executable, "-c", _LOAD, route, path, str(threads)], capture_output=True, text=True,
                         check=True)
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

    llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=PROMPT, verbose=False)
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


def run_quant(repeat: int = 2, batches=(1, 16)) -> dict:
    """The table's figures for the default model (see the module docstring)."""
    import circuit_finder as cf

    path, threads = cf.default_model_path(), torch.get_num_threads()
    cf.load(path)  # warms the tokenizer cache (keyed by the file's metadata), as any second load finds it
    rows = []
    for route in ("packed", "dequantized", "transformers", "llama.cpp"):
        if route == "llama.cpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                rows.append({"route": route, "missing": "pip install llama-cpp-python"})
                continue
        row, model = {"route": route, **load_figures(route, path, threads)}, None
        if route in ("packed", "dequantized"):
            model = cf.load(path, dequantize=route == "dequantized")
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


def _cell(row: dict, batch: str, key: str) -> str:
    return f"{row[batch][key]:.0f}" if batch in row else "-"


def markdown(res: dict) -> str:
    size = res["file_bytes"]
    lines = [f"default model GGUF ({size / 1e6:.1f} MB file), {res['threads']} threads, prompt {res['prompt']}, "
             f"decode over {res['new']} tokens",
             "", "| route | load s | resident MB after load / after use (x file) | weights MB | prefill tok/s b1 / b16 | "
                 "decode tok/s b1 | decode tok/s b16 |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "missing" in r:
            lines.append(f"| {r['route']} | not installed ({r['missing']}) | | | | | |")
            continue
        weights = f"{r['weight_bytes'] / 1e6:.0f}" if "weight_bytes" in r else "-"
        lines.append(f"| {r['route']} | {r['load_s']:.2f} | {r['rss_bytes'] / 1e6:.0f} / {r['rss_used_bytes'] / 1e6:.0f} "
                     f"({r['rss_used_bytes'] / size:.2f}) | "
                     f"{weights} | {_cell(r, 'b1', 'prefill_tok_s')} / {_cell(r, 'b16', 'prefill_tok_s')} | "
                     f"{_cell(r, 'b1', 'decode_tok_s')} | {_cell(r, 'b16', 'decode_tok_s')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    result = run_quant()
    print(markdown(result))
