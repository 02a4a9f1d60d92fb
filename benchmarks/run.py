"""circuit-finder benchmarks: every figure a ratio against transformers measured in this run.

    .venv/bin/python benchmarks/run.py                  # CPU, fp32: forward + sweep (~15 min, 2 cores)
    python benchmarks/run.py --device cuda --dtype bfloat16 --sections forward
    .venv/bin/python benchmarks/run.py --quick          # seconds: a smoke run of every section

forward: prefill and decode tokens/s at batch 1 and 16, circuit-finder vs transformers with the same
weights, layer path (the middle third repeated, RYS), batch, dtype and device; on the default model
(SmolLM2-135M-Instruct, exported to a transformers folder) and a random Llama of TinyLlama-1.1B's
shape. Decode = seconds per step between the first and the last generated token (timestamps taken
as each token comes out, in both libraries), best of --repeat runs. Also the share
of the memory roofline decode reaches at batch 1: weight bytes read per token / time per token,
over the copy bandwidth measured here.

sweep: configs/minute of `circuit_finder.sweep()` (generate mode) against the naive loop a
researcher would write with transformers — per config, rebuild the model's layer list (deep
copies, one per slot) and `generate()` each prompt on its own — on the same probes and items;
the scores must be identical.

scan: sweep throughput at real scale: configs/minute of `sweep()` in likelihood and generate mode
(probes math, eq, reasoning, their search items) on --scan-model (e.g. 8b: a random Llama of
Llama-3-8B's shape, built on the device, with the default model's tokenizer), over an even spread
of --scan-configs configs of the full (i, j) scan, and the projected time of the whole scan. With
--profile, a torch.profiler table of one batch-1 decode (kernels by total time) is written too.

quant: the default model's GGUF packed (the default), packed with 8-bit decode activations, dequantized to fp32, in transformers and in
llama.cpp (benchmarks/bench_quant.py): load time, resident memory, prefill and decode tokens/s;
with --quant-model SHAPE, a random llama GGUF of that shape in Q4_K_M's type mix instead.

On a CUDA device the random shapes are built there, in the benchmark dtype (transformers' own
random init), and our Model runs over the very same tensors; nothing is written to disk.

Writes <out>/<date>-<device>.json and .md and prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_quant import MOE_SHAPES  # noqa: E402

import circuit_finder as cf  # noqa: E402
from circuit_finder import LayerPath  # noqa: E402
from circuit_finder.generation import Sampling, generate_ids  # noqa: E402
from circuit_finder.loading import resolve_dtype  # noqa: E402
from circuit_finder.sweep import SweepConfig, make_configs, resolve_probes  # noqa: E402
from helpers import build_hf_model, make_config, rebuilt  # noqa: E402

# name: (hidden, intermediate, layers, heads, kv_heads, vocab)
RANDOM_SHAPES = {
    "tiny": (256, 688, 8, 8, 4, 4096),
    "small": (576, 1536, 30, 9, 3, 49152),  # SmolLM2-135M's shape
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B's shape
    "8b": (4096, 14336, 32, 32, 8, 128256),  # Llama-3-8B's shape
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes moved per second (read + write) copying a 256 MiB buffer, best of 5."""
    a = torch.ones(64 * 1024 * 1024, device=device)
    b = torch.empty_like(a)
    t = best_time(lambda: b.copy_(a), device, 5)
    return 2 * a.numel() * a.element_size() / t


def weight_bytes_per_token(model: cf.Model, path: LayerPath) -> int:
    """Bytes of weights one decode step reads along the path (each slot's layer, norm, LM head); a
    packed matrix counts its blocks."""
    def size(t) -> int:
        return t.nbytes if hasattr(t, "blocks") else t.numel() * t.element_size()

    per_layer: dict[int, int] = {}
    for name, t in model.tensors.items():
        parts = name.split(".")
        if len(parts) > 2 and parts[1] == "layers":
            per_layer[int(parts[2])] = per_layer.get(int(parts[2]), 0) + size(t)
    head = model.tensors.get("lm_head.weight", model.tensors["model.embed_tokens.weight"])
    return sum(per_layer[i] for i in path) + size(head) + size(model.tensors["model.norm.weight"])


