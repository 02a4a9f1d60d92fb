"""Quantizing a Hugging Face checkpoint on load (issue #15, ``cf.load(folder, quantize=...)``): how
fast each type is made, one run, same machine and threads.

- matrices: a bf16 matrix of each of a shape's sizes (q / o: hidden x hidden; gate / up:
  intermediate x hidden; down: hidden x intermediate) packed by ours (``quantizers``, torch on
  --device; best of --repeat) and, for the types it has, by the `gguf` package's numpy quantizer
  (what circuit-finder used before, single-threaded on the host; ggml's reference rounding, the
  same bytes as ours): M weights/s and the ratio.
- quality (when llama-cpp-python is installed): our Q4_K / Q5_K / Q6_K against llama.cpp's own quantizer
  (``llama_model_quantize`` to Q4_K_M, Q5_K_M and Q6_K, no importance matrix) on the same F32 GGUF of a small
  random Llama (N(0, 0.02^2) weights, 1% of columns 4x heavier): relative RMS error of each tensor
  llama.cpp made in that type, both decoded by the gguf package.
- load: a random Llama checkpoint of the shape written here in bf16 (sharded safetensors, one
  shard a layer), loaded onto --device plain (bf16) and with each type's and mix's quantize=: seconds and
  G weights/s of the whole load (page cache warm: the files were just written).

    .venv/bin/python benchmarks/bench_quantize.py                    # 1B shape, ~3 min on 2 cores
    python benchmarks/bench_quantize.py --device cuda --shape 8b     # on a GPU: quantized there

Writes benchmarks/results/<date>-quantize-<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_quant import best  # noqa: E402
from run import RANDOM_SHAPES, cpu_name, shape_overrides  # noqa: E402

import circuit_finder as cf  # noqa: E402
from circuit_finder.quantizers import BLOCK, K_TYPES, QUANTIZE_TYPES, quantize_rows  # noqa: E402
from circuit_finder.quants import MIXES  # noqa: E402
from helpers import make_config  # noqa: E402

GGUF_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16")  # the types the gguf package quantizes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matrix_rates(shape: str, types, device: torch.device, repeat: int) -> list[dict]:
    """Per type and matrix size: M weights/s of ours on `device` and of the gguf package on the host."""
    import gguf

    h, i = RANDOM_SHAPES[shape][:2]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for label, (n, k) in {"q/o": (h, h), "gate/up": (i, h), "down": (h, i)}.items():
        w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
        for kind in types:
            if k % BLOCK[kind]:
                continue

            def ours(w=w, kind=kind):
                quantize_rows(w, kind, device=device)
                sync(device)
            row = {"matrix": label, "shape": [n, k], "type": kind,
                   "ours_M_weights_s": n * k / best(ours, repeat) / 1e6}
            if kind in GGUF_TYPES:
                flat = w.float().numpy()
                t0 = time.perf_counter()
                gguf.quants.quantize(flat, gguf.GGMLQuantizationType[kind])
                row["gguf_package_M_weights_s"] = n * k / (time.perf_counter() - t0) / 1e6
            rows.append(row)
            print(row, flush=True)
    return rows


def quality_vs_llama_cpp() -> list[dict] | None:
    """Relative RMS error of our K-quants and llama.cpp's, per type, over the tensors it quantized to
    that type; None without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import ctypes

    import gguf
    import numpy as np

    from helpers import build_hf_model, write_gguf

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = build_hf_model("llama", tmp / "hf", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=4, vocab_size=512, tie_word_embeddings=False,
                            rope_scaling=None)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() == 2:
                    heavy = 1 + 3 * (torch.rand(p.shape[1], generator=gen) < 0.01)
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02 * heavy)
        write_gguf(hf, tmp / "f32.gguf", qtype="F32")
        src = {t.name: np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
               for t in gguf.GGUFReader(str(tmp / "f32.gguf")).tensors}
        for ftype, label in ((15, "Q4_K_M"), (17, "Q5_K_M"), (18, "Q6_K")):
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            out = tmp / f"{label}.gguf"
            if llama_cpp.llama_model_quantize(str(tmp / "f32.gguf").encode(), str(out).encode(), ctypes.byref(params)):
                raise RuntimeError(f"llama.cpp could not quantize to {label}")
            errors: dict[str, list] = {}
            for t in gguf.GGUFReader(str(out)).tensors:
                kind = t.tensor_type.name
                if kind in K_TYPES:
                    w = src[t.name]
                    theirs = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(w.shape)
                    ours = gguf.quants.dequantize(quantize_rows(torch.from_numpy(w), kind).numpy(), t.tensor_type)
                    errors.setdefault(kind, []).append([_rel_rms(ours.reshape(w.shape), w), _rel_rms(theirs, w)])
            for kind, pairs in errors.items():
                ours_e, theirs_e = np.mean(pairs, axis=0)
                rows.append({"file": label, "type": kind, "tensors": len(pairs), "ours_rel_rms": float(ours_e),
                             "llama_cpp_rel_rms": float(theirs_e)})
                print(rows[-1], flush=True)
    return rows


