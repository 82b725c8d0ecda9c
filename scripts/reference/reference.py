#!/usr/bin/env python3
"""Hugging Face reference for the trainer's CPU backend.

Reads the cases that `go run ./trainer/internal/refgen` writes (a random
Gemma 3 checkpoint, a PEFT adapter with non-zero B, packed rows, optimizer
settings) and computes with transformers + PEFT in float64:

  * the loss of the packed rows, each packed example run on its own, as the
    sum of token cross-entropies over all examples divided by the number of
    trained tokens (logits at t predict labels[t+1]);
  * the gradient of that loss for every LoRA tensor;
  * the loss after gradient clipping and one torch.optim.AdamW step;
  * the logits of the first example, to show PEFT loads the adapter and
    reproduces the Go model's output.

It also records transformers' learning-rate schedules, a float32 AdamW
trajectory and bitsandbytes' NF4 quantisation of a test weight.

transformers upcasts RMSNorm to float32 only and its eager attention runs
softmax in float32; for a float64 reference the norms are patched to keep
float64 and attention uses SDPA, which computes in the input dtype. RoPE
angles stay float32, as transformers computes them for every dtype. The
embedding scale sqrt(hidden) is rounded to the checkpoint's dtype, as it is
when the model runs in that dtype.

Usage: reference.py CASES_DIR OUT_DIR
"""
import json
import math
import os
import sys
import traceback

import torch
import transformers
import peft
from safetensors.torch import load_file, save_file

torch.set_num_threads(max(1, os.cpu_count() or 1))
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def patch_norms():
    from transformers.models.gemma3 import modeling_gemma3 as mg

    def forward(self, x):
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        h = x.to(dt)
        out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.to(dt))).type_as(x)

    patched = []
    for name in dir(mg):
        obj = getattr(mg, name)
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and "RMSNorm" in name:
            obj.forward = forward
            patched.append(name)
    return patched


def text_config(cfg):
    return cfg.text_config if hasattr(cfg, "text_config") and cfg.text_config is not None else cfg


def load_case(case_dir):
    model_dir = os.path.join(case_dir, "model")
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, cfg.architectures[0])
    model, info = cls.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="sdpa",
                                      output_loading_info=True)
    missing = [k for k in info["missing_keys"]
               if not any(s in k for s in ("vision_tower", "multi_modal_projector", "lm_head"))]
    if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise RuntimeError(f"checkpoint did not load cleanly: missing {missing[:5]} "
                           f"unexpected {info.get('unexpected_keys', [])[:5]} mismatched {info.get('mismatched_keys', [])[:5]}")
    tc = text_config(cfg)
    print(os.path.basename(case_dir), cfg.architectures[0], "layer_types", getattr(tc, "layer_types", None),
          "rope", getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None),
          "window", tc.sliding_window, "scalar", tc.query_pre_attn_scalar)
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    raw_text = raw.get("text_config", raw)
    ckpt_dtype = raw_text.get("dtype") or raw_text.get("torch_dtype") or raw.get("dtype") or raw.get("torch_dtype")
    scale = torch.tensor(math.sqrt(tc.hidden_size), dtype=torch.float32).to(DTYPES[ckpt_dtype]).double()
    emb = model.get_input_embeddings()
    emb.embed_scale = scale.clone()
    model = peft.PeftModel.from_pretrained(model, os.path.join(case_dir, "adapter"), is_trainable=True)
    model.eval()  # dropout off; gradients still flow
    # The adapter must have loaded exactly: every tensor of the file into a
    # LoRA parameter of the model, unchanged.
    file = load_file(os.path.join(case_dir, "adapter", "adapter_model.safetensors"))
    params = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    if set(params) != set(file):
        raise RuntimeError(f"adapter keys differ from the model's LoRA parameters: "
                           f"{sorted(set(file) ^ set(params))[:6]}")
    for k, t in file.items():
        if not torch.equal(params[k].detach(), t.double()):
            raise RuntimeError(f"adapter tensor {k} changed on load")
    rows = [json.loads(l) for l in open(os.path.join(case_dir, "batch.jsonl"))]
    return model, params, rows, float(scale), cfg.architectures[0]


