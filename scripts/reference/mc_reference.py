#!/usr/bin/env python3
"""An independent implementation, on transformers (+ PEFT), of the eval
stage's multiple-choice scoring: the same prompts, the same per-choice
log-likelihoods and the same picks, computed one request at a time by the
Hugging Face model in float32.

    python3 mc_reference.py MODEL_DIR [--adapter DIR] SET.jsonl [--dev DEV.jsonl --shots K]
        [--nf4] [--tokenizer PATH] [--prompt mmlu|turkishmmlu] [--columns ours=theirs,...]
        [--limit N] [--device cuda|cpu] [--out ITEMS.jsonl]
        [--compare ENTRY/items.jsonl [--tol 1e-4]]
    python3 mc_reference.py --prompts-only SET.jsonl [--dev DEV.jsonl --shots K] [--prompt ...]

MODEL_DIR is a Hugging Face Gemma 3 checkpoint (for a DAG's model stage, its
cache entry). Without --adapter the base model is scored; with it, the base
and then the adapter, as the eval stage scores them side by side: --nf4
puts the adapter on the NF4 round trip of the base's projections (what
QLoRA trained against, and what the eval stage does unless the qlora stage
had `quantize: none`), computed as bitsandbytes computes it (bitsandbytes
itself when it is installed). The tokenizer is MODEL_DIR's tokenizer.json
unless --tokenizer names one (a file or a folder); a model stage's
checkpoint has none: give the one the DAG's tokenize stage read.

The prompts are lm-evaluation-harness's (see eval/mc.go): for acc the `mmlu`
task's lettered prompt with " A", " B", ... as continuations, for acc_norm
the `mmlu_continuation` task's "Question: ...\\nAnswer:" with " " + each
choice's text, normalised by its UTF-8 length; shots are the first K dev
questions of the same subject, the scored question itself passed over; `--prompt turkishmmlu` is the harness's
TurkishMMLU layout ("Soru: ...\\nCevap:"). Contexts and continuations are
tokenized as the harness's `_encode_pair` does.

Prints one JSON object: per model the accuracies overall and per subject,
and items/s. --out writes the items in the layout of the eval stage's
items.jsonl; --compare reads that file from an eval stage's entry and checks
every per-choice log-likelihood within --tol relative and the same picks,
exiting 1 otherwise. --prompts-only prints each question's two contexts and
their continuations as text, one JSON object a line, and needs nothing but
Python (the Go tests compare them with the eval package's prompts).
"""
import argparse
import gzip
import json
import math
import os
import sys
import time

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# --- the set -----------------------------------------------------------------

def read_rows(path):
    low = path.lower()
    if low.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq
        return [(f"{os.path.basename(path)} row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    opener = gzip.open if low.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    base = os.path.basename(path)
    if text.lstrip().startswith("["):
        return [(f"{base} item {i}", r) for i, r in enumerate(json.loads(text))]
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            rows.append((f"{base}:{n}", json.loads(line)))
    return rows


def parse_answer(v, n, where):
    if isinstance(v, bool) or v is None:
        raise SystemExit(f"{where}: answer {v!r} is not a letter nor an index")
    if isinstance(v, int):
        if not 0 <= v < n:
            raise SystemExit(f"{where}: answer {v} is outside the {n} choices")
        return v
    if isinstance(v, str) and len(v.strip()) == 1 and v.strip().upper() in LETTERS:
        i = LETTERS.index(v.strip().upper())
        if i >= n:
            raise SystemExit(f"{where}: answer {v!r} is outside the {n} choices")
        return i
    raise SystemExit(f"{where}: answer {v!r} is not a letter nor an index")


def read_questions(paths, columns):
    col = lambda ours: columns.get(ours, ours)
    out = []
    for p in paths:
        for where, r in read_rows(p):
            if col("choices") in r and r[col("choices")] is not None:
                choices = list(r[col("choices")])
            else:
                choices = []
                for L in LETTERS:
                    v = r.get(col(L))
                    if v is None or v == "":
                        break
                    choices.append(v)
            if len(choices) < 2:
                raise SystemExit(f"{where}: fewer than 2 choices")
            q = r.get(col("question"))
            if not isinstance(q, str) or not q.strip():
                raise SystemExit(f"{where}: no question")
            out.append({"where": where, "subject": r.get(col("subject")) or "", "question": q,
                        "choices": choices, "answer": parse_answer(r.get(col("answer")), len(choices), where)})
    return out


# --- the prompts (eval/mc.go) -------------------------------------------------

def description(fmt, subject, cloze):
    if fmt != "mmlu":
        return ""
    kind = "questions" if cloze else "multiple choice questions"
    if not subject:
        return f"The following are {kind} (with answers).\n\n"
    return f"The following are {kind} (with answers) about {subject.replace('_', ' ')}.\n\n"


def lettered(fmt, q):
    head = "Soru: " if fmt == "turkishmmlu" else ""
    cue = "Cevap:" if fmt == "turkishmmlu" else "Answer:"
    s = head + q["question"].strip()
    for i, c in enumerate(q["choices"]):
        s += f"\n{LETTERS[i]}. {c}"
    return s + "\n" + cue


def cloze(fmt, q):
    if fmt == "turkishmmlu":
        return "Soru: " + q["question"].strip() + "\nCevap:"
    return "Question: " + q["question"].strip() + "\nAnswer:"


def contexts(fmt, q, shots):
    l, c = description(fmt, q["subject"], False), description(fmt, q["subject"], True)
    for s in shots:
        l += lettered(fmt, s) + " " + LETTERS[s["answer"]] + "\n\n"
        c += cloze(fmt, s) + " " + s["choices"][s["answer"]] + "\n\n"
    return l + lettered(fmt, q), c + cloze(fmt, q)


# --- tokens -------------------------------------------------------------------

class Tok:
    def __init__(self, path):
        from tokenizers import Tokenizer
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        self.t = Tokenizer.from_file(path)
        self.bos = self.t.token_to_id("<bos>")

    def encode(self, text):
        ids = self.t.encode(text).ids  # the post-processor adds <bos>
        if not ids or ids[0] != self.bos:
            ids = [self.bos] + ids
        return ids

    def pair(self, context, continuation):
        # lm-evaluation-harness's _encode_pair for causal models.
        n = len(context) - len(context.rstrip())
        if n:
            continuation = context[-n:] + continuation
            context = context[:-n]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]


# --- the model ----------------------------------------------------------------

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_CODE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0]


