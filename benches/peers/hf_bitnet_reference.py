"""Peer reference for the Hugging Face BitNet b1.58 import (crates/tritter/src/engine/hf):
transformers' BitNet forward, run on the GPU machine (PyTorch, no Rust there).

Modes
  make   --out DIR [--seed S] [--preset small|2b4t|tritter7b] [--hf-init] [--shards N] [--tokenizer FILE]
         A random BitNet checkpoint laid out as transformers' save_pretrained writes it:
         config.json (model_type "bitnet", quantization_config online autobitlinear, as
         microsoft/bitnet-b1.58-2B-4T-bf16) + model.safetensors in bf16 (or N shards with
         model.safetensors.index.json). `small`: hidden 256, 4 layers, 8 heads over 2 KV heads,
         intermediate 688, vocab 1024, tied embeddings; `2b4t`: the 2B4T shapes, `tritter7b`:
         Tritter's 7B preset shapes (both for `bench`).
         Weights: linears N(0, 0.02^2) as transformers' _init_weights; unless --hf-init, norms
         are 1 + N(0, 0.2^2) and the embedding N(0, 1), so every norm weight matters and the
         logits spread over several units (transformers' init gives norms of 1 and logits ~0.3).
  logits --model DIR --ids 1,2,3 --out logits.json|logits.npy [--dtype float32|bfloat16]
         Logits (L, V) of the ids at positions 0..L-1, batch 1, no cache. float32 (default) is
         the comparison of record: TF32 off, eager attention. .json holds {"ids", "logits",
         "impl", "dtype", "device", "versions"}; .npy the (L, V) float32 array only.
  bench  --model DIR [--dtype bfloat16] [--prompt-len 128] [--decode-tokens 128]
         [--prefill-len 512] [--batches 1,4,16] [--prequantize]
         The peer's speed: greedy decode at batch 1 with a KV cache (tokens/s after the
         prefill), and prefill tokens/s at each batch size; prints `RESULT ...` lines.

Implementations (--impl, default auto)
  transformers  BitNetForCausalLM.from_pretrained(DIR): the config's quantization_config makes
                transformers replace every q/k/v/o/gate/up/down nn.Linear with its online
                AutoBitLinear (WeightQuant: per tensor s = 1/max(mean|W|, 1e-5),
                round(W s).clamp(-1, 1)/s; ActQuant: per token s = 127/max(max|x|, 1e-5),
                round(x s).clamp(-128, 127)/s; both in float32, cast back). Needs transformers
                >= 4.52 and accelerate; the lm_head stays unquantized.
  swap          transformers' BitNetForCausalLM (its attention, RoPE, norms, MLP) built from the
                config without the quantizer, weights loaded from the safetensors, and each of
                those nn.Linear replaced by OnlineBitLinear below: the same arithmetic as
                AutoBitLinear(online_quant=True). Used when the quantizer path is unavailable
                (no accelerate, a transformers version whose AutoBitLinear fails to build, no
                torch.compile backend).
  torch         No transformers at all: TorchBitNet below, a plain re-implementation of
                modeling_bitnet.py (BitNetRMSNorm, rotate-half RoPE with float32 inv_freq,
                repeat_kv GQA, eager softmax in float32, attn_sub_norm before o_proj,
                relu2 GLU with ffn_sub_norm before down_proj, tied or untied lm_head) with
                OnlineBitLinear, and a KV cache for decode.
  auto          transformers, else swap, else torch; the one used is printed and recorded.

--prequantize (bench only) quantizes the weights once instead of on every forward (ActQuant
kept): what transformers would cost without online weight quantization.

Examples (on the GPU machine; then compare on the build machine with
`tritter eval-hf --hf DIR --reference logits.json`):
    python3 benches/peers/hf_bitnet_reference.py make --out /tmp/tiny-bitnet --seed 0
    python3 benches/peers/hf_bitnet_reference.py logits --model /tmp/tiny-bitnet \
        --ids 128,5,17,900,3,0,42,1023,77,256,511,12 --out /tmp/tiny-bitnet/logits.json
    python3 benches/peers/hf_bitnet_reference.py make --out /tmp/bitnet-2b4t --preset 2b4t
    python3 benches/peers/hf_bitnet_reference.py bench --model /tmp/bitnet-2b4t
"""
import argparse
import json
import os
import shutil
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    "small": dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                  rope_theta=500000.0, bos_token_id=1, eos_token_id=2),
    "2b4t": dict(vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=30,
                 num_attention_heads=20, num_key_value_heads=5, max_position_embeddings=4096,
                 rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001),
    # Tritter's 7B preset shapes (crates/tritter config: hidden 4096, 32 layers, 32 heads over
    # 8 KV heads, intermediate 13824, vocab 65536): the peer of `tritter bench --preset 7b`.
    "tritter7b": dict(vocab_size=65536, hidden_size=4096, intermediate_size=13824, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                      rope_theta=500000.0, bos_token_id=1, eos_token_id=2),
}
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
ST_TORCH = {v: k for k, v in ST_DTYPES.items()}


