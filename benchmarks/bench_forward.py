"""Prefill and decode throughput: circuit-finder vs transformers, same weights, layer path, batch,
dtype and device, in one run; prints tokens/s and the ratio (ours / transformers).

    .venv/bin/python benchmarks/bench_forward.py --size small --batch 1 --layers rys
    .venv/bin/python benchmarks/bench_forward.py --device cuda --dtype bfloat16 --size 1b

A benchmark, not a test: it asserts only that both produce the same greedy tokens (fp32).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import circuit_finder as cf  # noqa: E402
from circuit_finder import LayerPath  # noqa: E402
from helpers import build_hf_model, rebuilt  # noqa: E402

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "tiny": (256, 688, 8, 8, 4, 4096),
    "small": (576, 1536, 30, 9, 3, 49152),   # SmolLM2-135M's shape
    "1b": (2048, 5632, 22, 32, 4, 32000),    # TinyLlama-1.1B's shape
}


def build(size: str, folder: Path):
    h, i, n, heads, kv, vocab = SIZES[size]
    return build_hf_model("llama", folder, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                          num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                          tie_word_embeddings=False, rope_scaling=None, max_position_embeddings=4096)


def timed(fn, device, repeat):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layers", default="rys", help="'identity', 'rys' (middle third repeated) or path text")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = cf.model.resolve_dtype(args.dtype, torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        hf = build(args.size, Path(tmp))
        ours = cf.load(tmp, device=device, dtype=dtype)
    n = ours.num_layers
    if args.layers == "identity":
        path = LayerPath.identity(n)
    elif args.layers == "rys":
        path = LayerPath.duplicate(n, n // 3, 2 * n // 3)
    else:
        path = LayerPath.parse(args.layers)
    ref = rebuilt(hf, list(path)).to(device=device, dtype=dtype).eval()
    ids = torch.randint(3, ours.config.vocab_size, (args.batch, args.prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(device)

    with torch.inference_mode():
        t_ours_prefill, _ = timed(lambda: ours.logits(ids, layers=path), device, args.repeat)
        t_ref_prefill, _ = timed(lambda: ref(ids).logits, device, args.repeat)
        k = args.new_tokens
        t_ours_gen, a = timed(lambda: ours.generate(ids, layers=path, max_new_tokens=k, min_new_tokens=k), device,
                              args.repeat)
        t_ref_gen, b = timed(lambda: ref.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                                  pad_token_id=0)[:, ids.shape[1]:], device, args.repeat)
    # decode time = generation time minus one prefill
    t_ours_dec = max(t_ours_gen - t_ours_prefill, 1e-9)
    t_ref_dec = max(t_ref_gen - t_ref_prefill, 1e-9)
    prefill = (args.batch * args.prompt_len / t_ours_prefill, args.batch * args.prompt_len / t_ref_prefill)
    decode = (args.batch * (k - 1) / t_ours_dec, args.batch * (k - 1) / t_ref_dec)
    same = torch.equal(a, b)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads" + (
            f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "size": args.size,
        "params_M": round(sum(p.numel() for p in hf.parameters()) / 1e6, 1),
        "layers": str(path), "slots": len(path), "batch": args.batch, "prompt_len": args.prompt_len,
        "new_tokens": k,
        "prefill_tok_s": {"circuit_finder": round(prefill[0], 1), "transformers": round(prefill[1], 1),
                          "ratio": round(prefill[0] / prefill[1], 2)},
        "decode_tok_s": {"circuit_finder": round(decode[0], 1), "transformers": round(decode[1], 1),
                         "ratio": round(decode[0] / decode[1], 2)},
        "same_greedy_tokens": same,
    }
    print(f"| {result['date']} | {result['machine']} | torch {result['torch']} | {result['device']} "
          f"{result['dtype']} | {args.size} ({result['params_M']}M) | {len(path)} slots | batch {args.batch} | "
          f"prefill {prefill[0]:.0f} vs {prefill[1]:.0f} tok/s (x{prefill[0] / prefill[1]:.2f}) | "
          f"decode {decode[0]:.1f} vs {decode[1]:.1f} tok/s (x{decode[0] / decode[1]:.2f}) | same tokens: {same} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
