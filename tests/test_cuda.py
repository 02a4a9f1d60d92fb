"""The same engine on a GPU (CUDA or ROCm through torch devices): parity with transformers on the
device in fp32, and bf16 / fp16 errors against transformers' own, for every family the engine runs
(dense, mixture-of-experts, hybrid linear attention); with our own CPU run; fixed-shape decode (a
CUDA graph where the family allows one) against the dynamic decode. Skipped, with the reason, when
no GPU is visible; the CPU twins live in test_parity.py, test_moe.py and test_hybrid.py."""

from __future__ import annotations

import pytest
import torch

import circuit_finder as cf
from circuit_finder import LayerPath
from helpers import HYBRID_ARCHS, MOE_ARCHS, build_hf_model, half_errors, rebuilt, relative, tokens

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_error_within_twice_transformers(model_dir, arch, dtype):
    folder, hf = model_dir(arch)
    our_err, hf_err = half_errors(arch, hf, folder, ids_on("cuda", seed=5), PATH, dtype)
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


# ------------------------------------------------------------ mixture-of-experts and hybrid families
FAMILY_PATH = LayerPath.duplicate(6, 1, 4)  # MoE and linear-attention layers both repeated


@pytest.fixture(scope="module", params=MOE_ARCHS + HYBRID_ARCHS)
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, build_hf_model(request.param, folder)


def test_cuda_family_logits_match_transformers_on_device(family):
    arch, folder, hf = family
    model = cf.load(folder, device="cuda")
    ids = tokens(2, 70, seed=21).cuda()  # over one 64-token chunk of the linear-attention prefill
    with torch.no_grad():
        ref = rebuilt(hf, list(FAMILY_PATH)).to("cuda")(ids).logits
    out = model.logits(ids, layers=FAMILY_PATH)
    assert out.device.type == "cuda"
    assert relative(f"{arch} cuda fp32 vs transformers", out, ref) < 1e-3
    cpu = cf.load(folder).logits(ids.cpu(), layers=FAMILY_PATH)
    assert relative(f"{arch} cuda vs cpu", out.cpu(), cpu) < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_family_half_error_within_twice_transformers(family, dtype):
    arch, folder, hf = family
    our_err, hf_err = half_errors(arch, hf, folder, tokens(2, 24, seed=22).cuda(), FAMILY_PATH, dtype)
    assert our_err <= 2 * hf_err + 1e-6


def test_cuda_family_generation_fixed_shape_and_transformers(family):
    """Greedy, padded: transformers' tokens on the device; the fixed-shape decode (graph-replayed
    where the family allows) gives the dynamic decode's tokens."""
    arch, folder, hf = family
    model = cf.load(folder, device="cuda")
    ids, mask = tokens(2, 9, seed=23), torch.ones(2, 9, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        ref = rebuilt(hf, list(FAMILY_PATH)).to("cuda").generate(
            ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)[:, 9:]
    kw = dict(layers=FAMILY_PATH, attention_mask=mask, max_new_tokens=10, min_new_tokens=10)
    model.static_decode = False
    dynamic = model.generate(ids, **kw)
    model.static_decode = True
    fixed = model.generate(ids, **kw)
    print(f"{arch} cuda generate: dynamic {dynamic.tolist()} fixed {fixed.tolist()} transformers {ref.tolist()}")
    assert torch.equal(fixed, dynamic)
    assert torch.equal(dynamic, ref)


def test_cuda_rows_ending_early_give_transformers_tokens_and_length(model_dir):
    """Graph-replayed decode with the host reading "all finished" every 8th step: rows that end at
    different steps give transformers' tokens, and the surplus steps' pad columns are cut."""
    folder, hf = model_dir("llama")
    model = cf.load(folder, device="cuda")
    ids = tokens(3, 6, seed=11).cuda()
    rows = model.generate(ids, max_new_tokens=30, min_new_tokens=30).tolist()
    eos = sorted({rows[0][3], rows[1][9], rows[2][14]})
    ends = [min(r.index(t) for t in eos if t in r) for r in rows]
    with torch.no_grad():
        ref = hf.to("cuda").generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                                     eos_token_id=eos, pad_token_id=0)[:, 6:]
    hf.to("cpu")
    model.codec.eos_ids = eos
    ours = model.generate(ids, max_new_tokens=30)
    print(f"cuda early ends {ends}: ours {ours.shape[1]} tokens, transformers {ref.shape[1]}")
    assert ours.shape[1] == max(ends) + 1 < 30
    assert torch.equal(ours, ref)