# ----------------------------------------------------------------------------- safetensors
# A plain writer/reader of the safetensors format (8-byte little-endian header length, JSON
# header, raw little-endian data), so `make` does not need the safetensors package.

def save_safetensors(tensors, path):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def load_safetensors(path):
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        raw = torch.frombuffer(bytearray(buf[8 + n + s:8 + n + e]), dtype=torch.uint8)
        out[name] = raw.view(ST_TORCH[info["dtype"]]).reshape(info["shape"])
    return out


def load_weights(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for f in files:
        weights.update(load_safetensors(os.path.join(model_dir, f)))
    return weights


# ----------------------------------------------------------------------------- make

def make(args):
    cfg = dict(PRESETS[args.preset])
    cfg.update({
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_act": "relu2",
        "initializer_range": 0.02, "rms_norm_eps": 1e-5, "rope_scaling": None,
        "attention_bias": False, "attention_dropout": 0.0, "pad_token_id": None,
        "tie_word_embeddings": not args.untied, "torch_dtype": "bfloat16", "use_cache": True,
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "online"},
    })
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(args.seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d

    def normal(shape, std, mean=0.0):
        return (torch.randn(shape, generator=g, device=dev) * std + mean).to(torch.bfloat16).cpu()

    norm_std, embed_std = (0.0, 0.02) if args.hf_init else (0.2, 1.0)
    w = {"model.embed_tokens.weight": normal((v, h), embed_std),
         "model.norm.weight": normal((h,), norm_std, 1.0)}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        for name, shape in zip(LINEARS, [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]):
            w[p + name + ".weight"] = normal(shape, 0.02)
        for name, n in [("input_layernorm", h), ("post_attention_layernorm", h),
                        ("self_attn.attn_sub_norm", h), ("mlp.ffn_sub_norm", i)]:
            w[p + name + ".weight"] = normal((n,), norm_std, 1.0)
    if args.untied:
        w["lm_head.weight"] = normal((v, h), embed_std)
    os.makedirs(args.out, exist_ok=True)
    json.dump(cfg, open(os.path.join(args.out, "config.json"), "w"), indent=2)
    if args.shards <= 1:
        save_safetensors(w, os.path.join(args.out, "model.safetensors"))
    else:
        names, weight_map = sorted(w), {}
        for s in range(args.shards):
            f = f"model-{s + 1:05d}-of-{args.shards:05d}.safetensors"
            part = {n: w[n] for n in names[s::args.shards]}
            weight_map.update({n: f for n in part})
            save_safetensors(part, os.path.join(args.out, f))
        total = sum(t.numel() * 2 for t in w.values())
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
                  open(os.path.join(args.out, "model.safetensors.index.json"), "w"), indent=2)
    if args.tokenizer:
        shutil.copy(args.tokenizer, os.path.join(args.out, "tokenizer.json"))
    n = sum(t.numel() for t in w.values())
    print(f"wrote {args.out}: preset {args.preset}, seed {args.seed}, {n / 1e6:.2f}M parameters "
          f"(bf16), tied={not args.untied}, init={'hf' if args.hf_init else 'spread'}")


# ----------------------------------------------------------------------------- BitLinear

class OnlineBitLinear(nn.Module):
    """transformers' AutoBitLinear(online_quant=True) arithmetic: WeightQuant and ActQuant in
    float32 (torch.round: half to even), each cast back to its input's dtype, then F.linear.
    With prequantize the weight is quantized once at construction (bench only)."""

    def __init__(self, weight, prequantize=False):
        super().__init__()
        self.prequantized = prequantize
        w = weight.detach()
        self.weight = nn.Parameter(weight_quant(w) if prequantize else w, requires_grad=False)

    def forward(self, x):
        w = self.weight if self.prequantized else weight_quant(self.weight)
        return F.linear(act_quant(x), w)