def _rel_rms(decoded, w) -> float:
    return float(((decoded - w) ** 2).mean() ** 0.5 / (w ** 2).mean() ** 0.5)


def write_random_checkpoint(folder: Path, shape: str) -> int:
    """A random Llama of `shape` in bf16, N(0, 0.02^2) weights, one safetensors shard per layer (and
    one for the embedding, norm and head) with its index; returns the parameter count."""
    from safetensors.torch import save_file

    config = make_config("llama", **shape_overrides(shape)).to_dict()
    config["torch_dtype"] = "bfloat16"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    h, i, layers, heads, kv, vocab = RANDOM_SHAPES[shape]
    d = h // heads
    gen = torch.Generator().manual_seed(0)

    def rand(*size):
        return (torch.randn(*size, generator=gen) * 0.02).to(torch.bfloat16)

    index, count = {}, 0
    for layer in range(-1, layers):
        if layer < 0:
            name, tensors = "outer", {"model.embed_tokens.weight": rand(vocab, h), "lm_head.weight": rand(vocab, h),
                                      "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
        else:
            p = f"model.layers.{layer}."
            name, tensors = f"layer{layer}", {
                p + "self_attn.q_proj.weight": rand(heads * d, h), p + "self_attn.k_proj.weight": rand(kv * d, h),
                p + "self_attn.v_proj.weight": rand(kv * d, h), p + "self_attn.o_proj.weight": rand(h, heads * d),
                p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                p + "mlp.down_proj.weight": rand(h, i),
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        save_file(tensors, str(folder / f"{name}.safetensors"))
        index.update({n: f"{name}.safetensors" for n in tensors})
        count += sum(t.numel() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return count


def load_rates(shape: str, types, device: torch.device) -> list[dict]:
    """Seconds and G weights/s of cf.load onto `device`: plain bf16, then quantize= each type or mix."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / shape
        params = write_random_checkpoint(folder, shape)
        for kind in (None, *types):
            sync(device)
            t0 = time.perf_counter()
            model = cf.load(folder, device=device, dtype=torch.bfloat16, quantize=kind and kind.lower())
            sync(device)
            seconds = time.perf_counter() - t0
            row = {"quantize": kind, "params": params, "load_s": seconds, "G_weights_s": params / seconds / 1e9,
                   "weight_GB": sum(model.weight_bytes().values()) / 1e9}
            rows.append(row)
            print(row, flush=True)
            del model
    return rows


def markdown(res: dict) -> str:
    out = ["| matrix | type | ours M weights/s | gguf package M weights/s | ratio |", "|---|---|---|---|---|"]
    for r in res["matrices"]:
        theirs = r.get("gguf_package_M_weights_s")
        ratio = f"{r['ours_M_weights_s'] / theirs:.1f}x" if theirs else "-"
        out.append(f"| {r['matrix']} {r['shape'][0]}x{r['shape'][1]} | {r['type']} | {r['ours_M_weights_s']:.0f} | "
                   f"{f'{theirs:.0f}' if theirs else '- (none)'} | {ratio} |")
    if res.get("quality"):
        out += ["", "| llama.cpp file | type | tensors | ours relative RMS error | llama.cpp's | ours / theirs |",
                "|---|---|---|---|---|---|"]
        out += [f"| {q['file']} | {q['type']} | {q['tensors']} | {q['ours_rel_rms']:.5f} | {q['llama_cpp_rel_rms']:.5f} | "
                f"{q['ours_rel_rms'] / q['llama_cpp_rel_rms']:.3f} |" for q in res["quality"]]
    out += ["", "| load (" + res["meta"]["shape"] + " shape) | seconds | G weights/s | weights GB |", "|---|---|---|---|"]
    for r in res["loads"]:
        out.append(f"| {r['quantize'] or 'bf16, not quantized'} | {r['load_s']:.2f} | {r['G_weights_s']:.2f} | "
                   f"{r['weight_GB']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="1b", choices=sorted(RANDOM_SHAPES))
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0"], choices=QUANTIZE_TYPES)
    ap.add_argument("--mixes", nargs="*", default=["Q4_K_M"], choices=sorted(MIXES), help="llama.cpp's mixes: loads only")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny shape, two types: checks the script runs")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.types, args.mixes, args.repeat = "tiny", ["Q8_0", "Q4_K"], ["Q4_K_M"], 1
    device = torch.device(args.device)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(device), "shape": args.shape, "host": cpu_name(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()}
    res = {"meta": meta, "matrices": matrix_rates(args.shape, args.types, device, args.repeat),
           "quality": None if args.quick else quality_vs_llama_cpp(), "loads": load_rates(args.shape, [*args.types, *args.mixes], device)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{meta['date']}-quantize-{device.type}.json").write_text(json.dumps(res, indent=1))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