def examples(rows):
    for ri, r in enumerate(rows):
        start = 0
        for li, n in enumerate(r["seq_lengths"]):
            yield ri, li, r["input_ids"][start:start + n], r["labels"][start:start + n]
            start += n


def loss_sum(model, rows, keep_logits=False):
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    first_logits = None
    for ri, li, ids, labels in examples(rows):
        ids_t = torch.tensor([ids])
        out = model(input_ids=ids_t, position_ids=torch.arange(len(ids))[None])
        logits = out.logits[0].double()
        if keep_logits and first_logits is None:
            first_logits = logits.detach().clone()
        tgt = torch.tensor(labels[1:])
        mask = tgt != -100
        if mask.any():
            lg = logits[:-1][mask]
            total = total + (torch.logsumexp(lg, -1) - lg.gather(1, tgt[mask][:, None])[:, 0]).sum()
            count += int(mask.sum())
    return total, count, first_logits


def run_case(case_dir, out_dir):
    spec = json.load(open(os.path.join(case_dir, "case.json")))
    model, params, rows, scale, arch = load_case(case_dir)
    total, count, logits = loss_sum(model, rows, keep_logits=True)
    loss = total / count
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in params.items()}
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    max_norm = spec["clip_fraction"] * norm
    plist = [params[k] for k in sorted(params)]
    torch.nn.utils.clip_grad_norm_(plist, max_norm)
    opt = torch.optim.AdamW(plist, lr=spec["lr"], betas=(spec["beta1"], spec["beta2"]), eps=spec["eps"],
                            weight_decay=spec["weight_decay"], foreach=False)
    opt.step()
    with torch.no_grad():
        post_total, post_count, _ = loss_sum(model, rows)
    tensors = {"grad." + k: g.contiguous() for k, g in grads.items()}
    tensors.update({"post." + k: p.detach().clone().contiguous() for k, p in params.items()})
    tensors["logits.row0.ex0"] = logits.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "golden.safetensors"))
    golden = {"loss": float(loss), "loss_sum": float(total), "tokens": count, "grad_norm": norm,
              "max_norm": max_norm, "post_step_loss": float(post_total / post_count), "embed_scale": scale,
              "architecture": arch, "lora_tensors": len(grads)}
    json.dump(golden, open(os.path.join(out_dir, "golden.json"), "w"), indent=2)
    print(spec["name"], json.dumps(golden))


def schedules(out_dir):
    from transformers import optimization as o
    p = torch.nn.Parameter(torch.zeros(1))
    res = {"warmup": 3, "total": 20, "steps": list(range(25))}
    makers = {
        "constant": lambda opt: o.get_constant_schedule_with_warmup(opt, 3),
        "linear": lambda opt: o.get_linear_schedule_with_warmup(opt, 3, 20),
        "cosine": lambda opt: o.get_cosine_schedule_with_warmup(opt, 3, 20),
    }
    for name, make in makers.items():
        opt = torch.optim.SGD([p], lr=1.0)
        sched = make(opt)
        res[name] = [sched.lr_lambdas[0](s) for s in res["steps"]]
    # A float32 AdamW trajectory: p0[i] = 0.1 sin(i+1); the gradient at
    # step k (from 1) is g[i] = 0.01 k cos(i k) with g[7] = 0 and g[9] = 1e-9.
    n, steps = 50, 6
    w = torch.nn.Parameter((0.1 * torch.sin(torch.arange(1, n + 1, dtype=torch.float64))).float())
    opt = torch.optim.AdamW([w], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, foreach=False)
    traj = []
    for k in range(1, steps + 1):
        g = (0.01 * k * torch.cos(torch.arange(n, dtype=torch.float64) * k)).float()
        g[7], g[9] = 0.0, 1e-9
        w.grad = g
        opt.step()
        traj.append(w.detach().tolist())
    res["adamw"] = {"n": n, "lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.05,
                    "params_after_each_step": traj}
    json.dump(res, open(os.path.join(out_dir, "schedules.json"), "w"), indent=1)