def weight_quant(w):
    dtype = w.dtype
    w = w.float()
    s = 1.0 / w.abs().mean().clamp_(min=1e-5)
    return ((w * s).round().clamp(-1, 1) / s).to(dtype)


def act_quant(x):
    dtype = x.dtype
    x = x.float()
    s = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    return ((x * s).round().clamp(-128, 127) / s).to(dtype)


# ----------------------------------------------------------------------------- plain torch

class TorchBitNet(nn.Module):
    """A plain re-implementation of transformers' modeling_bitnet.py forward (see the module
    docstring), with a list-of-tensors KV cache."""

    def __init__(self, cfg, weights, dtype, device, prequantize=False):
        super().__init__()
        self.cfg = cfg
        self.hq, self.hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.d = cfg["hidden_size"] // self.hq
        self.eps = cfg.get("rms_norm_eps", 1e-5)
        self.layers = cfg["num_hidden_layers"]
        wt = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
        self.embed = wt["model.embed_tokens.weight"]
        tied = cfg.get("tie_word_embeddings", False)
        self.head = self.embed if tied else wt["lm_head.weight"]
        self.final_norm = wt["model.norm.weight"]
        self.lin = nn.ModuleDict()
        self.norms = {}
        for l in range(self.layers):
            p = f"model.layers.{l}."
            for name in LINEARS:
                self.lin[f"{l}_{name.replace('.', '_')}"] = OnlineBitLinear(
                    wt[p + name + ".weight"], prequantize)
            for name in ["input_layernorm", "post_attention_layernorm",
                         "self_attn.attn_sub_norm", "mlp.ffn_sub_norm"]:
                self.norms[(l, name)] = wt[p + name + ".weight"]
        theta = cfg.get("rope_theta", 500000.0)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.d, 2, dtype=torch.int64)
                                         .to(device=device, dtype=torch.float) / self.d))

    def rms(self, x, w):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * x.to(dtype)

    def linear(self, l, name, x):
        return self.lin[f"{l}_{name.replace('.', '_')}"](x)

    def rope(self, positions, dtype):
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    def forward(self, ids, cache=None):
        b, n = ids.shape
        start = cache[0][0].shape[2] if cache else 0
        x = self.embed[ids]
        cos, sin = self.rope(torch.arange(start, start + n, device=ids.device), x.dtype)
        new_cache = []
        for l in range(self.layers):
            h = self.rms(x, self.norms[(l, "input_layernorm")])
            q = self.linear(l, "self_attn.q_proj", h).view(b, n, self.hq, self.d).transpose(1, 2)
            k = self.linear(l, "self_attn.k_proj", h).view(b, n, self.hkv, self.d).transpose(1, 2)
            v = self.linear(l, "self_attn.v_proj", h).view(b, n, self.hkv, self.d).transpose(1, 2)
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
            if cache:
                k = torch.cat((cache[l][0], k), dim=2)
                v = torch.cat((cache[l][1], v), dim=2)
            new_cache.append((k, v))
            rep = self.hq // self.hkv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            scores = torch.matmul(q, k.transpose(2, 3)) * self.d ** -0.5
            total = k.shape[2]
            qpos = torch.arange(start, start + n, device=ids.device)[:, None]
            kpos = torch.arange(total, device=ids.device)[None, :]
            scores = scores.masked_fill(kpos > qpos, float("-inf"))
            p = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            o = torch.matmul(p, v).transpose(1, 2).reshape(b, n, self.hq * self.d)
            o = self.rms(o, self.norms[(l, "self_attn.attn_sub_norm")])
            x = x + self.linear(l, "self_attn.o_proj", o)
            h = self.rms(x, self.norms[(l, "post_attention_layernorm")])
            m = F.relu(self.linear(l, "mlp.gate_proj", h)).square() * self.linear(l, "mlp.up_proj", h)
            m = self.rms(m, self.norms[(l, "mlp.ffn_sub_norm")])
            x = x + self.linear(l, "mlp.down_proj", m)
        x = self.rms(x, self.final_norm)
        return F.linear(x, self.head), new_cache


# ----------------------------------------------------------------------------- loading

def layer_count(model_dir):
    return json.load(open(os.path.join(model_dir, "config.json")))["num_hidden_layers"]


