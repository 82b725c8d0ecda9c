#!/usr/bin/env python3
"""Hugging Face's side of scripts/bench-generate.sh: transformers' generate
(bf16, SDPA, KV cache; greedy, or with --temperature sampled from --top-k
and --top-p) on a model of a preset's shape with random weights, made on
the GPU, continuing --batch-size prompts of --prompt-len random tokens by
exactly --new-tokens tokens; prints one JSON line with the fields of
`pipeline bench generate --json`. --lora-rank puts a PEFT LoRA adapter of
that rank (alpha twice it, no dropout) on all seven projections, initialised
as PEFT does (B zero), as `pipeline bench generate --lora-rank` does.

Usage: bench-generate-hf.py --preset 1b --batch-size 1 --prompt-len 128 --new-tokens 128 [--temperature 1 --top-k 64 --top-p 0.95] [--lora-rank 16]
"""
import argparse
import importlib.util
import json
import os
import time

import torch
import transformers

spec = importlib.util.spec_from_file_location("bench_train_hf", os.path.join(os.path.dirname(__file__), "bench-train-hf.py"))
bench_train_hf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_train_hf)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", required=True, choices=sorted(bench_train_hf.PRESETS))
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    ap.add_argument("--top-k", type=int, default=0, help="with --temperature: 0 keeps all")
    ap.add_argument("--top-p", type=float, default=1.0, help="with --temperature: 1 keeps all")
    ap.add_argument("--lora-rank", type=int, default=0, help="a PEFT adapter of this rank on all seven projections")
    a = ap.parse_args()
    sampling = {"do_sample": False}
    if a.temperature > 0:
        sampling = {"do_sample": True, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p}
    model = bench_train_hf.preset_model(a.preset)
    if a.lora_rank > 0:
        import peft
        lc = peft.LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, lora_dropout=0.0,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = peft.get_peft_model(model, lc)
    model.eval()
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, cfg.vocab_size, (a.batch_size, a.prompt_len), generator=g)
    ids[:, 0] = 2
    ids = ids.cuda()
    mask = torch.ones_like(ids)
    times = []
    for r in range(a.warmup + a.runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                                 min_new_tokens=a.new_tokens, use_cache=True, **sampling)
        torch.cuda.synchronize()
        assert out.shape[1] == a.prompt_len + a.new_tokens, out.shape
        if r >= a.warmup:
            times.append(time.perf_counter() - start)
    free, total = torch.cuda.mem_get_info()
    times.sort()
    median = times[len(times) // 2]
    print(json.dumps({"preset": a.preset, "batch_size": a.batch_size, "prompt_len": a.prompt_len,
                      "new_tokens": a.new_tokens, "quantize": "none",
                      **({"lora_rank": a.lora_rank} if a.lora_rank > 0 else {}),
                      **({"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p} if a.temperature > 0 else {}),
                      "tokens_per_sec": a.batch_size * a.new_tokens / median, "run_sec": median,
                      "peak_gib": (total - free) / 2**30, "gpu": torch.cuda.get_device_name(0),
                      "stack": f"transformers {transformers.__version__}, torch {torch.__version__}"}))


if __name__ == "__main__":
    main()
