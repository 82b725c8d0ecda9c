#!/usr/bin/env python3
"""transformers + PEFT compute the mean token loss of packed rows under a
base checkpoint and a PEFT adapter, each packed example run on its own, in
bfloat16 on the GPU (float32 on the CPU), and compare it with what
`pipeline loss` printed.

Usage: hf_loss.py MODEL_DIR ADAPTER_DIR ROWS.jsonl PIPELINE_LOSS.json [--tol 1e-2]
"""
import json
import sys

import torch
import transformers
import peft

from hf_common import packed_loss_sum, read_rows


def main():
    model_dir, adapter_dir, rows_path, expect_path = sys.argv[1:5]
    tol = float(sys.argv[sys.argv.index("--tol") + 1]) if "--tol" in sys.argv else 1e-2
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, cfg.architectures[0])
    model = cls.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(dev)
    model = peft.PeftModel.from_pretrained(model, adapter_dir).to(dev)
    model.eval()
    rows = read_rows(rows_path)
    with torch.no_grad():
        total, count = packed_loss_sum(model, rows, dev)
    total = float(total)
    ours = json.load(open(expect_path))
    hf = total / count
    rel = abs(ours["loss"] - hf) / hf
    print(json.dumps({"hf_loss": hf, "hf_tokens": count, "pipeline_loss": ours["loss"], "pipeline_tokens": ours["tokens"],
                      "backend": ours.get("backend"), "relative": rel, "dtype": str(dtype)}))
    if count != ours["tokens"] or not rel <= tol:
        print(f"FAIL: relative difference {rel:.3g} over {tol} or token counts differ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