def bnb_dynamic_map():
    # bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)
    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def nf4(cases_dir, out_dir):
    w = load_file(os.path.join(cases_dir, "nf4", "weight.safetensors"))["weight"]
    res = {}
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        q, st = F.quantize_4bit(w.to(dev), blocksize=64, compress_statistics=True, quant_type="nf4")
        deq = F.dequantize_4bit(q, st)
        res = {"packed": q.flatten().cpu(), "absmax_q": st.absmax.flatten().cpu(),
               "absmax2": st.state2.absmax.float().cpu(), "offset": st.offset.float().reshape(1).cpu(),
               "dequant": deq.float().flatten().cpu(), "code2": st.state2.code.float().cpu()}
        source = "bitsandbytes " + bnb.__version__
    except Exception as e:  # bitsandbytes absent: its algorithm, from its source
        source = f"reimplementation of bitsandbytes' kernels (bitsandbytes unavailable: {e!r})"
        code = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
        x = w.float().flatten()
        nb = (x.numel() + 63) // 64
        blocks = torch.nn.functional.pad(x, (0, nb * 64 - x.numel())).view(nb, 64)
        absmax = blocks.abs().max(1).values
        normed = (blocks * (1.0 / absmax)[:, None]).flatten()[:x.numel()]
        # bitsandbytes' dQuantizeNF4 decision tree compares against these midpoints.
        mids = torch.tensor([0.5 * (float(code[i]) + float(code[i + 1])) for i in range(15)], dtype=torch.float32)
        q = (normed[:, None] > mids[None, :]).sum(1).to(torch.uint8)
        packed = (q[0::2] << 4) | q[1::2]
        offset = absmax.mean()
        code2 = bnb_dynamic_map()
        a = absmax - offset
        n2 = (nb + 255) // 256
        absmax2 = torch.stack([a[i * 256:(i + 1) * 256].abs().max() for i in range(n2)])
        qa = []
        for i in range(nb):
            v = float((a[i] * (1.0 / absmax2[i // 256])).float())
            qa.append(dquantize(code2, v))
        qa = torch.tensor(qa, dtype=torch.uint8)
        absmax_d = code2[qa.long()] * absmax2[torch.arange(nb) // 256] + offset
        deq = (code[q.long()] * absmax_d[torch.arange(x.numel()) // 64]).to(w.dtype)
        res = {"packed": packed, "absmax_q": qa, "absmax2": absmax2, "offset": offset.reshape(1),
               "dequant": deq.float(), "code2": code2}
    save_file({k: v.contiguous() for k, v in res.items()}, os.path.join(out_dir, "nf4.safetensors"))
    json.dump({"source": source}, open(os.path.join(out_dir, "nf4.json"), "w"))
    print("nf4:", source)


def dquantize(code, x):
    # bitsandbytes' dQuantize<0>: a seven-step binary search, then rounding
    # to the nearer neighbour.
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = -1.0, 1.0
    val = float(code[pivot])
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = float(code[pivot])
        i >>= 1
    if upper_pivot == 255:
        upper = float(code[upper_pivot])
    if lower_pivot == 0:
        lower = float(code[lower_pivot])
    if x > val:
        return upper_pivot if x > f32((upper + val) * 0.5) else pivot
    return lower_pivot if x < f32((lower + val) * 0.5) else pivot


def main():
    cases_dir, out_dir = sys.argv[1], sys.argv[2]
    print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
    print("patched", patch_norms())
    failed = False
    for name in sorted(os.listdir(cases_dir)):
        d = os.path.join(cases_dir, name)
        if os.path.exists(os.path.join(d, "case.json")):
            try:
                run_case(d, os.path.join(out_dir, name))
            except Exception:
                traceback.print_exc()
                failed = True
    for step in (schedules, lambda o: nf4(cases_dir, o)):
        try:
            step(out_dir)
        except Exception:
            traceback.print_exc()
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
