"""The same engine on a GPU (CUDA or ROCm through torch devices): parity with transformers on the
device in fp32, and bf16 / fp16 errors against transformers' own, for every family the engine runs
(dense, mixture-of-experts, hybrid linear attention); with our own CPU run; fixed-shape decode (a
CUDA graph where the family allows one) against the dynamic decode; packed GGUF matrices on the GPU
(cuda/quant.cu) against the gguf package's decoding and the CPU path. Skipped, with the reason, when
no GPU is visible; the CPU twins live in test_parity.py, test_moe.py, test_hybrid.py and test_quant.py."""

from __future__ import annotations

import pytest
import torch

import circuit_finder as cf
from circuit_finder import _C, LayerPath
from circuit_finder.bnb import dequantize_4bit, dequantize_int8
from circuit_finder.compressed import dequantize_compressed
from circuit_finder.gptq import GptqLayout, dequantize_gptq
from circuit_finder.quantizers import K_TYPES
from circuit_finder.quants import (
    PACKED_TYPES,
    PackedTensor,
    dequantize_fp8,
    dequantize_mxfp4,
    quantize_matrix,
)
from helpers import (
    HYBRID_ARCHS,
    MOE_ARCHS,
    awkward_rows,
    build_hf_model,
    half_errors,
    random_packed,
    rebuilt,
    reference,
    relative,
    tokens,
    write_fp8_checkpoint,
    write_gguf,
)

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


@pytest.mark.skipif(not _C.gpu_kernels(), reason="built without GPU kernels")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_dense_gemv_route(model_dir, family, dtype, monkeypatch):
    """CF_DENSE_GEMV=1 sends half-precision products of up to 8 rows through our GEMV kernel (the
    weight's rows read as ggml BF16 / F16 blocks; qwen2's biases too): logits of 8 tokens (8 rows)
    within twice transformers' own error against fp32, and cached greedy decode graph-replayed equal
    to dynamic decode on that route."""
    folder, hf = model_dir(family)
    ids = ids_on("cuda", batch=1, length=8, seed=7)
    x = torch.randn(3, hf.config.hidden_size, device="cuda", dtype=dtype)
    monkeypatch.setenv("CF_DENSE_GEMV", "1")
    assert _C.dense_gemv_takes(x, torch.randn(64, hf.config.hidden_size, device="cuda", dtype=dtype))
    assert not _C.dense_gemv_takes(x.repeat(3, 1), torch.randn(64, hf.config.hidden_size, device="cuda", dtype=dtype))
    our_err, hf_err = half_errors(f"{family} dense gemv", hf, folder, ids, PATH, dtype)
    assert our_err <= 2 * hf_err + 1e-6
    model = cf.load(folder, device="cuda", dtype=dtype)
    prompt = ids_on("cuda", batch=2, length=5, seed=8)
    runs = []
    for static in (False, True):
        model.static_decode = static
        runs.append(model.generate(prompt, layers=PATH, max_new_tokens=10, min_new_tokens=10))
    assert torch.equal(runs[0], runs[1])
    monkeypatch.delenv("CF_DENSE_GEMV")
    assert not _C.dense_gemv_takes(x, torch.randn(64, hf.config.hidden_size, device="cuda", dtype=dtype))


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


@pytest.mark.parametrize("route", ["default", "gemv"])
def test_cuda_bf16_experts_run_grouped_and_graph_replayed(family, route, monkeypatch):
    """In bf16 the experts (stacked on load) run with no host synchronisation — as grouped GEMMs on a
    Hopper-class GPU, through our grouped GEMV kernel at decode sizes elsewhere or with
    CF_MOE_GROUPED=0 (route "gemv") — so the decode step is graph-replayed: its tokens equal the
    dynamic decode's; logits of a decode-sized call within bf16 rounding of the looped experts'
    (CF_MOE_GROUPED=CF_MOE_GEMV=0; tokens printed, near-ties of a random model may flip). GPT-OSS's
    biased experts keep the loop."""
    arch, folder, _ = family
    if arch not in MOE_ARCHS + ["qwen3_next", "qwen3_5_moe_text"]:
        pytest.skip("no experts")
    if route == "gemv":
        if not _C.gpu_kernels():
            pytest.skip("built without GPU kernels")
        monkeypatch.setenv("CF_MOE_GROUPED", "0")
    model = cf.load(folder, device="cuda", dtype=torch.bfloat16)
    hopper = torch.version.cuda is not None and torch.cuda.get_device_capability()[0] in (9, 10)
    grouped_mm = hopper and route == "default"
    assert model.engine.moe_without_host_sync() == (arch != "gpt_oss" and (grouped_mm or _C.gpu_kernels()))
    ids = tokens(2, 9, seed=24).cuda()
    few = ids[:, :3]  # decode-sized: where _grouped_mm syncs, the grouped GEMV kernel takes them
    kw = dict(layers=FAMILY_PATH, max_new_tokens=10, min_new_tokens=10)
    model.static_decode = True
    fixed = model.generate(ids, **kw)
    model.static_decode = False
    dynamic = model.generate(ids, **kw)
    grouped = model.logits(few, layers=FAMILY_PATH).float().cpu()
    monkeypatch.setenv("CF_MOE_GROUPED", "0")
    monkeypatch.setenv("CF_MOE_GEMV", "0")
    looped_tokens = model.generate(ids, **kw)
    looped = model.logits(few, layers=FAMILY_PATH).float().cpu()
    print(f"{arch} bf16: fixed {fixed.tolist()} dynamic {dynamic.tolist()} looped {looped_tokens.tolist()}")
    assert torch.equal(fixed, dynamic)
    assert relative(f"{arch} bf16 grouped vs looped experts", grouped, looped) < 2e-2