def load_transformers_quantizer(model_dir, dtype, device, attn):
    from transformers import BitNetForCausalLM
    from transformers.integrations.bitnet import AutoBitLinear
    model = BitNetForCausalLM.from_pretrained(model_dir, torch_dtype=dtype, attn_implementation=attn)
    model = model.to(device).eval()
    online = [m for m in model.modules() if isinstance(m, AutoBitLinear) and m.online_quant]
    want = 7 * layer_count(model_dir)
    if len(online) != want:
        raise RuntimeError(f"the quantizer made {len(online)} online AutoBitLinear layers, expected {want}")
    got = {p.dtype for p in model.parameters()}
    if got != {dtype}:
        raise RuntimeError(f"parameters loaded as {got}, expected {dtype}")
    return model


def load_transformers_swap(model_dir, dtype, device, attn, prequantize=False):
    from transformers import BitNetConfig, BitNetForCausalLM
    raw = json.load(open(os.path.join(model_dir, "config.json")))
    raw.pop("quantization_config", None)
    cfg = BitNetConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")},
                       attn_implementation=attn)
    model = BitNetForCausalLM(cfg)
    weights = load_weights(model_dir)
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    # Parameters to the run's dtype; buffers (RoPE's float32 inv_freq) stay as transformers
    # keeps them.
    model = model.to(device).eval()
    for p in model.parameters():
        p.data = p.data.to(dtype)
    for layer in model.model.layers:
        for name in LINEARS:
            parent_name, child = name.split(".")
            parent = getattr(layer, parent_name)
            setattr(parent, child, OnlineBitLinear(getattr(parent, child).weight, prequantize))
    return model


def load_torch(model_dir, dtype, device, prequantize=False):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    return TorchBitNet(cfg, load_weights(model_dir), dtype, device, prequantize).eval()


class Peer:
    """A loaded model behind one interface: logits(ids) and step(ids, cache)."""

    def __init__(self, kind, model):
        self.kind, self.model = kind, model

    @torch.no_grad()
    def logits(self, ids):
        if self.kind == "torch":
            return self.model(ids)[0]
        return self.model(input_ids=ids, use_cache=False).logits

    @torch.no_grad()
    def step(self, ids, cache):
        """Logits of ids appended after the cache, and the new cache (None: start one)."""
        if self.kind == "torch":
            return self.model(ids, cache)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values


def load_peer(args, dtype, device, attn, prequantize=False):
    kinds = ["transformers", "swap", "torch"] if args.impl == "auto" else [args.impl]
    if prequantize and "transformers" in kinds:
        kinds.remove("transformers")  # AutoBitLinear re-quantizes every forward by design
    errors = []
    for kind in kinds:
        try:
            if kind == "transformers":
                model = load_transformers_quantizer(args.model, dtype, device, attn)
            elif kind == "swap":
                model = load_transformers_swap(args.model, dtype, device, attn, prequantize)
            else:
                model = load_torch(args.model, dtype, device, prequantize)
            peer = Peer(kind, model)
            # One tiny forward: torch.compile (transformers' WeightQuant/ActQuant) fails here,
            # not at load time.
            peer.logits(torch.tensor([[1, 2]], device=device))
            for e in errors:
                print(f"note: {e}", file=sys.stderr)
            return peer
        except Exception as e:  # noqa: BLE001 -- any failure moves on to the next implementation
            errors.append(f"impl {kind} unavailable: {type(e).__name__}: {e}")
    sys.exit("no implementation could run:\n  " + "\n  ".join(errors))


def versions():
    v = {"torch": torch.__version__}
    try:
        import transformers
        v["transformers"] = transformers.__version__
    except ImportError:
        v["transformers"] = None
    return v


def device_name(device):
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


# ----------------------------------------------------------------------------- logits

def logits(args):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    peer = load_peer(args, dtype, device, "eager")
    ids = [int(t) for t in args.ids.split(",") if t.strip()]
    out = peer.logits(torch.tensor([ids], device=device))[0].float().cpu()
    top1 = out.argmax(-1).tolist()
    print(f"impl {peer.kind}, dtype {args.dtype}, device {device_name(device)}, versions {versions()}")
    print(f"logits ({len(ids)}, {out.shape[1]}), max |logit| {out.abs().max().item():.4f}, top-1 {top1}")
    if args.out.endswith(".npy"):
        import numpy as np
        np.save(args.out, out.numpy().astype("float32"))
    else:
        json.dump({"ids": ids, "logits": out.tolist(), "impl": f"{peer.kind} ({MODES[peer.kind]})",
                   "dtype": args.dtype, "device": device_name(device), "versions": versions()},
                  open(args.out, "w"))
    print(f"wrote {args.out}")


