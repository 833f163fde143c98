"""PyTorch peer of the GPU training engine (issue 10): the Tritter model written in plain
PyTorch and trained the way a PyTorch user would, for `tritter bench-train` to compare
against in the same device call.

The model is the reference Tritter (crates/tritter/src/model): token embedding (tied LM
head unless --untied), per layer Chameleon norm placement `h = x + norm_a(attn(x))`,
`out = h + norm_f(mlp(h))`; BitLinear q/k/v/o and gate/up/down with the straight-through
estimator (absmean per-tensor weight quantization, per-token absmax int8 activation
quantization, both as fake quantization in float32); QK-Norm (RMSNorm over D) then
rotate-half RoPE; GQA through SDPA (`enable_gqa`, causal, FlashAttention backend);
squared-ReLU GLU; final RMSNorm; cross-entropy over the full vocabulary.

Run modes: bf16 autocast, fused AdamW (betas 0.9/0.95, weight decay 0.1 on matrices),
`torch.compile` (default mode) unless --eager. Random token batches (the speed does not
depend on the data). Prints one `RESULT` line:

    RESULT impl=torch-compile preset=500m batch=8 seq=2048 tokens_per_s=... mfu=...
           peak_gb=... step_ms=... params=...

MFU = 6 * params * tokens/s / peak (H100 SXM dense bf16: 989 TFLOP/s; --peak-tflops to
override), the same count `tritter bench-train` uses.

Usage:
    python3 benches/peers/torch_train_peer.py --preset 500m --batch 8 --seq 2048 --steps 20
"""

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# (hidden, layers, heads, kv heads, intermediate): crates/tritter/src/config.rs
PRESETS = {
    "100m": (768, 12, 12, 4, 1536),
    "500m": (1024, 24, 16, 4, 4608),
    "1b": (2048, 24, 16, 4, 5120),
    "3b": (2560, 26, 20, 5, 11008),
    "7b": (4096, 32, 32, 8, 13824),
}
VOCAB = 65536


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class BitLinear(nn.Linear):
    """nn.Linear with BitNet b1.58 fake quantization and the straight-through estimator."""

    def forward(self, x):
        w = self.weight.float()
        gamma = w.abs().mean()
        wq = (w / (gamma + 1e-5)).round().clamp(-1, 1) * gamma
        w = w + (wq - w).detach()
        xf = x.float()
        s = 127.0 / xf.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        xq = (xf * s).round().clamp(-128, 127) / s
        xf = xf + (xq - xf).detach()
        return F.linear(xf.to(x.dtype), w.to(x.dtype))


def rope_tables(d, l, theta, device):
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float64) / d))
    ang = torch.arange(l, device=device, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)
    return ang.cos().float(), ang.sin().float()


def rotate(x, cos, sin):
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Layer(nn.Module):
    def __init__(self, h, hq, hkv, inter):
        super().__init__()
        d = h // hq
        self.hq, self.hkv, self.d = hq, hkv, d
        self.q = BitLinear(h, hq * d, bias=False)
        self.k = BitLinear(h, hkv * d, bias=False)
        self.v = BitLinear(h, hkv * d, bias=False)
        self.o = BitLinear(hq * d, h, bias=False)
        self.q_norm, self.k_norm = RMSNorm(d), RMSNorm(d)
        self.attn_norm, self.mlp_norm = RMSNorm(h), RMSNorm(h)
        self.gate = BitLinear(h, inter, bias=False)
        self.up = BitLinear(h, inter, bias=False)
        self.down = BitLinear(inter, h, bias=False)

    def forward(self, x, cos, sin):
        b, l, _ = x.shape
        q = self.q_norm(self.q(x).view(b, l, self.hq, self.d)).transpose(1, 2)
        k = self.k_norm(self.k(x).view(b, l, self.hkv, self.d)).transpose(1, 2)
        v = self.v(x).view(b, l, self.hkv, self.d).transpose(1, 2)
        q, k = rotate(q, cos, sin).to(v.dtype), rotate(k, cos, sin).to(v.dtype)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = x + self.attn_norm(self.o(a.transpose(1, 2).reshape(b, l, -1)))
        m = self.down(F.relu(self.gate(h)).square() * self.up(h))
        return h + self.mlp_norm(m)


class Tritter(nn.Module):
    def __init__(self, h, layers, hq, hkv, inter, vocab, tied=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList([Layer(h, hq, hkv, inter) for _ in range(layers)])
        self.norm = RMSNorm(h)
        self.head = None if tied else nn.Linear(h, vocab, bias=False)
        self.d = h // hq
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, targets):
        x = self.embed(ids)
        cos, sin = rope_tables(self.d, ids.shape[1], 500000.0, ids.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        w = self.embed.weight if self.head is None else self.head.weight
        logits = F.linear(x, w)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="500m", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--untied", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    a = ap.parse_args()

    h, layers, hq, hkv, inter = PRESETS[a.preset]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = Tritter(h, layers, hq, hkv, inter, VOCAB, tied=not a.untied).to(dev)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not model.embed.weight]
    no_decay = [p for p in model.parameters() if not (p.dim() >= 2 and p is not model.embed.weight)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=True,
    )
    step_fn = model if a.eager else torch.compile(model)

    def step():
        ids = torch.randint(1, VOCAB, (a.batch, a.seq + 1), device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(a.steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / a.steps
    tps = a.batch * a.seq / (ms / 1e3)
    mfu = 6 * params * tps / (a.peak_tflops * 1e12)
    peak = torch.cuda.max_memory_allocated() / 1e9
    impl = "torch-eager" if a.eager else "torch-compile"
    print(
        f"RESULT impl={impl} preset={a.preset} batch={a.batch} seq={a.seq} tokens_per_s={tps:.0f} "
        f"mfu={mfu:.3f} peak_gb={peak:.2f} step_ms={ms:.1f} params={params} loss={loss.item():.3f}"
    )
    assert math.isfinite(loss.item())


if __name__ == "__main__":
    main()