def test_cuda_grouped_experts_with_most_experts_idle(tmp_path, monkeypatch):
    """32 experts, top-2, one row: most groups of the grouped products are empty, as in real decode
    (128 experts, top-8). Graph-replayed bf16 decode equals the dynamic decode; logits within bf16
    rounding of the looped experts'."""
    hf = build_hf_model("qwen3_moe", tmp_path, num_experts=32, num_experts_per_tok=2, moe_intermediate_size=64)
    model = cf.load(tmp_path, device="cuda", dtype=torch.bfloat16)
    if not model.engine.moe_without_host_sync():
        pytest.skip("grouped products need a Hopper-class GPU (_grouped_mm) or a build with our kernels")
    ids = tokens(1, 6, seed=25).cuda()
    kw = dict(layers=FAMILY_PATH, max_new_tokens=12, min_new_tokens=12)
    model.static_decode = True
    fixed = model.generate(ids, **kw)
    model.static_decode = False
    assert torch.equal(fixed, model.generate(ids, **kw))
    grouped = model.logits(ids, layers=FAMILY_PATH).float().cpu()
    monkeypatch.setenv("CF_MOE_GROUPED", "0")
    monkeypatch.setenv("CF_MOE_GEMV", "0")
    assert relative("32 experts bf16 grouped vs looped", grouped,
                    model.logits(ids, layers=FAMILY_PATH).float().cpu()) < 2e-2
    del hf


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


# ------------------------------------------------------------------ packed (GGUF-quantized) matrices
@pytest.mark.parametrize("kind", ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "BF16", "F16"])
def test_cuda_quantizers_write_the_cpus_blocks(kind):
    """quantize_matrix on a GPU (what cf.load(folder, device="cuda", quantize=...) does with each
    matrix): the 32-value types write the CPU's bytes (ggml's rounding); the K-quants' scale
    searches sum and divide in another order, so a few blocks may pick a neighbouring scale (on an
    H100: 21-54 of 4800 blocks from fp32, 0-26 from bf16): at most 3% of blocks differ, and each
    row's error, decoded by the gguf package, is within 10% of the CPU's (a block decoded wrong
    shows in its row, whatever the other rows hold)."""
    import gguf

    w = torch.from_numpy(awkward_rows(4096))  # ties, half steps, zeros: where a division a step off shows
    for dtype in (torch.float32, torch.bfloat16):
        cpu = quantize_matrix(w.to(dtype), kind)
        gpu = quantize_matrix(w.to(dtype), kind, device="cuda")
        assert gpu.blocks.is_cuda and gpu.type_name == kind and gpu.shape == cpu.shape
        size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1]
        blocks = (gpu.blocks.cpu() != cpu.blocks).view(300, -1, size).any(2)
        rows = [(reference(kind, p.blocks.cpu().numpy(), 4096) - w.to(dtype).float()).pow(2).mean(1).sqrt()
                for p in (cpu, gpu)]  # each row's RMS error
        worst = ((rows[1] - rows[0]) / (rows[0] + 1e-6 * w.pow(2).mean().sqrt())).max().item()
        print(f"{kind} from {dtype}: {blocks.any(1).sum().item()} of 300 rows, {blocks.sum().item()} of "
              f"{blocks.numel()} blocks differ; RMS error cpu {rows[0].pow(2).mean().sqrt():.3e}, gpu "
              f"{rows[1].pow(2).mean().sqrt():.3e}; a row's error at most {1 + worst:.4f}x the cpu's")
        if kind in K_TYPES:
            assert blocks.float().mean() <= 0.03 and worst <= 0.1
        else:
            assert not blocks.any()


