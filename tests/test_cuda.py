"""The same engine on a GPU (CUDA or ROCm through torch devices): parity with transformers on the
device, and with our own CPU run. Skipped, with the reason, when no GPU is visible; the CPU twin
of each check lives in test_parity.py."""

from __future__ import annotations

import pytest
import torch

import circuit_finder as cf
from circuit_finder import LayerPath
from helpers import rebuilt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm device visible to torch")

PATH = LayerPath.duplicate(6, 2, 4)


def ids_on(device, batch=2, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 160, (batch, length), generator=g).to(device)


def test_cuda_logits_match_transformers_on_device(model_dir, arch):
    folder, hf = model_dir(arch)
    model = cf.load(folder, device="cuda")
    ref_model = rebuilt(hf, list(PATH)).to("cuda")
    ids = ids_on("cuda")
    with torch.no_grad():
        ref = ref_model(ids).logits
    out = model.logits(ids, layers=PATH)
    assert out.device.type == "cuda"
    diff = (out - ref).abs()
    print(f"{arch} cuda fp32: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}")
    assert diff.max().item() < 2e-3  # TF32-free fp32 GEMMs on GPU still reorder sums
    cpu = cf.load(folder).logits(ids.cpu(), layers=PATH)
    twin = (out.cpu() - cpu).abs()
    print(f"{arch} cuda vs cpu: max abs diff {twin.max().item():.3e}, mean {twin.mean().item():.3e}")
    assert twin.max().item() < 2e-3  # the same engine on two devices: only summation order differs


def test_cuda_greedy_generate_and_padding(model_dir, arch):
    folder, hf = model_dir(arch)
    model = cf.load(folder, device="cuda")
    ids = ids_on("cuda", length=7, seed=3)
    mask = torch.ones_like(ids)
    ids[1, :3] = 0
    mask[1, :3] = 0
    ref_model = rebuilt(hf, list(PATH)).to("cuda")
    with torch.no_grad():
        ref = ref_model.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                 pad_token_id=0)[:, 7:]
    ours = model.generate(ids, layers=PATH, attention_mask=mask, max_new_tokens=16, min_new_tokens=16)
    print(f"{arch} cuda generate: ours {ours[0].tolist()} ref {ref[0].tolist()}")
    assert torch.equal(ours, ref)


def test_cuda_bf16_error_within_twice_transformers(model_dir, arch):
    folder, hf = model_dir(arch)
    ids = ids_on("cuda", seed=5)
    ref32 = rebuilt(hf, list(PATH)).to("cuda")
    with torch.no_grad():
        exact = ref32(ids).logits.float()
        hf_err = (ref32.to(torch.bfloat16)(ids).logits.float() - exact).abs().mean().item()
    ours = cf.load(folder, device="cuda", dtype="bfloat16").logits(ids, layers=PATH).float()
    our_err = (ours - exact).abs().mean().item()
    print(f"{arch} cuda bf16: ours {our_err:.4e}, transformers {hf_err:.4e}")
    assert our_err <= 2 * hf_err + 1e-6


@pytest.mark.parametrize("mode", ["likelihood", "generate"])
def test_cuda_sweep_reuse_and_cpu_agreement(chat_model_dir, mode):
    """sweep() on the GPU: shared-prefix reuse == recomputing every path, and the same likelihood
    margins as the CPU run (generate mode: the same texts where greedy choices are not near-ties)."""
    gpu = cf.load(chat_model_dir, device="cuda")
    kw = dict(probes=("math", "eq", "reasoning"), block_sizes=(2, 3), mode=mode, max_items=3, progress=False)
    fast, plain = cf.sweep(gpu, **kw), cf.sweep(gpu, reuse=False, **kw)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in fast.records]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in plain.records]
    if mode == "likelihood":
        cpu = cf.sweep(cf.load(chat_model_dir), **kw)
        diffs = [abs(a["margins"][p][i] - b["margins"][p][i]) for a, b in zip(fast.records, cpu.records)
                 for p in a["margins"] for i in a["margins"][p]]
        print(f"cuda vs cpu likelihood margins: max abs diff {max(diffs):.3e}")
        assert max(diffs) < 1e-2
