#!/usr/bin/env python3
"""transformers + PEFT compute the logits of teacher-forced continuations,
for the GPU decoder's bfloat16 test (trainer/gpu TestTeacherForcedBF16).

Two sequences of random ordinary tokens, a prompt of PROMPT tokens and a
continuation of CONT tokens each (by default 500 + 100, so that the decoded
steps pass the 1B's 512-token sliding window), run forward once each, in
float32 (the reference) and in bfloat16 (transformers' own rounding, which
the test's tolerance is measured against). Written to OUT: tokens.json
({"prompts", "continuations"}) and fp32.f32 and bf16.f32, the float32
logits [sequence][continuation step][vocabulary] of the positions that
predict each continuation token (the prompt's last token and the
continuation's tokens but the last).

Usage: bf16_logits.py MODEL_DIR ADAPTER_DIR OUT [PROMPT CONT]
"""
import json
import os
import sys

import numpy as np
import torch
import transformers
import peft


def logits(model_dir, adapter_dir, dtype, seqs, start):
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, cfg.architectures[0])
    model = cls.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to("cuda")
    model = peft.PeftModel.from_pretrained(model, adapter_dir).to("cuda")
    model.eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s], device="cuda")
            out.append(model(input_ids=ids).logits[0, start - 1:len(s) - 1].float().cpu().numpy())
    del model
    torch.cuda.empty_cache()
    return np.stack(out)


def main():
    model_dir, adapter_dir, out = sys.argv[1:4]
    prompt, cont = (int(x) for x in sys.argv[4:6]) if len(sys.argv) > 5 else (500, 100)
    vocab = transformers.AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
    g = np.random.default_rng(7)
    seqs = [[2] + g.integers(1000, vocab, prompt + cont - 1).tolist() for _ in range(2)]
    os.makedirs(out, exist_ok=True)
    json.dump({"prompts": [s[:prompt] for s in seqs], "continuations": [s[prompt:] for s in seqs]},
              open(os.path.join(out, "tokens.json"), "w"))
    ref = logits(model_dir, adapter_dir, torch.float32, seqs, prompt)
    ref.astype("<f4").tofile(os.path.join(out, "fp32.f32"))
    low = logits(model_dir, adapter_dir, torch.bfloat16, seqs, prompt)
    low.astype("<f4").tofile(os.path.join(out, "bf16.f32"))
    rel = np.sqrt(((low - ref) ** 2).mean(-1) / (ref ** 2).mean(-1))
    agree = (low.argmax(-1) == ref.argmax(-1)).mean()
    print(json.dumps({"positions": int(ref.shape[0] * ref.shape[1]), "hf_bf16_rel_rms_max": float(rel.max()),
                      "hf_bf16_rel_rms_mean": float(rel.mean()), "hf_bf16_argmax_agreement": float(agree)}))


if __name__ == "__main__":
    main()
