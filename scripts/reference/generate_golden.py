#!/usr/bin/env python3
"""Greedy decoding with transformers, the oracle for trainer's decoder.

Loads a Gemma 3 checkpoint folder in float32 (and a PEFT LoRA adapter over
it when --adapter is given), runs transformers' generate greedily with its
KV cache on each prompt of PROMPTS.json, and writes the new token ids to
OUT.json, for `TestGreedyDecodingMatchesTransformers` (trainer) to compare
with trainer.Model.Generate token for token.

PROMPTS.json is {"prompts": [[2, 17, ...], ...]} (or a bare list of
prompts): token ids, <bos> included, as the Go decoder takes them. Each
prompt is decoded alone, so no padding or attention mask enters. By default
no token stops the decoding, so every prompt gets exactly --max-new-tokens
tokens (64); --stop ID ... stops at those ids, as Gemma 3 stops at <eos>
(1) and <end_of_turn> (106).

As the Go model does, the embedding scale sqrt(hidden) is rounded to the
checkpoint's dtype (bf16: 5.65625 for hidden 32), which is what
transformers computes when it runs in that dtype; in float32 it would keep
the exact root. RMSNorm and attention already compute in float32.

Usage:
  generate_golden.py MODEL_DIR [--adapter DIR] PROMPTS.json OUT.json
                     [--max-new-tokens 64] [--attn eager|sdpa] [--stop ID ...]

For the tiny parity cases (on a machine with torch, transformers and peft):
  for c in t5_gqa orig_mqa mm_f32 trained_qlora rslora_gqa; do
    d=trainer/testdata/reference
    python3 scripts/reference/generate_golden.py $d/$c/model trainer/testdata/generate_prompts.json $d/golden/$c/generate.json
    python3 scripts/reference/generate_golden.py $d/$c/model --adapter $d/$c/adapter \\
        trainer/testdata/generate_prompts.json $d/golden/$c/generate_adapter.json
  done
"""
import argparse
import json
import math
import os
import sys

import torch
import transformers

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def checkpoint_dtype(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    text = raw.get("text_config") or raw
    for cfg in (text, raw):
        for key in ("dtype", "torch_dtype"):
            if cfg.get(key) in DTYPES:
                return cfg[key]
    return "float32"


def load(model_dir, adapter_dir, attn):
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, cfg.architectures[0])
    model, info = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn,
                                      output_loading_info=True)
    missing = [k for k in info["missing_keys"]
               if not any(s in k for s in ("vision_tower", "multi_modal_projector", "lm_head"))]
    if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise RuntimeError(f"{model_dir} did not load cleanly: missing {missing[:5]} "
                           f"unexpected {info.get('unexpected_keys', [])[:5]} "
                           f"mismatched {info.get('mismatched_keys', [])[:5]}")
    text = cfg.text_config if getattr(cfg, "text_config", None) is not None else cfg
    dtype = checkpoint_dtype(model_dir)
    scale = torch.tensor(math.sqrt(text.hidden_size), dtype=torch.float32).to(DTYPES[dtype]).float()
    emb = model.get_input_embeddings()
    if not hasattr(emb, "embed_scale"):
        raise RuntimeError(f"{type(emb).__name__} has no embed_scale; is {model_dir} a Gemma 3 checkpoint?")
    emb.embed_scale = scale.clone()
    if adapter_dir:
        import peft
        from safetensors.torch import load_file

        model = peft.PeftModel.from_pretrained(model, adapter_dir)
        # Every tensor of the adapter file must have loaded into a LoRA
        # parameter, unchanged: a key PEFT did not match would leave its
        # LoRA weight at zero and the comparison would be of another model.
        file = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
        params = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
        if set(params) != set(file):
            raise RuntimeError(f"adapter keys differ from the model's LoRA parameters: "
                               f"{sorted(set(file) ^ set(params))[:6]}")
        for k, t in file.items():
            if not torch.equal(params[k].detach(), t.float()):
                raise RuntimeError(f"adapter tensor {k} changed on load")
    model.eval()
    return model, dtype, float(scale)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("prompts")
    ap.add_argument("out")
    ap.add_argument("--adapter", default="")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--stop", type=int, nargs="*", default=[])
    args = ap.parse_args()

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with open(args.prompts) as f:
        prompts = json.load(f)
    if isinstance(prompts, dict):
        prompts = prompts["prompts"]
    model, dtype, scale = load(args.model_dir, args.adapter, args.attn)
    vocab = model.get_input_embeddings().weight.shape[0]
    for i, p in enumerate(prompts):
        if not p or any(not (0 <= t < vocab) for t in p):
            raise SystemExit(f"prompt {i}: empty, or an id outside the vocabulary of {vocab}")

    # With no stop ids, nothing may end a sequence early: transformers would
    # otherwise fill an unset eos_token_id from the model's config.
    stop = args.stop or None
    gen_cfg = transformers.GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=False, num_beams=1, use_cache=True, eos_token_id=stop, pad_token_id=0,
        temperature=None, top_k=None, top_p=None, repetition_penalty=1.0)
    base = model.get_base_model() if args.adapter else model
    base.generation_config.eos_token_id = stop
    base.config.eos_token_id = stop

    outputs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)
            new = out[0, len(p):].tolist()
            if stop is None and len(new) != args.max_new_tokens:
                raise RuntimeError(f"generate gave {len(new)} tokens, not {args.max_new_tokens}")
            outputs.append(new)
            print(f"prompt of {len(p)} tokens -> {new[:12]}{' ...' if len(new) > 12 else ''}", file=sys.stderr)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({
            "model": os.path.basename(os.path.normpath(args.model_dir)),
            "adapter": bool(args.adapter),
            "dtype": "float32", "checkpoint_dtype": dtype, "embed_scale": scale,
            "attn_implementation": args.attn, "max_new_tokens": args.max_new_tokens, "stop": args.stop,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "prompts": prompts, "outputs": outputs,
        }, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