# ------------------------------------------------------------------------------------------- models
def default_pair(folder: Path, device, dtype):
    from transformers import AutoModelForCausalLM

    ours = cf.load("default", device=device, dtype=dtype)
    cf.export.export_hf(ours, folder / "hf", layers=None)
    hf = AutoModelForCausalLM.from_pretrained(str(folder / "hf"), dtype=torch.float32).eval()
    return "SmolLM2-135M-Instruct (default)", ours, hf


def shape_overrides(shape: str) -> dict:
    h, i, n, heads, kv, vocab = RANDOM_SHAPES[shape]
    return dict(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=False, rope_scaling=None,
                max_position_embeddings=4096)


def random_pair(shape: str, folder: Path, device, dtype):
    if torch.device(device).type == "cuda":
        return device_pair(shape, device, dtype)
    hf = build_hf_model("llama", folder, **shape_overrides(shape))
    return f"random Llama, {shape} shape", cf.load(folder, device=device, dtype=dtype), hf


def device_pair(shape: str, device, dtype, tokenizer=None):
    """A random Llama built on the device in `dtype` (transformers' init), and our Model over the
    very same tensors (no copy; on a GPU but for q / k / v and gate / up, laid out as one matrix each
    as ``cf.load`` does there: copies beside transformers' tensors): for shapes too large to build
    in fp32 on the host and save, and for the scan's model (any device, with a tokenizer)."""
    from transformers import AutoModelForCausalLM

    config = make_config("llama", **shape_overrides(shape))
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    ours = cf.load_from_tensors(config.to_dict(), dict(hf.state_dict()), tokenizer=tokenizer, device=device,
                                dtype=dtype, source=f"random-{shape}",
                                fuse_projections=True if torch.device(device).type == "cuda" else None)
    return f"random Llama, {shape} shape", ours, hf


