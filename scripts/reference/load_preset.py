#!/usr/bin/env python3
"""Loads a random checkpoint written by the Go writer at a real Gemma 3
shape with transformers and runs one forward pass, to show the writer's
layout (config.json, shards and index) is what transformers expects.

Usage: load_preset.py CHECKPOINT_DIR
"""
import sys
import time

import torch
import transformers

d = sys.argv[1]
t0 = time.time()
dev = "cuda" if torch.cuda.is_available() else "cpu"
model, info = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, output_loading_info=True)
bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
model.to(dev)
n = sum(p.numel() for p in model.parameters())
ids = torch.arange(2, 34, device=dev)[None]
with torch.no_grad():
    out = model(input_ids=ids, labels=ids)
print(f"{type(model).__name__}: {n} parameters, loading info problems: {bad}, "
      f"loss {float(out.loss):.4f} (uniform would be {torch.log(torch.tensor(float(model.config.vocab_size))):.4f}), "
      f"{time.time() - t0:.1f}s")
sys.exit(1 if bad.get("missing_keys") or bad.get("unexpected_keys") or bad.get("mismatched_keys") else 0)