def _checkpoint_dequantizers():
    """{format: function(dtype, device) -> its matrix} for each checkpoint format dequantized on load,
    on random parts (any int32 word is a valid run of codes) with ragged block grids and chunks smaller
    than the matrix."""
    g = torch.Generator().manual_seed(0)

    def ints(low, high, shape, dtype=torch.int32):
        return torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dtype)

    rows, cols, out, groups = 300, 256, 296, 4  # GPTQ / AWQ: 256 inputs in 4 groups, 296 outputs
    f8 = (torch.randn(rows, cols, generator=g) * 4).to(torch.float8_e4m3fn)
    grid, exponents = torch.rand(3, 2, generator=g) + 0.5, ints(120, 135, (3, 2), torch.uint8)  # 128-blocks, ragged
    words, zeros = ints(-2**31, 2**31, (rows, cols // 8)), ints(-8, 8, (rows, groups))
    g_idx = ints(0, groups, (cols,), torch.int64)
    qzeros, scales = ints(-2**31, 2**31, (groups, out // 8)), (torch.rand(groups, out, generator=g) + 0.5).half()
    gptq_words, awq_words = ints(-2**31, 2**31, (cols // 8, out)), ints(-2**31, 2**31, (cols, out // 8))
    int8, f32 = ints(-128, 128, (rows, 200), torch.int8), torch.rand(rows, groups, generator=g) + 0.5
    nf4, absmax, table = ints(0, 256, (rows * cols // 2,), torch.uint8), ints(0, 256, (rows * cols // 64,), torch.uint8), \
        torch.rand(16, generator=g)
    nested = (torch.rand(5, generator=g) + 0.5, torch.rand(256, generator=g), 256, 0.125)  # 1200 absmax codes
    mx_blocks, mx_scales = ints(0, 256, (2, 24, 4, 16), torch.uint8), ints(120, 132, (2, 24, 4), torch.uint8)
    return {
        "fp8 blocks": lambda d, dev: dequantize_fp8(f8, grid, (128, 128), d, dev, chunk=cols * 128),
        "fp8 e8m0": lambda d, dev: dequantize_fp8(f8, exponents, (128, 128), d, dev),
        "compressed w4 asym g_idx": lambda d, dev: dequantize_compressed(
            words, f32, zeros, g_idx, (rows, cols), 4, {"num_bits": 4, "strategy": "group", "group_size": 64}, d, dev,
            chunk=cols * 64),
        "compressed int8 blocks": lambda d, dev: dequantize_compressed(
            int8, grid, None, None, (rows, 200), None, {"strategy": "block", "block_structure": [128, 128]}, d, dev,
            chunk=200 * 100),
        "gptq v1 act order": lambda d, dev: dequantize_gptq(gptq_words, qzeros, scales, g_idx,
                                                            GptqLayout("gptq", 4, 64, True), d, dev, chunk=cols * 50),
        "awq": lambda d, dev: dequantize_gptq(awq_words, qzeros, scales, torch.arange(cols) // 64,
                                              GptqLayout("awq", 4, 64), d, dev),
        "bnb nf4 nested": lambda d, dev: dequantize_4bit(nf4, absmax, table, nested, (rows, cols), 64, d, dev,
                                                         chunk=4096),
        "bnb int8": lambda d, dev: dequantize_int8(int8, f32[:, 0] * 4, d, dev, chunk=200 * 7),
        "mxfp4": lambda d, dev: dequantize_mxfp4(mx_blocks, mx_scales, d, dev),
    }


def test_cuda_checkpoint_dequantization_equals_the_cpus():
    """FP8, compressed-tensors, GPTQ / AWQ, bitsandbytes and MXFP4 parts dequantized on the GPU (what
    a load with device="cuda" does with each matrix) give the CPU's numbers bit for bit, in fp32 and
    bf16 (elementwise IEEE products; the CPU's are checked against plain loops in test_quant.py,
    test_compressed.py, test_gptq.py and test_bnb.py)."""
    for name, make in _checkpoint_dequantizers().items():
        for dtype in (torch.float32, torch.bfloat16):
            cpu, gpu = make(dtype, "cpu"), make(dtype, "cuda")
            assert gpu.is_cuda and gpu.dtype == dtype and gpu.shape == cpu.shape, name
            diff = (gpu.cpu().float() - cpu.float()).abs()
            print(f"{name} {dtype}: {list(cpu.shape)}, max abs diff {diff.max().item():.3e}")
            assert torch.equal(gpu.cpu(), cpu), name


def test_cuda_fp8_checkpoint_loads_on_the_device_and_matches_the_cpu(tmp_path):
    """A fine-grained FP8 checkpoint (16 x 32 blocks) loaded with device="cuda": each matrix dequantized
    there, logits equal the CPU load's up to summation order; quantize="q8_0" packs the matrices the
    GPU dequantized."""
    build_hf_model("qwen3", tmp_path, intermediate_size=128)
    write_fp8_checkpoint(tmp_path, "blocks")
    gpu, cpu = cf.load(tmp_path, device="cuda"), cf.load(tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    assert gpu.tensors[name].is_cuda and torch.equal(gpu.tensors[name].cpu(), cpu.tensors[name])
    ids = ids_on("cuda")
    assert relative("FP8 checkpoint on cuda vs cpu", gpu.logits(ids, layers=PATH).cpu(),
                    cpu.logits(ids.cpu(), layers=PATH)) < 1e-4
    if _C.gpu_kernels():
        packed = cf.load(tmp_path, device="cuda", quantize="q8_0")
        assert packed.tensors[name].device.type == "cuda"
        assert torch.equal(packed.tensors[name].blocks.cpu(), quantize_matrix(cpu.tensors[name], "Q8_0").blocks)


@pytest.mark.skipif(not _C.gpu_kernels(), reason="built without GPU kernels")
@pytest.mark.parametrize("kind", sorted(PACKED_TYPES))
def test_cuda_packed_decoders_and_products_match_the_gguf_package(kind):
    """Every packed type decoded on the GPU equals the gguf package's decoding; the products (one
    warp per weight row for up to 8 rows of x, dequantize + BLAS GEMM beyond, or with direct_rows
    the direct kernels 8 rows a launch) equal x @ W^T of the package's W in fp32, with and without
    bias, and stay within bf16's rounding in bf16 — through the chunk kernels (eight elements a
    lane) and the per-element kernels (chunks=False) alike."""
    n, k = 37, 512
    raw = random_packed(kind, n, k, seed=3)
    w = reference(kind, raw, k)
    blocks = torch.from_numpy(raw).cuda()
    t = PACKED_TYPES[kind]
    for chunks in (True, False):
        got = _C.gpu_dequantize_packed(blocks, t, k, torch.float32, chunks).cpu()
        assert relative(f"{kind} decoded on the GPU, chunks={chunks}", got, w) < 1e-6
    for rows in (1, 5, 8, 9, 40):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        bias = torch.randn(n)
        for b, chunks in ((None, True), (bias, True), (None, False), (bias, False)):
            out = _C.gpu_linear_packed(x.cuda(), blocks, t, k, None if b is None else b.cuda(), chunks).cpu()
            ref = x.double() @ w.double().T + (0 if b is None else b.double())
            assert out.shape == (rows, n)
            assert relative(f"{kind}, {rows} rows, bias={b is not None}, chunks={chunks}", out, ref) < 1e-5
        for chunks in (True, False):
            half = _C.gpu_linear_packed(x.cuda().bfloat16(), blocks, t, k, None, chunks).float().cpu()
            assert relative(f"{kind}, {rows} rows, bf16, chunks={chunks}", half, x.double() @ w.double().T) < 3e-2
        # direct_rows: every row through the direct kernels, 8 rows of x a launch (the last launch fewer)
        direct = _C.gpu_linear_packed(x.cuda(), blocks, t, k, bias.cuda(), True, 64).cpu()
        assert relative(f"{kind}, {rows} rows, direct 8 a launch", direct, x.double() @ w.double().T + bias.double()) < 1e-5
    with pytest.raises(ValueError, match="blocks must be uint8"):
        _C.gpu_linear_packed(torch.randn(2, k).cuda(), blocks[:, 1:].contiguous(), t, k)


def shifted_copy(t: torch.Tensor, elements: int = 1) -> torch.Tensor:
    """t's values in a view `elements` elements into a fresh buffer (so its start is misaligned)."""
    buffer = torch.zeros(t.numel() + elements, dtype=t.dtype, device=t.device)
    out = buffer[elements:].view(t.shape)
    out.copy_(t)
    return out


def gpu_kernels_run(fn) -> list[str]:
    """Names of the packed-matrix GPU kernels fn launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages() if "gemv_kernel" in e.key or "dequant_" in e.key and "kernel" in e.key]


def only(names: list[str], kernel: str, type_id: int, *args: str) -> bool:
    """Whether names is not empty and every name is kernel<type_id, args...> (demangled or not)."""
    mangled = {"float": "f", "true": "Lb1E", "false": "Lb0E"}
    spelled = f"{kernel}<{', '.join([str(type_id), *args])}>"
    raw = f"{kernel}ILi{type_id}E" + "".join(mangled[a] for a in args)
    return bool(names) and all(spelled in n or raw in n for n in names)


@pytest.mark.skipif(not _C.gpu_kernels(), reason="built without GPU kernels")
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q8_0", "BF16"])
def test_cuda_packed_unaligned_inputs_take_the_element_kernels(kind):
    """Blocks that do not start aligned and x that does not start 16-byte aligned (views at an odd
    offset; fp32 and bf16 x) give the same products as aligned copies, through the per-element
    kernels (their names in the profile)."""
    n, k = 20, 512
    raw = random_packed(kind, n, k, seed=7)
    w = reference(kind, raw, k).double()
    t = PACKED_TYPES[kind]
    aligned = torch.from_numpy(raw).cuda()
    shifted = shifted_copy(aligned)
    assert shifted.data_ptr() % 2 != 0
    for rows in (1, 6, 12):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
            xs = shifted_copy(x.cuda())
            assert xs.data_ptr() % 16 != 0
            for name, xb, bb in (("blocks", x.cuda(), shifted), ("x", xs, aligned), ("both", xs, shifted)):
                got = _C.gpu_linear_packed(xb, bb, t, k).float().cpu()
                assert relative(f"{kind} unaligned {name}, {rows} rows, {dtype}", got, x.double() @ w.T) < tol
    assert relative(f"{kind} unaligned blocks decoded", _C.gpu_dequantize_packed(shifted, t, k, torch.float32).cpu(),
                    w.float()) < 1e-6
    x = torch.randn(2, k, device="cuda")
    for xb, bb in ((x, shifted), (shifted_copy(x), aligned)):
        names = gpu_kernels_run(lambda xb=xb, bb=bb: _C.gpu_linear_packed(xb, bb, t, k))
        assert only(names, "gemv_kernel", t, "float", "false"), names


@pytest.mark.skipif(not _C.gpu_kernels(), reason="built without GPU kernels")
def test_cuda_packed_products_take_the_chunk_kernels_where_they_can():
    """Which kernels run (torch.profiler's names): the chunk kernels for aligned blocks and x (also
    an expert of stacked blocks, whose start is rows * row_bytes in), the per-element kernels for
    chunks=False and for F16 rows of K % 8 != 0 — which still give the gguf package's product."""
    k = 512
    raw = random_packed("Q6_K", 2 * 16, k, seed=1)  # two experts of 16 rows, 420 bytes each: 2-byte aligned
    stacked, t = torch.from_numpy(raw).cuda().view(2, 16, -1), PACKED_TYPES["Q6_K"]
    x = torch.randn(2, k, device="cuda")
    for expert in (stacked[0], stacked[1]):
        names = gpu_kernels_run(lambda e=expert: _C.gpu_linear_packed(x, e, t, k))
        assert only(names, "gemv_kernel", t, "float", "true"), names
    names = gpu_kernels_run(lambda: _C.gpu_linear_packed(x, stacked[1], t, k, None, False))
    assert only(names, "gemv_kernel", t, "float", "false"), names
    names = gpu_kernels_run(lambda: _C.gpu_dequantize_packed(stacked[1], t, k, torch.float32))
    assert only(names, "dequant_chunks_kernel", t, "float"), names
    names = gpu_kernels_run(lambda: _C.gpu_linear_packed(torch.randn(12, k, device="cuda"), stacked[1], t, k))
    assert only(names, "dequant_chunks_kernel", t, "float"), names
    odd = random_packed("F16", 9, 100, seed=2)  # K = 100
    x = torch.randn(3, 100, device="cuda")
    got = _C.gpu_linear_packed(x, torch.from_numpy(odd).cuda(), PACKED_TYPES["F16"], 100).cpu()
    assert relative("F16 rows of K = 100", got, x.cpu().double() @ reference("F16", odd, 100).double().T) < 1e-5
    names = gpu_kernels_run(lambda: _C.gpu_linear_packed(x, torch.from_numpy(odd).cuda(), PACKED_TYPES["F16"], 100))
    assert only(names, "gemv_kernel", 1, "float", "false"), names


@pytest.mark.skipif(not _C.gpu_kernels(), reason="built without GPU kernels")
@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0", "IQ4_NL"])
def test_cuda_packed_shapes_and_dtypes(kind):
    """The GPU entry points on the shapes the engine and export hand them: stacked [E, rows, bytes]
    blocks, x with more dimensions or not contiguous, fp16 and bf16 x with a bias of their dtype,
    and x without rows — each against the gguf package's decoding."""
    n, k = 24, 256
    raw = random_packed(kind, n, k, seed=5)
    w = reference(kind, raw, k).double()
    blocks, t = torch.from_numpy(raw).cuda(), PACKED_TYPES[kind]
    stacked = _C.gpu_dequantize_packed(torch.stack([blocks, blocks]), t, k, torch.float32).cpu()
    assert stacked.shape == (2, n, k) and relative(f"{kind} stacked", stacked, torch.stack([w, w]).float()) < 1e-6
    for rows in (3, 12):  # the one-warp path and the GEMM path
        x = torch.randn(2, rows, k, generator=torch.Generator().manual_seed(rows))
        out = _C.gpu_linear_packed(x.cuda(), blocks, t, k).cpu()
        assert out.shape == (2, rows, n) and relative(f"{kind} x [2, {rows}, k]", out, x.double() @ w.T) < 1e-5
        xt = torch.randn(k, rows, generator=torch.Generator().manual_seed(rows)).cuda().T  # not contiguous
        assert relative(f"{kind} x transposed, {rows} rows", _C.gpu_linear_packed(xt, blocks, t, k).cpu(),
                        xt.cpu().double() @ w.T) < 1e-5
        bias = torch.randn(n)
        for dtype in (torch.float16, torch.bfloat16):
            xd = x[0].to(dtype)
            got = _C.gpu_linear_packed(xd.cuda(), blocks, t, k, bias.to(dtype).cuda())
            assert got.dtype == dtype
            assert relative(f"{kind} {dtype}, {rows} rows, bias", got.float().cpu(),
                            xd.double() @ w.T + bias.to(dtype).double()) < 3e-2
    empty = _C.gpu_linear_packed(torch.zeros(0, k).cuda(), blocks, t, k)
    assert empty.shape == (0, n)


def test_cuda_loads_fuse_projections_and_match_the_unfused_route(model_dir, tmp_path):
    """On a GPU, load lays each layer's q / k / v and gate / up out as one matrix (one product each,
    biases included): logits as the unfused route's in fp32 and bf16, greedy tokens equal through
    the dynamic and the fixed-shape decode; packed GGUF blocks fused on the GPU against the CPU."""
    folder, hf = model_dir("qwen2", intermediate_size=128)  # rows of whole 32-value blocks, for the GGUF part
    ids = ids_on("cuda")
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        fused = cf.load(folder, device="cuda", dtype=dtype)
        plain = cf.load(folder, device="cuda", dtype=dtype, fuse_projections=False)
        print(f"{dtype}: fused {fused.fused_products()}, plain {plain.fused_products()}")
        assert fused.fused_products() == {"qkv": 6, "gate_up": 6}
        assert plain.fused_products() == {"qkv": 0, "gate_up": 0}
        assert relative(f"qwen2 cuda {dtype} fused vs unfused", fused.logits(ids, layers=PATH).float().cpu(),
                        plain.logits(ids, layers=PATH).float().cpu()) < tol
    fused, plain = cf.load(folder, device="cuda"), cf.load(folder, device="cuda", fuse_projections=False)
    want = plain.generate(ids[:, :7], layers=PATH, max_new_tokens=12, min_new_tokens=12)
    for static in (False, True):
        fused.static_decode = static
        assert torch.equal(fused.generate(ids[:, :7], layers=PATH, max_new_tokens=12, min_new_tokens=12), want), static
    if _C.gpu_kernels():
        write_gguf(hf, tmp_path / "m.gguf", qtype="Q8_0")
        gpu, cpu = cf.load(tmp_path / "m.gguf", device="cuda"), cf.load(tmp_path / "m.gguf")
        assert gpu.fused_products() == {"qkv": 6, "gate_up": 6} and cpu.fused_products() == {"qkv": 0, "gate_up": 0}
        # dequantized by the GGUF reader (decoded on the device from its blocks): this load's own tensors, fused
        dense = cf.load(tmp_path / "m.gguf", device="cuda", dequantize=True, fuse_projections=False)
        assert cf.load(tmp_path / "m.gguf", device="cuda", dequantize=True).fused_products() == {"qkv": 6, "gate_up": 6}
        host = cf.load(tmp_path / "m.gguf", dequantize=True)
        name = "model.layers.0.self_attn.q_proj.weight"
        assert dense.tensors[name].is_cuda and torch.equal(dense.tensors[name].cpu(), host.tensors[name])
        assert relative("packed fused cuda vs cpu", gpu.logits(ids, layers=PATH).cpu(),
                        cpu.logits(ids.cpu(), layers=PATH)) < 1e-4


@pytest.mark.skipif(not _C.gpu_kernels(), reason="built without GPU kernels")
def test_cuda_packed_gguf_model_keeps_its_blocks_and_matches_the_cpu(tmp_path):
    """A Q4_K GGUF loaded on the GPU keeps its blocks there (the file's bytes, a quarter of the
    float weights): logits equal the CPU packed model's, greedy tokens equal through the dynamic
    and the fixed-shape (CUDA graph) decode; a Hugging Face checkpoint quantized on load too."""
    hf = build_hf_model("llama", tmp_path / "hf", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        vocab_size=256, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                        rope_scaling=None)
    write_gguf(hf, tmp_path / "m.gguf", qtype="Q4_K")
    gpu, cpu = cf.load(tmp_path / "m.gguf", device="cuda"), cf.load(tmp_path / "m.gguf")
    q = gpu.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, PackedTensor) and q.device.type == "cuda" and q.type_name == "Q4_K"
    assert isinstance(gpu.tensors["model.embed_tokens.weight"], PackedTensor)
    assert gpu.weight_bytes()["cuda:0"] < cf.load(tmp_path / "m.gguf", dequantize=True).weight_bytes()["cpu"] / 4
    for length in (5, 40):
        ids = torch.randint(0, 256, (3, length), generator=torch.Generator().manual_seed(length))
        for layers in ("0..3", "0,1,2,1,2,3"):
            assert relative(f"packed cuda vs cpu, {length} tokens, {layers}", gpu.logits(ids.cuda(), layers=layers).cpu(),
                            cpu.logits(ids, layers=layers)) < 1e-4
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    want = cpu.generate(ids, layers="0,1,2,1,2,3", max_new_tokens=12)
    for static in (False, True):
        gpu.static_decode = static
        assert torch.equal(gpu.generate(ids.cuda(), layers="0,1,2,1,2,3", max_new_tokens=12).cpu(), want), static
    gpu.static_decode = None
    exported = cf.load(cf.export_hf(gpu, tmp_path / "export", "0,1,2,1,2,3"))  # packed blocks decoded on the GPU
    assert relative("export of the packed cuda model vs the cpu path", exported.logits(ids),
                    cpu.logits(ids, layers="0,1,2,1,2,3")) < 1e-4
    quantized = cf.load(tmp_path / "hf", device="cuda", quantize="q8_0")
    assert quantized.tensors["lm_head.weight"].device.type == "cuda"
    assert relative("q8_0 on load, cuda vs cpu", quantized.logits(ids.cuda()).cpu(),
                    cf.load(tmp_path / "hf", quantize="q8_0").logits(ids)) < 1e-4
    mixed, on_cpu = cf.load(tmp_path / "hf", device="cuda", quantize="q4_k_m"), cf.load(tmp_path / "hf", quantize="q4_k_m")
    kinds = {n: t.type_name for n, t in mixed.tensors.items() if isinstance(t, PackedTensor)}
    assert kinds == {n: t.type_name for n, t in on_cpu.tensors.items() if isinstance(t, PackedTensor)}
    assert kinds["lm_head.weight"] == "Q6_K" and "Q4_K" in kinds.values()  # the mix's choices, on either device
    # K-quant blocks may round a step apart (their least squares sum in another order): a looser bound
    assert relative("q4_k_m on load, cuda vs cpu", mixed.logits(ids.cuda()).cpu(), on_cpu.logits(ids)) < 2e-2


@pytest.mark.skipif(not _C.gpu_kernels(), reason="built without GPU kernels")
def test_cuda_packed_mixture_of_experts_matches_the_cpu(tmp_path):
    """Stacked packed experts ([E, rows, bytes]) on the GPU, each expert a view of the blocks."""
    hf = build_hf_model("qwen3_moe", tmp_path / "hf", intermediate_size=128, moe_intermediate_size=64)
    write_gguf(hf, tmp_path / "m.gguf", qtype="Q8_0")
    gpu, cpu = cf.load(tmp_path / "m.gguf", device="cuda"), cf.load(tmp_path / "m.gguf")
    experts = gpu.tensors["model.layers.1.mlp.experts.gate_proj"]
    assert isinstance(experts, PackedTensor) and experts.device.type == "cuda" and experts.blocks.dim() == 3
    ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    for layers in ("0..5", "0..3,2,3,4,5"):
        assert relative(f"moe packed cuda vs cpu, path {layers}", gpu.logits(ids.cuda(), layers=layers).cpu(),
                        cpu.logits(ids, layers=layers)) < 1e-4


def sorted_routing(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts [P] int64 ascending, ends [E] int32) on the GPU for rows per expert `counts`."""
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return experts.cuda(), torch.tensor(counts).cumsum(0).to(torch.int32).cuda()


@pytest.mark.skipif(not _C.gpu_kernels(), reason="built without GPU kernels")
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q8_0", "IQ4_XS", "BF16"])
def test_cuda_grouped_gemv_matches_each_experts_product(kind):
    """The experts' kernel (gemv_packed_grouped: rows sorted by expert, the routing read on the
    device): each row times its own expert's matrix, as the gguf package decodes it, in fp32 and
    within bf16's rounding in bf16; experts with no rows (the first among them), one row, exactly 8,
    and 12 (two passes over the blocks); experts strided apart (a padded buffer); chunk and element
    kernels; bad routing tensors named."""
    E, n, k, counts = 6, 37, 512, [0, 1, 12, 0, 8, 9]
    raw = random_packed(kind, E * n, k, seed=9)
    w = reference(kind, raw, k).double().view(E, n, k)
    t, rb = PACKED_TYPES[kind], raw.shape[1]
    padded = torch.zeros(E, n + 3, rb, dtype=torch.uint8, device="cuda")
    padded[:, :n] = torch.from_numpy(raw).cuda().view(E, n, rb)
    experts, ends = sorted_routing(counts)
    x = torch.randn(sum(counts), k, generator=torch.Generator().manual_seed(1))
    ref = torch.einsum("pk,pnk->pn", x.double(), w[experts.cpu()])
    for name, blocks in (("contiguous", torch.from_numpy(raw).cuda().view(E, n, rb)), ("strided", padded[:, :n])):
        for chunks in (True, False):
            got = _C.gpu_linear_packed_grouped(x.cuda(), blocks, t, k, experts, ends, chunks).cpu()
            assert relative(f"{kind} grouped {name}, chunks={chunks}", got, ref) < 1e-5
        half = _C.gpu_linear_packed_grouped(x.cuda().bfloat16(), blocks, t, k, experts, ends).float().cpu()
        assert relative(f"{kind} grouped {name} bf16", half, ref) < 3e-2
    names = gpu_kernels_run(lambda: _C.gpu_linear_packed_grouped(x.cuda(), padded[:, :n], t, k, experts, ends))
    assert only(names, "grouped_gemv_kernel", t, "float", "true"), names
    with pytest.raises(ValueError, match="experts must be int64"):
        _C.gpu_linear_packed_grouped(x.cuda(), padded[:, :n], t, k, experts.int(), ends)
    with pytest.raises(ValueError, match="ends must be int32"):
        _C.gpu_linear_packed_grouped(x.cuda(), padded[:, :n], t, k, experts, ends[1:])


@pytest.mark.skipif(not _C.gpu_kernels(), reason="built without GPU kernels")
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_cuda_packed_experts_decode_without_host_sync(tmp_path, qtype, monkeypatch):
    """A GGUF's packed experts at decode sizes run through the grouped GEMV kernel (Engine::expert_route),
    so the decode step of a packed MoE is graph-replayed: greedy tokens equal the CPU's through the
    fixed-shape and dynamic decode; logits of a few tokens equal the CPU's and the loop's
    (CF_MOE_GEMV=0); a prefill-sized call takes the loop. 32 experts, top 2: most are idle."""
    hf = build_hf_model("qwen3_moe", tmp_path / "hf", intermediate_size=128, moe_intermediate_size=64,
                        num_experts=32, num_experts_per_tok=2)
    write_gguf(hf, tmp_path / "m.gguf", qtype=qtype)
    gpu, cpu = cf.load(tmp_path / "m.gguf", device="cuda"), cf.load(tmp_path / "m.gguf")
    assert gpu.engine.moe_without_host_sync(1) and gpu.engine.moe_without_host_sync(16)
    assert not gpu.engine.moe_without_host_sync(4096) and not cpu.engine.moe_without_host_sync()
    ids = torch.randint(0, hf.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(5))
    names = gpu_kernels_run(lambda: gpu.logits(ids.cuda(), layers=PATH))
    assert any("grouped_gemv_kernel" in n for n in names), names
    grouped = gpu.logits(ids.cuda(), layers=PATH).cpu()
    assert relative(f"{qtype} experts grouped gemv cuda vs cpu", grouped, cpu.logits(ids, layers=PATH)) < 1e-4
    monkeypatch.setenv("CF_MOE_GEMV", "0")
    assert not gpu.engine.moe_without_host_sync(1)
    assert relative(f"{qtype} experts grouped gemv vs loop", grouped, gpu.logits(ids.cuda(), layers=PATH).cpu()) < 1e-5
    monkeypatch.delenv("CF_MOE_GEMV")
    prompt = torch.randint(0, hf.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(6))
    want = cpu.generate(prompt, layers=PATH, max_new_tokens=12, min_new_tokens=12)
    for static in (True, False):
        gpu.static_decode = static
        got = gpu.generate(prompt.cuda(), layers=PATH, max_new_tokens=12, min_new_tokens=12).cpu()
        print(f"{qtype} packed experts cuda, static={static}: {got.tolist()} cpu {want.tolist()}")
        assert torch.equal(got, want), static
