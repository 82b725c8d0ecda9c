"""Helpers the Hugging Face reference scripts share."""
import json

import torch


def read_rows(path):
    """Packed rows from JSON lines (input_ids, labels, seq_lengths)."""
    return [json.loads(l) for l in open(path) if l.strip()]


def packed_loss_sum(model, rows, device):
    """The summed token cross-entropy of packed rows and the number of
    trained tokens, each packed example run on its own (logits at t predict
    labels[t+1]; -100 is not trained), logits upcast to float32 unless they
    are float64 already."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for r in rows:
        start = 0
        for n in r["seq_lengths"]:
            ids = torch.tensor([r["input_ids"][start:start + n]], device=device)
            labels = torch.tensor(r["labels"][start:start + n], device=device)
            start += n
            logits = model(input_ids=ids, position_ids=torch.arange(n, device=device)[None]).logits[0]
            if logits.dtype != torch.float64:
                logits = logits.float()
            tgt = labels[1:]
            mask = tgt != -100
            if mask.any():
                lg = logits[:-1][mask]
                total = total + (torch.logsumexp(lg, -1) - lg.gather(1, tgt[mask][:, None])[:, 0]).sum().double()
                count += int(mask.sum())
    return total, count