def dynamic_map():
    import torch
    # bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)
    data = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        m = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-6 + i)) * m).tolist()
        data += (-(10 ** (-6 + i)) * m).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dquantize(code, x):
    """bitsandbytes' dQuantize<0> over a float32 tensor: a seven-step binary
    search of the sorted code, then the nearer neighbour (midpoints in
    float32)."""
    import torch
    n = x.shape
    pivot = torch.full(n, 127, dtype=torch.long, device=x.device)
    upper_pivot = torch.full(n, 255, dtype=torch.long, device=x.device)
    lower_pivot = torch.zeros(n, dtype=torch.long, device=x.device)
    lower = torch.full(n, -1.0, device=x.device)
    upper = torch.full(n, 1.0, device=x.device)
    val = code[pivot]
    i = 64
    while i > 0:
        gt = x > val
        lower_pivot = torch.where(gt, pivot, lower_pivot)
        lower = torch.where(gt, val, lower)
        upper_pivot = torch.where(gt, upper_pivot, pivot)
        upper = torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + i, pivot - i)
        val = code[pivot]
        i >>= 1
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    return torch.where(x > val, torch.where(x > (upper + val) * 0.5, upper_pivot, pivot),
                       torch.where(x < (lower + val) * 0.5, lower_pivot, pivot))


def nf4_round_trip(w):
    """A weight through bitsandbytes' NF4 (blocks of 64, absmax double-
    quantised in blocks of 256 with the dynamic 8-bit code), back in its own
    dtype; bitsandbytes itself when it is installed."""
    import torch
    try:
        import bitsandbytes.functional as F
        q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        return F.dequantize_4bit(q, st).to(w.dtype).reshape(w.shape), "bitsandbytes"
    except ImportError:
        pass
    dev = w.device
    code = torch.tensor(NF4_CODE, device=dev)
    x = w.float().flatten()
    nb = (x.numel() + 63) // 64
    blocks = torch.nn.functional.pad(x, (0, nb * 64 - x.numel())).view(nb, 64)
    absmax = blocks.abs().max(1).values
    normed = (blocks * (1.0 / absmax)[:, None]).flatten()[:x.numel()]
    # bitsandbytes' dQuantizeNF4 decision tree compares with the midpoints.
    mids = torch.tensor([0.5 * (NF4_CODE[i] + NF4_CODE[i + 1]) for i in range(15)], dtype=torch.float32, device=dev)
    q = (normed[:, None] > mids[None, :]).sum(1)
    offset = absmax.mean()
    code2 = dynamic_map().to(dev)
    a = absmax - offset
    n2 = (nb + 255) // 256
    absmax2 = torch.nn.functional.pad(a.abs(), (0, n2 * 256 - nb)).view(n2, 256).max(1).values
    group = torch.arange(nb, device=dev) // 256
    qa = dquantize(code2, a * (1.0 / absmax2[group]))
    absmax_d = code2[qa] * absmax2[group] + offset
    deq = code[q] * absmax_d[torch.arange(x.numel(), device=dev) // 64]
    return deq.to(w.dtype).reshape(w.shape), "bitsandbytes' algorithm, reimplemented (bitsandbytes is not installed)"


def stored_dtype(model_dir):
    import torch
    raw = json.load(open(os.path.join(model_dir, "config.json")))
    t = raw.get("text_config") or raw
    name = t.get("dtype") or t.get("torch_dtype") or raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name], t, raw


