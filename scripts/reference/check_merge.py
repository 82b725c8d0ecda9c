"""Holds `pipeline merge` to transformers + PEFT, on a GPU machine.

    python3 check_merge.py PIPELINE WORKDIR TOKENIZER_DIR ROWS.jsonl [OUT.json]

For two bases that transformers itself creates and saves (a tiny text-only
Gemma 3, and a multimodal Gemma3ForConditionalGeneration with the 4B's
text widths and vocabulary, a short stack of layers and a small SigLIP
tower), with a random PEFT LoRA adapter on all seven projections:

  * each folder `pipeline merge` writes loads without missing, unexpected
    or mismatched keys, as the base's class;
  * --base original: its weights and its logits on packed examples equal
    PEFT's merge_and_unload of the same base and adapter, within bf16
    rounding (the yardstick: how far PEFT's own unmerged model is from its
    merged one);
  * --base dequantized: the same against PEFT on the NF4-dequantised base
    (written by `pipeline merge` of a zero adapter, which merges nothing
    into the NF4 round trip), and, where bitsandbytes is installed, that
    base against bitsandbytes' own NF4 round trip.

Prints one JSON object per check and writes them all to OUT.json.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import traceback

import torch

from hf_common import read_rows

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The target_modules regex that keeps a multimodal adapter off the vision tower.
MM_TARGETS = r".*language_model.*\.(" + "|".join(TARGETS) + ")"
DEV = "cuda"
results = []


def report(**kv):
    results.append(kv)
    print(json.dumps(kv), flush=True)


def make_base(kind, path, tokdir):
    from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig
    torch.manual_seed(0)
    if kind == "tiny":
        cfg = Gemma3TextConfig(vocab_size=262144, hidden_size=64, intermediate_size=256, num_hidden_layers=6,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                               sliding_window=64)
        cls = Gemma3ForCausalLM
    else:
        text = dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                    sliding_window=1024)
        vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=2,
                      num_attention_heads=16, image_size=896, patch_size=14)
        cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256)
        cls = Gemma3ForConditionalGeneration
    with torch.device(DEV):
        model = cls(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.normal_(0, 0.3)  # Gemma's norms start at 0; spread them
    model.save_pretrained(path, max_shard_size="500MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokdir, f), path)
    return cls


def make_adapter(cls, base, path, random):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    model = cls.from_pretrained(base, dtype=torch.bfloat16, device_map=DEV)
    targets = TARGETS if cls.__name__ == "Gemma3ForCausalLM" else MM_TARGETS
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, init_lora_weights=not random)
    pm = get_peft_model(model, cfg)
    if random:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)  # a delta of the size training makes
    pm.save_pretrained(path)
    del pm, model
    torch.cuda.empty_cache()


def merge(pipeline, base, adapter, out, mode):
    t = time.time()
    r = subprocess.run([pipeline, "merge", "--model", base, "--adapter", adapter, "--out", out, "--base", mode,
                        "--max-shard-gb", "1"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pipeline merge {mode}: {r.stderr}")
    return time.time() - t


def load(cls, path):
    model, info = cls.from_pretrained(path, dtype=torch.bfloat16, device_map=DEV, output_loading_info=True)
    return model.eval(), {k: sorted(v) if isinstance(v, (list, set)) else v for k, v in info.items() if v}


def peft_merged(cls, base, adapter):
    from peft import PeftModel
    model = cls.from_pretrained(base, dtype=torch.bfloat16, device_map=DEV)
    pm = PeftModel.from_pretrained(model, adapter).eval()
    return pm


@torch.no_grad()
def logits(model, examples):
    out = []
    for ids in examples:
        x = torch.tensor([ids], device=DEV)
        out.append(model(input_ids=x, position_ids=torch.arange(len(ids), device=DEV)[None]).logits[0].float())
    return torch.cat(out)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def projections(model):
    return {n: p for n, p in model.named_parameters()
            if any(f".{t}." in n for t in TARGETS) and "vision" not in n and n.endswith("weight")}


def max_ulps(a, b, base):
    """Largest difference between two bf16 weight sets, in units of the bf16
    spacing at the larger of the reference value and the base weight: where
    W + B·A nearly cancels, bf16 arithmetic is only as fine as W's spacing."""
    worst, where = 0.0, None
    for n, w in b.items():
        x, y, bw = a[n].detach().float(), w.detach().float(), base[n].detach().float()
        scale = torch.maximum(y.abs(), bw.abs())
        spacing = torch.where(scale == 0, torch.full_like(y, 2.0 ** -133),
                              torch.ldexp(torch.ones_like(y), torch.frexp(scale).exponent - 8))
        u = (x - y).abs() / spacing
        i = int(u.argmax())
        if float(u.flatten()[i]) > worst:
            worst = float(u.flatten()[i])
            where = {"tensor": n, "index": i, "ours": float(x.flatten()[i]), "reference": float(y.flatten()[i]),
                     "base": float(bw.flatten()[i])}
    return worst, where