# ------------------------------------------------------------------------------------------ forward
def bench_path(model: cf.Model) -> LayerPath:
    """The path every forward figure is taken on: the middle third of the layers run twice (RYS)."""
    n = model.num_layers
    return LayerPath.duplicate(n, n // 3, 2 * n // 3)


def dense_gemv_applies(model: cf.Model, batch: int) -> bool:
    """Whether CF_DENSE_GEMV=1 would change this model's decode steps: our GPU kernels, half-precision
    weights, at most 8 rows a step (ops.h's dense_gemv)."""
    return (model.device.type == "cuda" and cf._C.gpu_kernels() and batch <= 8
            and model.dtype in (torch.bfloat16, torch.float16))


def bench_forward(label, ours: cf.Model, ref, batch: int, prompt_len: int, new_tokens: int, repeat: int,
                  bandwidth: float | None, unfused: cf.Model | None = None, dense_ab: bool = False) -> dict:
    """ref: the transformers model rebuilt along bench_path(ours), on ours' device and dtype;
    unfused: ours over the same weights with q / k / v and gate / up run as separate products (our
    previous path: its decode rates, and fused / unfused, in the same run); dense_ab: also decode
    with CF_DENSE_GEMV=1 where it applies (dense_gemv_applies), in the same run."""
    device = ours.device
    path = bench_path(ours)
    gemv_ab = dense_ab and dense_gemv_applies(ours, batch)
    ids = torch.randint(3, ours.config.vocab_size, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(batch)).to(device)
    k = new_tokens

    def ours_gen(m, on_step=None, model=ours):
        return generate_ids(model, ids, None, path, Sampling(m, m), on_step=on_step)

    def ref_gen(m, processors=None):
        return ref.generate(ids, max_new_tokens=m, min_new_tokens=m, do_sample=False, pad_token_id=0,
                            eos_token_id=None, logits_processor=processors)[:, prompt_len:]

    def step_time(run) -> tuple[float, float]:
        """Seconds per decode step from timestamps taken as each token comes out: (first to last,
        the median step of the second half). The second excludes one-time work of the first steps
        (on CUDA, our first two steps run eagerly and capture the graph that later steps replay)."""
        best, steady = float("inf"), float("inf")
        for _ in range(repeat):
            stamps: list[float] = []

            def stamp(into=stamps):
                sync(device)
                into.append(time.perf_counter())

            run(stamp)
            best = min(best, (stamps[-1] - stamps[0]) / (len(stamps) - 1))
            steps = sorted(b - a for a, b in zip(stamps[len(stamps) // 2:], stamps[len(stamps) // 2 + 1:]))
            steady = min(steady, steps[len(steps) // 2])
        return best, steady

    class Stamp:  # a transformers logits processor: called once per generated token
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, input_ids, scores):
            self.fn()
            return scores

    from transformers import LogitsProcessorList

    with torch.inference_mode():
        t_ours_prefill = best_time(lambda: ours.logits(ids, layers=path), device, repeat)
        t_ref_prefill = best_time(lambda: ref(ids).logits, device, repeat)
        ours_gen(2)  # warm-up
        t_ours_step, t_ours_steady = step_time(lambda fn: ours_gen(k, lambda tok, fin: fn()))
        t_ref_step, t_ref_steady = step_time(lambda fn: ref_gen(k, LogitsProcessorList([Stamp(fn)])))
        same = torch.equal(ours_gen(k), ref_gen(k))
        if unfused is not None:
            ours_gen(2, model=unfused)
            t_plain_step, t_plain_steady = step_time(lambda fn: ours_gen(k, lambda tok, fin: fn(), unfused))
        if gemv_ab:  # the opt-in route for half-precision decode products, same run
            with mock.patch.dict(os.environ, {"CF_DENSE_GEMV": "1"}):
                ours_gen(2)
                t_gemv_step, t_gemv_steady = step_time(lambda fn: ours_gen(k, lambda tok, fin: fn()))
    out = {
        "model": label, "params_M": round(sum(t.numel() for t in ours.tensors.values()) / 1e6, 1),
        "layers": str(path), "slots": len(path), "batch": batch, "prompt_len": prompt_len, "new_tokens": k,
        "prefill_tok_s": {"circuit_finder": batch * prompt_len / t_ours_prefill,
                          "transformers": batch * prompt_len / t_ref_prefill},
        "decode_tok_s": {"circuit_finder": batch / t_ours_step, "transformers": batch / t_ref_step},
        "decode_steady_tok_s": {"circuit_finder": batch / t_ours_steady, "transformers": batch / t_ref_steady},
        "same_greedy_tokens": same,
    }
    for key in ("prefill_tok_s", "decode_tok_s", "decode_steady_tok_s"):
        d = out[key]
        d["ratio"] = d["circuit_finder"] / d["transformers"]
    if unfused is not None:
        out["fused_products"] = ours.fused_products()
        out["unfused_decode_tok_s"] = {"all": batch / t_plain_step, "steady": batch / t_plain_steady,
                                       "fused_ratio_all": t_plain_step / t_ours_step,
                                       "fused_ratio_steady": t_plain_steady / t_ours_steady}
    if gemv_ab:
        out["dense_gemv_decode_tok_s"] = {"all": batch / t_gemv_step, "steady": batch / t_gemv_steady,
                                          "vs_default_all": t_ours_step / t_gemv_step,
                                          "vs_default_steady": t_ours_steady / t_gemv_steady}
        if bandwidth and batch == 1:
            out["dense_gemv_decode_tok_s"]["steady_roofline"] = (weight_bytes_per_token(ours, path) / t_gemv_steady
                                                                 / bandwidth)
    if bandwidth and batch == 1:
        out["decode_roofline"] = weight_bytes_per_token(ours, path) / t_ours_step / bandwidth
        out["decode_steady_roofline"] = weight_bytes_per_token(ours, path) / t_ours_steady / bandwidth
    return out


# -------------------------------------------------------------------------------------------- sweep
def naive_sweep(model: cf.Model, hf, probes, configs, max_items: int) -> dict:
    """Per config: a transformers model with the path's layers (deep copies), generate() per prompt."""
    eos, pad = model.codec.eos_ids, model.codec.pad_id
    out = {}
    for c in configs:
        m = rebuilt(hf, list(c.layers)).to(device=model.device, dtype=model.dtype).eval()
        scores = {}
        for p in probes:
            for it in p.items("search")[:max_items]:
                ids = torch.tensor([model.codec.encode_prompt(it.prompt, chat=True)], device=model.device)
                with torch.inference_mode():
                    g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_new_tokens,
                                   do_sample=False, eos_token_id=eos, pad_token_id=pad)
                text = model.codec.finish(g[0, ids.shape[1]:].tolist()).text
                scores.setdefault(p.name, {})[it.id] = float(p.score(it, text))
        out[c.key] = scores
        del m
    return out


def bench_sweep(ours: cf.Model, hf, probe_names, block_size: int, stride: int, max_items: int) -> dict:
    n = ours.num_layers
    probes = resolve_probes(probe_names)
    configs = make_configs(n, "grid", (block_size,), None, stride, (2,))
    identity = SweepConfig(LayerPath.identity(n))
    t = time.perf_counter()
    result = cf.sweep(ours, probes=probes, paths=[c.layers for c in configs], mode="generate", max_items=max_items,
                      chat=True, progress=False)
    sync(ours.device)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    naive = naive_sweep(ours, hf, probes, [identity, *configs], max_items)
    t_naive = time.perf_counter() - t
    ours_scores = {r["layers"]: r["scores"] for r in result.records}
    total = sum(len(v) for s in naive.values() for v in s.values())
    same = sum(ours_scores[key][p][i] == s for key, ps in naive.items() for p, items in ps.items()
               for i, s in items.items())
    count = len(configs) + 1
    return {"model": "SmolLM2-135M-Instruct (default)", "mode": "generate", "probes": list(probe_names),
            "items_per_probe": max_items, "configs": count,
            "configs_per_min": {"circuit_finder": 60 * count / t_ours, "transformers_naive": 60 * count / t_naive},
            "seconds": {"circuit_finder": t_ours, "transformers_naive": t_naive},
            "ratio": t_naive / t_ours, "identical_scores": same == total, "scores_compared": total,
            "scores_equal": same}


# --------------------------------------------------------------------------------------------- scan
def scan_model(name: str, device, dtype, tokenizer_folder: str | None = None):
    """The model the scan section sweeps: 'default', or a random shape with the default model's
    tokenizer or a saved one (the shape's vocabulary must hold its ids)."""
    if name == "default":
        return "SmolLM2-135M-Instruct (default)", cf.load("default", device=device, dtype=dtype)
    if tokenizer_folder:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    else:
        tokenizer = cf.load("default").tokenizer
    if RANDOM_SHAPES[name][5] < len(tokenizer):
        raise SystemExit(f"--scan-model {name}: vocabulary {RANDOM_SHAPES[name][5]} < the tokenizer's {len(tokenizer)}")
    label, ours, _ = device_pair(name, device, dtype, tokenizer)
    return label, ours


def bench_scan(label: str, ours: cf.Model, probe_names, count: int, max_items: int | None) -> list[dict]:
    """configs/min of sweep() over `count` configs spread evenly over the full (i, j) scan (the
    baseline too), per mode; projected minutes for the whole scan: the measured seconds per slot
    (a config's cost grows with its path's length) times the scan's slots."""
    n = ours.num_layers
    full = make_configs(n, "scan")
    step = max(1, len(full) // count)
    chosen = [c.layers for c in full[::step][:count]]
    # cost grows with a config's slots: project by slots, not by config count (the baseline runs too)
    slots_full, slots_timed = n + sum(len(c.layers) for c in full), n + sum(len(p) for p in chosen)
    rows = []
    for mode in ("likelihood", "generate"):
        sync(ours.device)
        t = time.perf_counter()
        result = cf.sweep(ours, probes=probe_names, paths=chosen, mode=mode, max_items=max_items, progress=False)
        sync(ours.device)
        seconds = time.perf_counter() - t
        rate = 60 * len(result.records) / seconds
        items = {p: len(v) for p, v in result.records[0]["scores"].items()}
        rows.append({"model": label, "params_M": round(sum(t.numel() for t in ours.tensors.values()) / 1e6, 1),
                     "mode": mode, "configs": len(result.records), "items": items, "seconds": seconds,
                     "configs_per_min": rate, "scan_configs": len(full) + 1,
                     "mean_slots": {"timed": slots_timed / len(result.records), "scan": slots_full / (len(full) + 1)},
                     "projected_scan_min": seconds * slots_full / slots_timed / 60})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def profile_decode(ours: cf.Model, out: Path, steps: int = 8) -> str:
    """Kernel table (by total device time) of `steps` batch-1 decode steps along bench_path, CUDA
    graphs off so that each kernel shows; written to <out>/profile-decode.txt."""
    from torch.profiler import ProfilerActivity, profile

    path = bench_path(ours)
    ids = torch.randint(3, ours.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)).to(ours.device)
    graphs, ours.cuda_graphs = ours.cuda_graphs, False
    generate_ids(ours, ids, None, path, Sampling(2, 2))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate_ids(ours, ids, None, path, Sampling(steps + 1, steps + 1))  # the first token comes from the prefill
        sync(ours.device)
    ours.cuda_graphs = graphs
    table = prof.key_averages().table(sort_by="cuda_time_total" if ours.device.type == "cuda" else "cpu_time_total",
                                      row_limit=30)
    (out / "profile-decode.txt").write_text(f"{steps} decode steps after one prefill of 64 tokens, batch 1, {path}\n{table}\n")
    return table


# ------------------------------------------------------------------------------------------- report
def _pair_table(forward: list, key: str, title: str, cells) -> list[str]:
    """Markdown lines comparing two decode routes over the forward rows holding `key`: cells(row,
    row[key]) -> (all a, all b, ratio, steady a, steady b, ratio, steady b1 roofline or None)."""
    rows = [f for f in forward if key in f]
    if not rows:
        return []
    out = ["", f"| model | batch | decode tok/s {title} | ratio | steady | ratio | steady b1 roofline |",
           "|---|---|---|---|---|---|---|"]
    for f in rows:
        a, b, r, sa, sb, sr, roof = cells(f, f[key])
        out.append(f"| {f['model']} | {f['batch']} | {a:.1f} / {b:.1f} | {r:.3f} | {sa:.1f} / {sb:.1f} | {sr:.3f} | "
                   f"{f'{100 * roof:.0f}%' if roof else ''} |")
    return out


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"### {m['date']}, {m['machine']}, torch {m['torch']}, {m['device']} {m['dtype']}", ""]
    if res.get("forward"):
        lines += ["| model (params) | slots | batch | prefill tok/s ours / HF | ratio | decode tok/s ours / HF | ratio "
                  "| steady decode tok/s ours / HF | ratio | b1 roofline (all / steady) | same greedy tokens |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for f in res["forward"]:
            p, d = f["prefill_tok_s"], f["decode_tok_s"]
            st = f.get("decode_steady_tok_s", d)
            roof = (f"{100 * f['decode_roofline']:.0f}% / {100 * f['decode_steady_roofline']:.0f}%"
                    if "decode_roofline" in f else "")
            lines.append(f"| {f['model']} ({f['params_M']}M) | {f['slots']} | {f['batch']} | "
                         f"{p['circuit_finder']:.0f} / {p['transformers']:.0f} | {p['ratio']:.2f} | "
                         f"{d['circuit_finder']:.1f} / {d['transformers']:.1f} | {d['ratio']:.2f} | "
                         f"{st['circuit_finder']:.1f} / {st['transformers']:.1f} | {st['ratio']:.2f} | {roof} | "
                         f"{'yes' if f['same_greedy_tokens'] else 'no'} |")
        lines += _pair_table(res["forward"], "unfused_decode_tok_s", "fused / unfused (q/k/v, gate/up)",
                             lambda f, u: (f["decode_tok_s"]["circuit_finder"], u["all"], u["fused_ratio_all"],
                                           f["decode_steady_tok_s"]["circuit_finder"], u["steady"],
                                           u["fused_ratio_steady"], None))
        lines += _pair_table(res["forward"], "dense_gemv_decode_tok_s", "CF_DENSE_GEMV=1 / default",
                             lambda f, g: (g["all"], f["decode_tok_s"]["circuit_finder"], g["vs_default_all"],
                                           g["steady"], f["decode_steady_tok_s"]["circuit_finder"],
                                           g["vs_default_steady"], g.get("steady_roofline")))
        if m.get("copy_bandwidth_GB_s"):
            lines += ["", f"Copy bandwidth measured in this run: {m['copy_bandwidth_GB_s']:.1f} GB/s (read + write)."]
        lines.append("")
    s = res.get("sweep")
    if s:
        c = s["configs_per_min"]
        lines += ["| sweep | configs | probes x items | configs/min ours / naive HF loop | ratio | identical scores |",
                  "|---|---|---|---|---|---|",
                  f"| {s['model']}, {s['mode']} | {s['configs']} | {len(s['probes'])} x {s['items_per_probe']} | "
                  f"{c['circuit_finder']:.2f} / {c['transformers_naive']:.2f} | {s['ratio']:.2f} | "
                  f"{'yes' if s['identical_scores'] else 'no'} ({s['scores_equal']}/{s['scores_compared']}) |", ""]
    if res.get("scan"):
        lines += ["| scan model (params) | mode | configs timed | items per probe | configs/min | full scan (configs) "
                  "| projected full scan |", "|---|---|---|---|---|---|---|"]
        for r in res["scan"]:
            items = ", ".join(f"{p} {k}" for p, k in r["items"].items())
            lines.append(f"| {r['model']} ({r['params_M']}M) | {r['mode']} | {r['configs']} | {items} | "
                         f"{r['configs_per_min']:.1f} | {r['scan_configs']} | {r['projected_scan_min']:.1f} min |")
        lines.append("")
    if res.get("quant"):
        from bench_quant import markdown as quant_markdown

        lines += ["", quant_markdown(res["quant"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", choices=["forward", "sweep", "scan", "quant"], default=["forward", "sweep"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", nargs="+", default=["default", "1b"], help="'default' and/or random shapes "
                    f"{sorted(RANDOM_SHAPES)}")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sweep-items", type=int, default=8, help="search items per probe in the sweep section")
    ap.add_argument("--scan-model", default="default", help="'default' or a random shape, for the scan section")
    ap.add_argument("--scan-configs", type=int, default=8, help="configs of the full scan timed per mode")
    ap.add_argument("--tokenizer", default=None, help="a saved tokenizer folder for the scan's random model "
                    "(default: the default model's, built from its GGUF)")
    ap.add_argument("--scan-items", type=int, default=None, help="search items per probe (default: all)")
    ap.add_argument("--quant-model", default="default", choices=["default", *RANDOM_SHAPES, *MOE_SHAPES],
                    help="the quant section's file: the default model's, or a random Q4_K_M GGUF of that shape "
                    "written to a temporary folder (1b, 8b: rows of whole 256-value blocks; 30b-a3b: a qwen3moe "
                    "file with 12 of Qwen3-30B-A3B's layers)")
    ap.add_argument("--profile", action="store_true", help="write a batch-1 decode profile of each forward model")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs (seconds)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, torch.float32)
    if args.quick:
        args.models, args.batches, args.repeat = ["tiny"], [1, 2], 1
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{cpu_name()} ({platform.machine()}), "
            f"{torch.get_num_threads()} CPU threads" + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
            "torch": torch.__version__, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "cpu_kernels": cf._C.cpu_isa(), "quick": args.quick}
    res: dict = {"meta": meta, "forward": [], "sweep": None, "scan": [], "quant": None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "forward" in args.sections:
        bandwidth = copy_bandwidth(device)
        meta["copy_bandwidth_GB_s"] = bandwidth / 1e9
        for name in args.models:
            with tempfile.TemporaryDirectory() as tmp:
                label, ours, hf = (default_pair(Path(tmp), device, dtype) if name == "default"
                                   else random_pair(name, Path(tmp), device, dtype))
                ref = rebuilt(hf, list(bench_path(ours))).to(device=device, dtype=dtype).eval()
                unfused = None  # where ours runs fused products, the same weights without (our previous path)
                if ours.fused_products()["qkv"] and name != "default":
                    unfused = cf.load_from_tensors(hf.config.to_dict(), dict(hf.state_dict()), device=device,
                                                   dtype=dtype, source=ours.source, fuse_projections=False)
                del hf  # the rebuilt copy is all the forward figures need
                big = ours.config.hidden_size >= 2048 and device.type == "cpu"
                for b in args.batches:
                    prompt = 8 if args.quick else (32 if big else 64)
                    new = 4 if args.quick else (8 if big else (32 if device.type == "cuda" else 16))
                    r = bench_forward(label, ours, ref, b, prompt, new, args.repeat, bandwidth, unfused, dense_ab=True)
                    res["forward"].append(r)
                    print(json.dumps(r), flush=True)
                if args.profile:
                    print(profile_decode(ours, out), flush=True)
                del ours, ref, unfused
    if "sweep" in args.sections:
        with tempfile.TemporaryDirectory() as tmp:
            _, ours, hf = default_pair(Path(tmp), device, dtype)
            probes = ["math"] if args.quick else ["math", "eq", "reasoning"]
            res["sweep"] = bench_sweep(ours, hf, probes, block_size=4, stride=8 if args.quick else 6,
                                       max_items=1 if args.quick else args.sweep_items)
            print(json.dumps(res["sweep"]), flush=True)
    if "scan" in args.sections:
        label, ours = scan_model("default" if args.quick else args.scan_model, device, dtype, args.tokenizer)
        res["scan"] = bench_scan(label, ours, ["math", "eq", "reasoning"], 2 if args.quick else args.scan_configs,
                                 1 if args.quick else args.scan_items)
        del ours
    if "quant" in args.sections:  # the default model's GGUF: packed, dequantized, transformers, llama.cpp (CPU)
        from bench_quant import run_quant

        shape = None if args.quant_model == "default" else RANDOM_SHAPES.get(args.quant_model, args.quant_model)
        res["quant"] = run_quant(1 if args.quick else args.repeat, (1,) if args.quick else (1, 16), shape)
    stem = (f"{meta['date']}-{device.type}-{meta['dtype']}" + ("-quick" if args.quick else "")
            + (f"-quant-{args.quant_model}" if "quant" in args.sections and args.quant_model != "default" else "")
            + (f"-{os.environ['CF_CPU_ISA']}" if os.environ.get("CF_CPU_ISA") else ""))
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    text = markdown(res)
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)
    print(f"written: {out / stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
