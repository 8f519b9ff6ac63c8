"""Samples/s and model FLOPs utilisation (MFU) of the bundled encoder's training step.

    python bench/mfu.py [--device cuda] [--batch 256] [--length 128] [--steps 30] [--warmup 5]
                        [--attention sdpa,eager] [--out bench/results/mfu.json]

One step: the HF encoder forward on [batch, length] tokens (no padding), mean pooling, a linear 5-way
head, cross-entropy, backward, AdamW; bf16 autocast on a GPU, fp32 on the CPU. Each attention
implementation is timed (after warm-up steps, with device syncs) and the faster one is the result.
FLOPs per token: 6 N (N = parameters outside the embedding tables, which are looked up, not
multiplied) plus 12 n_layers d_model length for the attention scores and their weighted sum
(PaLM, appendix B). MFU = FLOPs per token x tokens/s / the card's dense bf16 peak, found from the
device name in PEAK_BF16 (null for an unknown card, or the CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import header  # noqa: E402
from mtkit.config import BUNDLED_MODEL  # noqa: E402
from mtkit.model.encoder import resolve_model_path  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, from the vendors' data sheets; the first name that
# occurs in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
             ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
             ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("A6000", 155e12)]


def peak_flops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def time_steps(attention: str, args, device) -> dict:
    from transformers import AutoModel
    torch.manual_seed(0)
    bert = AutoModel.from_pretrained(resolve_model_path(BUNDLED_MODEL), attn_implementation=attention,
                                     add_pooling_layer=False).to(device).train()
    head = torch.nn.Linear(bert.config.hidden_size, 5).to(device)
    params = list(bert.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(1000, bert.config.vocab_size, (args.batch, args.length), device=device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 5, (args.batch,), device=device)
    bf16 = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            states = bert(input_ids=ids, attention_mask=mask).last_hidden_state
            loss = F.cross_entropy(head(states.mean(1)).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    cfg = bert.config
    n_total = sum(p.numel() for p in params)
    n_embed = sum(p.numel() for n, p in bert.named_parameters() if n.startswith("embeddings."))
    flops_per_token = 6 * (n_total - n_embed) + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.length
    tokens_per_s = args.batch * args.length / seconds
    return {"attention": attention, "step_s": seconds, "samples_per_s": args.batch / seconds,
            "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token,
            "achieved_flops": flops_per_token * tokens_per_s, "params_total": n_total,
            "params_non_embedding": n_total - n_embed}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--attention", default="sdpa,eager")
    parser.add_argument("--out", default="bench/results/mfu.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(card) if device.type == "cuda" else None
    print(f"device: {card}; dense bf16 peak: {peak / 1e12 if peak else 'unknown'} TFLOP/s", flush=True)
    runs = [time_steps(a, args, device) for a in args.attention.split(",")]
    for r in runs:
        r["mfu"] = r["achieved_flops"] / peak if peak else None
        print(f"{r['attention']}: {r['samples_per_s']:.1f} samples/s, "
              f"{r['achieved_flops'] / 1e12:.2f} TFLOP/s, MFU {r['mfu']}", flush=True)
    best = max(runs, key=lambda r: r["samples_per_s"])
    report = {**header(), "device": card, "precision": "bf16" if device.type == "cuda" else "fp32",
              "batch": args.batch, "length": args.length, "steps": args.steps, "warmup": args.warmup,
              "peak_bf16_flops": peak, "runs": runs, "best": best}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