def load(model_dir, adapter, nf4, device):
    import torch
    import transformers
    dtype, text, raw = stored_dtype(model_dir)
    cls = getattr(transformers, raw["architectures"][0])
    model = cls.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").to(device)
    note = None
    if nf4:
        # The round trip of the weights as stored, as the trainer quantises
        # them; then everything computes in float32.
        with torch.no_grad():
            for name, mod in model.named_modules():
                if name.split(".")[-1] in PROJ and "vision" not in name and isinstance(mod, torch.nn.Linear):
                    mod.weight.data, note = nf4_round_trip(mod.weight.data)
    model = model.float()
    # transformers multiplies the embeddings by sqrt(hidden) in the weights'
    # dtype; in float32 the stored dtype's rounding must be kept.
    scale = torch.tensor(math.sqrt(text["hidden_size"]), dtype=torch.float32).to(dtype).float()
    emb = model.get_input_embeddings()
    emb.embed_scale = scale.to(device)
    if adapter:
        import peft
        from safetensors.torch import load_file
        model = peft.PeftModel.from_pretrained(model, adapter).to(device)
        file = load_file(os.path.join(adapter, "adapter_model.safetensors"))
        params = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
        if set(params) != set(file):
            raise SystemExit(f"the adapter does not fit the model: {sorted(set(file) ^ set(params))[:6]}")
    model.eval()
    return model, note


def loglik(model, ctx, conts, device):
    """Log-likelihoods of continuations of one context, each from its own
    forward pass (one pass for all one-token continuations)."""
    import torch
    with torch.no_grad():
        return _loglik(model, ctx, conts, device)


def _loglik(model, ctx, conts, device):
    import torch
    out = [None] * len(conts)
    singles = [i for i, c in enumerate(conts) if len(c) == 1]
    if singles:
        logits = model(input_ids=torch.tensor([ctx], device=device)).logits[0, -1].double()
        lp = torch.log_softmax(logits, -1)
        for i in singles:
            out[i] = float(lp[conts[i][0]])
    for i, c in enumerate(conts):
        if out[i] is not None:
            continue
        ids = torch.tensor([ctx + c[:-1]], device=device)
        logits = model(input_ids=ids).logits[0, len(ctx) - 1:].double()
        lp = torch.log_softmax(logits, -1)
        out[i] = float(lp.gather(1, torch.tensor(c, device=device)[:, None]).sum())
    return out


def argmax(xs):
    best = 0
    for i, v in enumerate(xs):
        if v > xs[best]:
            best = i
    return best


def score(model, prompts, qs, device):
    import torch
    items = []
    t0 = time.time()
    for q, (lctx, lconts, cctx, cconts) in zip(qs, prompts):
        letters = loglik(model, lctx, lconts, device)
        texts = loglik(model, cctx, cconts, device)
        nbytes = [len(c.encode("utf-8")) for c in q["choices"]]
        items.append({"letter_loglik": letters, "choice_loglik": texts, "choice_bytes": nbytes,
                      "pred": LETTERS[argmax(letters)],
                      "pred_norm": LETTERS[argmax([t / b for t, b in zip(texts, nbytes)])]})
    if device == "cuda":
        torch.cuda.synchronize()
    return items, len(qs) / (time.time() - t0)


def summary(qs, items):
    def acc(pairs):
        n = len(pairs)
        return {"questions": n, "acc": sum(i["pred"] == LETTERS[q["answer"]] for q, i in pairs) / n,
                "acc_norm": sum(i["pred_norm"] == LETTERS[q["answer"]] for q, i in pairs) / n}
    pairs = list(zip(qs, items))
    subjects = sorted({q["subject"] for q in qs if q["subject"]})
    return {**acc(pairs), "subjects": {s: acc([p for p in pairs if p[0]["subject"] == s]) for s in subjects}}