MODES = {
    "transformers": "transformers BitNetForCausalLM.from_pretrained, online AutoBitLinear",
    "swap": "transformers BitNetForCausalLM, nn.Linear -> OnlineBitLinear (AutoBitLinear online math)",
    "torch": "plain PyTorch re-implementation of modeling_bitnet.py with OnlineBitLinear",
}


# ----------------------------------------------------------------------------- bench

def cuda_time(fn, reps):
    """Median seconds of fn() over reps runs (after one warm-up), synchronized."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def bench(args):
    assert torch.cuda.is_available(), "bench runs on the GPU"
    device, dtype = "cuda", getattr(torch, args.dtype)
    peer = load_peer(args, dtype, device, "sdpa", args.prequantize)
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    vocab = cfg["vocab_size"]
    tag = (f"peer={peer.kind}{'+prequantized' if args.prequantize else ''} dtype={args.dtype} "
           f"layers={cfg['num_hidden_layers']} hidden={cfg['hidden_size']} vocab={vocab}")
    print(f"# {MODES[peer.kind]}; device {device_name(device)}; versions {versions()}")
    g = torch.Generator(device=device).manual_seed(0)

    # Greedy decode at batch 1 with a KV cache.
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=g, device=device)

    def decode(n):
        logits, cache = peer.step(prompt, None)
        tok = logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            logits, cache = peer.step(tok, cache)
            tok = logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    decode(4)  # warm-up (kernels, torch.compile)
    runs = sorted(decode(args.decode_tokens) for _ in range(args.reps))
    secs = runs[len(runs) // 2]
    print(f"RESULT {tag} mode=decode batch=1 prompt={args.prompt_len} new_tokens={args.decode_tokens} "
          f"tokens_per_s={args.decode_tokens / secs:.1f} ms_per_token={1e3 * secs / args.decode_tokens:.3f}")

    # Prefill throughput per batch size.
    for b in [int(x) for x in args.batches.split(",")]:
        ids = torch.randint(0, vocab, (b, args.prefill_len), generator=g, device=device)
        try:
            secs = cuda_time(lambda: peer.logits(ids), args.reps)
        except torch.cuda.OutOfMemoryError:
            print(f"RESULT {tag} mode=prefill batch={b} seq={args.prefill_len} oom=1")
            torch.cuda.empty_cache()
            continue
        print(f"RESULT {tag} mode=prefill batch={b} seq={args.prefill_len} "
              f"tokens_per_s={b * args.prefill_len / secs:.1f} ms={1e3 * secs:.2f}")


# ----------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("make", help="write a random BitNet checkpoint")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--preset", choices=sorted(PRESETS), default="small")
    m.add_argument("--untied", action="store_true", help="separate lm_head.weight")
    m.add_argument("--hf-init", action="store_true", help="transformers' init exactly (norms 1, embedding std 0.02)")
    m.add_argument("--shards", type=int, default=1)
    m.add_argument("--tokenizer", help="a tokenizer.json to copy into the checkpoint")
    for name, help_ in [("logits", "write logits of --ids"), ("bench", "time decode and prefill")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--model", required=True)
        s.add_argument("--impl", choices=["auto", "transformers", "swap", "torch"], default="auto")
        if name == "logits":
            s.add_argument("--ids", required=True, help="comma-separated token ids")
            s.add_argument("--out", required=True, help="logits.json or logits.npy")
            s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
            s.add_argument("--device", choices=["cuda", "cpu"])
        else:
            s.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
            s.add_argument("--prompt-len", type=int, default=128)
            s.add_argument("--decode-tokens", type=int, default=128)
            s.add_argument("--prefill-len", type=int, default=512)
            s.add_argument("--batches", default="1,4,16")
            s.add_argument("--reps", type=int, default=5)
            s.add_argument("--prequantize", action="store_true")
    args = p.parse_args()
    {"make": make, "logits": logits, "bench": bench}[args.mode](args)


if __name__ == "__main__":
    main()
