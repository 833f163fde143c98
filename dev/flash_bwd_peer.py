"""Times PyTorch's FlashAttention-2 backward (SDPA, FLASH_ATTENTION backend) on the shapes of the
flash_attn bench's backward rows, so our backward's TFLOP/s has a peer from the same device call:
    python3 dev/flash_bwd_peer.py
TFLOP/s counted as FlashAttention does: backward = 2.5x the forward's 4 B H D pairs (causal halved).
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (B, Hq, Hkv, L, D, causal): the bench's backward rows and the 500M training batch
SHAPES = [(2, 16, 16, 8192, 128, True), (2, 32, 32, 8192, 64, True), (2, 16, 16, 8192, 128, False),
          (8, 16, 4, 2048, 64, True)]


def timed(fn, reps):
    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / reps


def main():
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
    for (b, hq, hkv, l, d, causal) in SHAPES:
        torch.manual_seed(0)
        q = torch.randn(b, hq, l, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, hkv, l, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, hkv, l, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gqa = hq != hkv
        pairs = l * (l + 1) / 2 if causal else l * l
        fwd_flop = 4 * b * hq * d * pairs
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            try:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
            except RuntimeError as ex:  # GQA may need the math/efficient backend on old torch
                print(f"B={b} Hq={hq} Hkv={hkv} L={l} D={d} causal={causal}: FA2 backend refused ({ex})")
                continue
            dout = torch.randn_like(out)
            f_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa), 10)
            b_ms = timed(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), 10)
        print(f"torch FA2 B={b} Hq={hq} Hkv={hkv} L={l} D={d} causal={causal}: forward {f_ms:.3f} ms "
              f"{fwd_flop / f_ms / 1e9:.1f} TFLOP/s, backward {b_ms:.3f} ms {2.5 * fwd_flop / b_ms / 1e9:.1f} "
              f"TFLOP/s ({f_ms * 2.5 / b_ms:.2f} of forward throughput)")


if __name__ == "__main__":
    main()