def compare(path, qs, results, tol):
    ours = [json.loads(l) for l in open(path) if l.strip()]
    if len(ours) != len(qs):
        return {"ok": False, "why": f"{path} has {len(ours)} items, the set {len(qs)}"}
    worst, where, picks = 0.0, None, []
    for which, items in results.items():
        for i, (o, h) in enumerate(zip(ours, items)):
            m = o["models"].get(which)
            if m is None:
                return {"ok": False, "why": f"{path} has no {which} scores"}
            for key in ("letter_loglik", "choice_loglik"):
                for j, (a, b) in enumerate(zip(m[key], h[key])):
                    rel = abs(a - b) / max(abs(b), 1e-12)
                    if rel > worst:
                        worst, where = rel, f"{which} item {i} {key}[{LETTERS[j]}]: pipeline {a!r}, transformers {b!r}"
            if m["pred"] != h["pred"] or m["pred_norm"] != h["pred_norm"]:
                picks.append(f"{which} item {i}: pipeline {m['pred']}/{m['pred_norm']}, transformers {h['pred']}/{h['pred_norm']}")
    return {"ok": worst <= tol and not picks, "max_relative": worst, "worst": where, "tol": tol,
            "different_picks": picks[:10]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", metavar="MODEL_DIR SET")
    ap.add_argument("--prompts-only", action="store_true")
    ap.add_argument("--adapter")
    ap.add_argument("--dev", action="append", default=[])
    ap.add_argument("--shots", type=int, default=0)
    ap.add_argument("--nf4", action="store_true")
    ap.add_argument("--tokenizer")
    ap.add_argument("--prompt", default="mmlu", choices=["mmlu", "turkishmmlu"])
    ap.add_argument("--columns", default="")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--device")
    ap.add_argument("--out")
    ap.add_argument("--compare")
    ap.add_argument("--tol", type=float, default=1e-4)
    # Intermixed: MODEL_DIR may come before the options and SET after them.
    a = ap.parse_intermixed_args()
    if a.prompts_only:
        a.model, a.set = None, a.paths
    elif len(a.paths) < 2:
        ap.error("give MODEL_DIR and at least one SET")
    else:
        a.model, a.set = a.paths[0], a.paths[1:]
    columns = dict(kv.split("=", 1) for kv in a.columns.split(",") if kv)
    qs = read_questions(a.set, columns)
    if a.limit:
        qs = qs[:a.limit]
    dev = read_questions(a.dev, columns) if a.dev else []
    if a.shots and not dev:
        raise SystemExit("--shots needs --dev")
    texts = []
    for q in qs:
        # The harness leaves the scored document out of its shots when they
        # come from the split being scored.
        same = lambda d: d["question"] == q["question"] and d["choices"] == q["choices"]
        shots = [d for d in dev if d["subject"] == q["subject"] and not same(d)][:a.shots]
        if len(shots) < a.shots:
            raise SystemExit(f"{a.shots}-shot needs {a.shots} dev questions of subject {q['subject']!r}")
        texts.append(contexts(a.prompt, q, shots))
    if a.prompts_only:
        for q, (lc, cc) in zip(qs, texts):
            print(json.dumps({"letters": lc, "letter_continuations": [" " + LETTERS[j] for j in range(len(q["choices"]))],
                              "cloze": cc, "cloze_continuations": [" " + c for c in q["choices"]]}, ensure_ascii=False))
        return

    import torch
    import transformers
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = Tok(a.tokenizer or a.model)
    prompts = []
    for q, (lc, cc) in zip(qs, texts):
        lp = [tok.pair(lc, " " + LETTERS[j]) for j in range(len(q["choices"]))]
        cp = [tok.pair(cc, " " + c) for c in q["choices"]]
        assert all(p[0] == lp[0][0] for p in lp) and all(p[0] == cp[0][0] for p in cp)
        prompts.append((lp[0][0], [p[1] for p in lp], cp[0][0], [p[1] for p in cp]))

    report = {"torch": torch.__version__, "transformers": transformers.__version__, "device": a.device,
              "dtype": "float32", "prompt": a.prompt, "shots": a.shots, "questions": len(qs), "models": {}}
    results = {}
    runs = [("base", None, False)] + ([("adapter", a.adapter, a.nf4)] if a.adapter else [])
    for which, adapter, nf4 in runs:
        model, note = load(a.model, adapter, nf4, a.device)
        items, rate = score(model, prompts, qs, a.device)
        results[which] = items
        report["models"][which] = {**summary(qs, items), "items_per_s": rate}
        if note:
            report["models"][which]["nf4"] = note
        del model
        if a.device == "cuda":
            torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            for i, q in enumerate(qs):
                line = {"index": i, "subject": q["subject"], "answer": LETTERS[q["answer"]],
                        "choice_bytes": results["base"][i]["choice_bytes"], "models": {}}
                for which, items in results.items():
                    it = items[i]
                    line["models"][which] = {k: it[k] for k in ("letter_loglik", "choice_loglik", "pred", "pred_norm")}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    if a.compare:
        report["compare"] = compare(a.compare, qs, results, a.tol)
    print(json.dumps(report, ensure_ascii=False, indent=1))
    if a.compare and not report["compare"]["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
