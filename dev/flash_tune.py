"""Times FlashAttention forward variants (cubins of kernels-cuda/kernels/flash_fwd.cu built by
dev/flash_tune.sh with different -D tunables) against PyTorch's scaled_dot_product_attention
(FlashAttention-2 backend on sm_80+) on the GPU machine, checking each variant's output
against PyTorch first:
    python3 dev/flash_tune.py .gpu/tune/flash_*.cubin
"""
import ctypes
import sys

import cupy as cp
import numpy as np
import torch
import torch.nn.functional as F

PARAMS = np.dtype([(n, "<u8") for n in (
    "q k v o lse cu_q cu_k prefix doc qn kn rope pq pk dout dq dk dv dqa delta".split())]
    + [(n, "<i4") for n in "batch hq hkv lq lk total_q mode window sinks max_pos".split()]
    + [(n, "<f4") for n in "scale scale_log2 eps".split()] + [("pad", "<i4")])
assert PARAMS.itemsize == 216


THREADS = [128]
MODS = []


def launch(fn, grid, smem, params):
    buf = params.tobytes()
    cbuf = ctypes.create_string_buffer(buf, len(buf))
    args = (ctypes.c_void_p * 1)(ctypes.addressof(cbuf))
    cp.cuda.driver.launchKernel(fn.ptr, *grid, THREADS[0], 1, 1, smem, cp.cuda.get_current_stream().ptr,
                                ctypes.addressof(args), 0)


def run(cubin, name, b, h, l, d, causal, window=0, reps=10):
    mod = cp.cuda.function.Module()
    mod.load_file(cubin)
    fn = mod.get_function(name)
    MODS.append(mod)
    # defaults of flash_fwd.cu's FwdCfg unless the variant's name overrides them
    bn, THREADS[0] = (128, 256) if d == 128 else (64, 128)
    for tok in cubin.split("/")[-1][:-6].split("_"):
        if tok.startswith("bn"):
            bn = int(tok[2:])
        if tok.startswith("w") and tok[1:].isdigit():
            THREADS[0] = 32 * int(tok[1:])
    smem = (128 + 2 * bn) * d * 2 + bn * 4 + 2 * d * 4
    cp.cuda.driver.funcSetAttribute(fn.ptr, 8, smem)  # MAX_DYNAMIC_SHARED_SIZE_BYTES
    torch.manual_seed(0)
    q = torch.randn(b, l, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, l, h, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, l, h, d, device="cuda", dtype=torch.bfloat16)
    o = torch.zeros_like(q)
    lse = torch.zeros(b, h, l, device="cuda", dtype=torch.float32)
    p = np.zeros((), dtype=PARAMS)
    p["q"], p["k"], p["v"], p["o"], p["lse"] = q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr()
    p["batch"], p["hq"], p["hkv"], p["lq"], p["lk"], p["total_q"] = b, h, h, l, l, b * l
    p["mode"] = 0 if causal else 1
    p["window"] = window
    p["scale"] = d ** -0.5
    p["scale_log2"] = d ** -0.5 * 1.4426950408889634
    grid = ((l + 127) // 128, h, b)
    launch(fn, grid, smem, p)
    torch.cuda.synchronize()
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal).transpose(1, 2)
    err = (o.float() - ref.float()).abs().max().item() if window == 0 else float("nan")
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        launch(fn, grid, smem, p)
    s.record()
    for _ in range(reps):
        launch(fn, grid, smem, p)
    e.record()
    e.synchronize()
    ms = s.elapsed_time(e) / reps
    pairs = l * l if not causal else (l * (l + 1) / 2 if window == 0 else window * l - window * (window - 1) / 2)
    tf = 4 * b * h * d * pairs / ms / 1e9
    return ms, tf, err


def torch_time(b, h, l, d, causal, reps=10, backend=None):
    from torch.nn.attention import sdpa_kernel
    q = torch.randn(b, h, l, d, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    import contextlib
    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        e.record()
        e.synchronize()
    ms = s.elapsed_time(e) / reps
    pairs = l * l if not causal else l * (l + 1) / 2
    return ms, 4 * b * h * d * pairs / ms / 1e9


SHAPES = [(2, 16, 8192, 128, True), (2, 16, 8192, 128, False), (2, 32, 8192, 64, True), (8, 16, 2048, 128, True)]
if __name__ == "__main__":
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
    for (b, h, l, d, causal) in SHAPES:
        ms, tf = torch_time(b, h, l, d, causal)
        print(f"torch sdpa (default backend) B={b} H={h} L={l} D={d} causal={causal}: {ms:.3f} ms {tf:.1f} TFLOP/s")
        ms, tf = torch_time(b, h, l, d, causal, backend=torch.nn.attention.SDPBackend.FLASH_ATTENTION)
        print(f"torch sdpa FLASH_ATTENTION (FA2) B={b} H={h} L={l} D={d} causal={causal}: {ms:.3f} ms {tf:.1f} TFLOP/s")
        for cubin in sys.argv[1:]:
            try:
                ms, tf, err = run(cubin, f"flash_fwd_bf16_d{d}", b, h, l, d, causal)
                print(f"  {cubin.split('/')[-1]}: {ms:.3f} ms {tf:.1f} TFLOP/s max|err| vs torch {err:.3e}")
            except Exception as ex:  # noqa: BLE001
                print(f"  {cubin}: failed {ex}")
    for cubin in sys.argv[1:]:
        ms, tf, _ = run(cubin, "flash_fwd_bf16_d128", 1, 16, 32768, 128, True, reps=3)
        msw, tfw, _ = run(cubin, "flash_fwd_bf16_d128", 1, 16, 32768, 128, True, window=4096, reps=3)
        print(f"  {cubin.split('/')[-1]} L=32K causal {ms:.3f} ms ({tf:.1f}) window 4096 {msw:.3f} ms ({tfw:.1f}) ratio {msw / ms:.3f}")
