#!/usr/bin/env python3
"""How close transformers + PEFT themselves come to the float64 goldens when
they train in bfloat16, the way users run them: the model in bf16 on the GPU
with SDPA attention, the adapter in float32 (PEFT's autocast_adapter_dtype),
logits upcast to float32 for the loss. For each parity case it prints the
loss's relative error and the worst cosine similarity of a LoRA gradient
with the golden one: the yardstick for the GPU trainer's bf16 mode.

Usage: bf16_grads.py CASES_DIR   (golden files under CASES_DIR/golden)
"""
import json
import math
import os
import sys

import torch
import transformers
import peft
from safetensors.torch import load_file

from hf_common import packed_loss_sum, read_rows


def main():
    cases = sys.argv[1]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for name in sorted(os.listdir(cases)):
        d = os.path.join(cases, name)
        if not os.path.exists(os.path.join(d, "case.json")):
            continue
        golden = json.load(open(os.path.join(cases, "golden", name, "golden.json")))
        gt = load_file(os.path.join(cases, "golden", name, "golden.safetensors"))
        cfg = transformers.AutoConfig.from_pretrained(os.path.join(d, "model"))
        cls = getattr(transformers, cfg.architectures[0])
        model = cls.from_pretrained(os.path.join(d, "model"), dtype=torch.bfloat16, attn_implementation="sdpa").to(dev)
        model = peft.PeftModel.from_pretrained(model, os.path.join(d, "adapter"), is_trainable=True).to(dev)
        model.eval()
        params = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
        rows = read_rows(os.path.join(d, "batch.jsonl"))
        total, count = packed_loss_sum(model, rows, dev)
        loss = total / count
        loss.backward()
        worst, worst_name = 1.0, ""
        got_all, ref_all = [], []
        for k, p in params.items():
            g = p.grad.double().cpu().flatten()
            ref = gt["grad." + k].double().flatten()
            got_all.append(g)
            ref_all.append(ref)
            cos = float(torch.dot(g, ref) / (g.norm() * ref.norm()))
            if cos < worst:
                worst, worst_name = cos, k
        g, ref = torch.cat(got_all), torch.cat(ref_all)
        whole = float(torch.dot(g, ref) / (g.norm() * ref.norm()))
        rel = abs(float(loss.detach()) - golden["loss"]) / golden["loss"]
        print(f"{name}: bf16 loss {float(loss.detach()):.6f} (float64 {golden['loss']:.6f}, relative {rel:.3g}); "
              f"adapter gradient cosine {whole:.6f}, worst tensor {worst:.6f} ({worst_name})")


if __name__ == "__main__":
    main()
