#!/usr/bin/env python3
"""Hugging Face's side of scripts/bench-train.sh: transformers + PEFT train a
LoRA adapter the way users run them (bf16 base, LoRA r on all seven
projections in float32 as PEFT keeps it, gradient checkpointing, SDPA
attention, torch AdamW) over the same packed rows as `pipeline bench train`,
and print one JSON line with the same fields. The model has the preset's
shape and random weights, made on the GPU; bitsandbytes is not needed (NF4
would only add work to this side).

Usage: bench-train-hf.py --preset 12b --rows rows.jsonl --batch-size 2 --steps 5 --warmup-steps 2
"""
import argparse
import json
import time

import torch
import transformers
import peft

# The released Gemma 3 text shapes, as trainer.Preset has them.
PRESETS = {
    "1b": dict(vocab_size=262144, num_hidden_layers=26, hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
               num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256, scaling=None),
    "4b": dict(vocab_size=262208, num_hidden_layers=34, hidden_size=2560, intermediate_size=10240, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, sliding_window=1024, query_pre_attn_scalar=256, scaling=8.0),
    "12b": dict(vocab_size=262208, num_hidden_layers=48, hidden_size=3840, intermediate_size=15360, num_attention_heads=16,
                num_key_value_heads=8, head_dim=256, sliding_window=1024, query_pre_attn_scalar=256, scaling=8.0),
    "27b": dict(vocab_size=262208, num_hidden_layers=62, hidden_size=5376, intermediate_size=21504, num_attention_heads=32,
                num_key_value_heads=16, head_dim=128, sliding_window=1024, query_pre_attn_scalar=168, scaling=8.0),
}


def preset_config(preset):
    """The Gemma3TextConfig of a preset, in the spelling this transformers takes."""
    p = dict(PRESETS[preset])
    scaling = p.pop("scaling")
    n = p["num_hidden_layers"]
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    if scaling:
        rope["full_attention"] = {"rope_type": "linear", "factor": scaling, "rope_theta": 1e6}
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    try:  # transformers 5 spells RoPE per layer type
        cfg = transformers.Gemma3TextConfig(**p, rope_parameters=rope, max_position_embeddings=131072, layer_types=layer_types)
    except TypeError:
        cfg = transformers.Gemma3TextConfig(**p, rope_theta=1e6, rope_local_base_freq=1e4, max_position_embeddings=131072,
                                            rope_scaling={"rope_type": "linear", "factor": scaling} if scaling else None,
                                            layer_types=layer_types)
    return cfg


def preset_model(preset):
    """A preset's model in bf16 on the GPU, SDPA attention, random weights (seed 1)."""
    cfg = preset_config(preset)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(1)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.Gemma3ForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--rows", required=True)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    a = ap.parse_args()
    model = preset_model(a.preset)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lcfg = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.05, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, lcfg)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr)
    rows = [json.loads(l) for l in open(a.rows) if l.strip()]
    seq = len(rows[0]["input_ids"])
    times, loss = [], float("nan")
    for step in range(a.warmup_steps + a.steps):
        batch = rows[step * a.batch_size:(step + 1) * a.batch_size]
        ids = torch.tensor([r["input_ids"] for r in batch], device="cuda")
        labels = torch.tensor([r["labels"] for r in batch], device="cuda")
        pos = torch.tensor([r["position_ids"] for r in batch], device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(input_ids=ids, labels=labels, position_ids=pos)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= a.warmup_steps:
            times.append(time.perf_counter() - start)
            loss = out.loss.item()
    free, total = torch.cuda.mem_get_info()
    times.sort()
    median = times[len(times) // 2]
    print(json.dumps({"preset": a.preset, "seq_len": seq, "batch_size": a.batch_size,
                      "tokens_per_sec": a.batch_size * seq / median, "step_sec": median,
                      "peak_gib": (total - free) / 2**30, "loss": loss, "gpu": torch.cuda.get_device_name(0),
                      "stack": f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}"}))


if __name__ == "__main__":
    main()