def base_projections(cls, path):
    m, _ = load(cls, path)
    w = {n: p.detach().clone() for n, p in projections(m).items()}
    del m
    torch.cuda.empty_cache()
    return w


def against_peft(kind, mode, cls, pipeline, base, adapter, peft_base, examples, **extra):
    """Merges adapter into base with `pipeline merge --base mode` and holds
    the folder to PEFT's merge_and_unload of the adapter into peft_base."""
    pm = peft_merged(cls, peft_base, adapter)
    unmerged = logits(pm, examples)
    merged_peft = pm.merge_and_unload()
    ref = logits(merged_peft, examples)
    ref_w = {n: p.detach().clone() for n, p in projections(merged_peft).items()}
    del pm, merged_peft
    torch.cuda.empty_cache()
    out = os.path.join(os.path.dirname(base), "merged-" + mode)
    secs = merge(pipeline, base, adapter, out, mode)
    model, info = load(cls, out)
    got = logits(model, examples)
    report(case=kind, base=mode, load_info=info, merge_seconds=round(secs, 1), **extra,
           weights_max_bf16_ulps=max_ulps(projections(model), ref_w, base_projections(cls, peft_base)),
           logits_rel_vs_peft_merged=rel(got, ref), peft_unmerged_vs_merged_rel=rel(unmerged, ref),
           same_argmax=float((got.argmax(-1) == ref.argmax(-1)).float().mean()))
    del model
    torch.cuda.empty_cache()


def check(kind, pipeline, work, tokdir, examples):
    base, rand, zero = (os.path.join(work, kind, d) for d in ("base", "adapter", "zero-adapter"))
    t = time.time()
    cls = make_base(kind, base, tokdir)
    make_adapter(cls, base, rand, True)
    make_adapter(cls, base, zero, False)
    made = time.time() - t

    # PEFT's own merge of the adapter into the stored base.
    against_peft(kind, "original", cls, pipeline, base, rand, base, examples, setup_seconds=round(made, 1))

    # The dequantised base (the NF4 round trip with nothing merged), and
    # PEFT's merge into it.
    deq = os.path.join(work, kind, "dequantized-base")
    merge(pipeline, base, zero, deq, "dequantized")
    try:
        import bitsandbytes.functional as bnbf
        b, _ = load(cls, base)
        d, _ = load(cls, deq)
        bw, dw = projections(b), projections(d)
        worst = 0.0
        for n in list(bw)[:14]:
            q, state = bnbf.quantize_4bit(bw[n].data, blocksize=64, quant_type="nf4", compress_statistics=True)
            r = bnbf.dequantize_4bit(q, state).to(torch.bfloat16)
            worst = max(worst, max_ulps({n: dw[n]}, {n: r}, {n: r})[0])
        report(case=kind, check="nf4 round trip vs bitsandbytes", tensors=min(14, len(bw)), max_bf16_ulps=worst)
        del b, d
    except ImportError:
        report(case=kind, check="nf4 round trip vs bitsandbytes", skipped="bitsandbytes is not installed")
    against_peft(kind, "dequantized", cls, pipeline, base, rand, deq, examples)
    shutil.rmtree(os.path.join(work, kind), ignore_errors=True)


def main():
    pipeline, work, tokdir, rows = sys.argv[1:5]
    out = sys.argv[5] if len(sys.argv) > 5 else None
    row = read_rows(rows)[0]
    examples, start = [], 0
    for n in row["seq_lengths"][:3]:
        examples.append(row["input_ids"][start:start + n])
        start += n
    for kind in os.environ.get("KINDS", "tiny mm4b").split():
        try:
            check(kind, pipeline, work, tokdir, examples)
        except Exception as e:
            traceback.print_exc()
            report(case=kind, error=repr(e))
    if out:
        json.dump(results, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
