#!/usr/bin/env python3
"""Reads the TensorBoard event files of pipeline cache entries with
TensorBoard's own readers and checks them against the entries' metrics.jsonl.

    python3 scripts/check-tensorboard.py PATH...

Each PATH is a cache entry holding tb/ (a qlora stage's, say) or a whole cache
folder, whose entries with tb/ are all checked. Needs the tensorboard package
(2.x; written against 2.21). For every entry:

  * event_accumulator.EventAccumulator (the classic reader) lists every scalar
    tag the run logged, and each tag's (step, value) series equals the
    metrics.jsonl lines (float32 precision): train/loss, train/learning_rate,
    train/grad_norm, train/epoch, train/num_input_tokens_seen,
    train/tokens_per_second, eval/loss where evaluated, and
    train/peak_gpu_memory_gib where a GPU was used;
    An eval stage's entry (results.json, no metrics.jsonl) is held to its
    results instead: eval/loss_base, eval/acc_norm_adapter, ... one point
    each, at one step;
  * it finds the settings text (a DT_STRING tensor of the text plugin) and the
    text names the learning rate (an eval stage's: its tasks);
  * plugin_event_accumulator.EventAccumulator (the reader TensorBoard's server
    uses) files the scalars under the scalars plugin and the settings under the
    text plugin.

Prints one line per check and ends with "N passed, M failed"; exits 1 if any
check failed.
"""
import glob
import json
import math
import os
import sys

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.util import tensor_util

import numpy as np

FIELDS = {
    "train/loss": "loss",
    "train/learning_rate": "lr",
    "train/grad_norm": "grad_norm",
    "train/epoch": "epoch",
    "train/num_input_tokens_seen": "tokens",
    "train/tokens_per_second": "tokens_per_sec",
}

passed = failed = 0


def check(ok, what):
    global passed, failed
    if ok:
        passed += 1
        print("ok    ", what)
    else:
        failed += 1
        print("FAILED", what)


def same(a, b):
    return np.float32(a) == np.float32(b)


def training_series(entry):
    """The series a qlora stage's metrics.jsonl says tb/ holds."""
    lines = [json.loads(l) for l in open(os.path.join(entry, "metrics.jsonl")) if l.strip()]
    want = {tag: [(m["step"], m[f]) for m in lines] for tag, f in FIELDS.items()}
    evals = [(m["step"], m["eval_loss"]) for m in lines
             if m.get("eval_loss") is not None and not math.isnan(m["eval_loss"])]
    if evals:
        want["eval/loss"] = evals
    if any(m.get("peak_gpu_gib", 0) > 0 for m in lines):
        want["train/peak_gpu_memory_gib"] = [(m["step"], m.get("peak_gpu_gib", 0)) for m in lines]
    return want


def eval_scores(entry):
    """The scores an eval stage's results.json says tb/ holds, by tag."""
    res = json.load(open(os.path.join(entry, "results.json")))
    want = {}
    for which in ("base", "adapter"):
        if "loss" in res:
            sc = res["loss"]["scores"][which]
            want[f"eval/loss_{which}"], want[f"eval/perplexity_{which}"] = sc["loss"], sc["perplexity"]
        if "multiple_choice" in res:
            sc = res["multiple_choice"]["scores"][which]
            want[f"eval/acc_{which}"], want[f"eval/acc_norm_{which}"] = sc["acc"], sc["acc_norm"]
    return want


def check_entry(entry):
    tb = os.path.join(entry, "tb")
    training = os.path.exists(os.path.join(entry, "metrics.jsonl"))
    if training:
        want, setting = training_series(entry), "| lr |"
    else:
        scores, setting = eval_scores(entry), "| tasks |"

    acc = ea.EventAccumulator(tb, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    if not training:
        # One point per score, all at the step the eval logged them at.
        steps = {e.step for tag in tags["scalars"] for e in acc.Scalars(tag)}
        check(len(steps) == 1, f"{entry}: every score at one step ({sorted(steps)})")
        step = steps.pop() if steps else 0
        want = {tag: [(step, v)] for tag, v in scores.items()}
    check(set(tags["scalars"]) == set(want),
          f"{entry}: scalar tags {sorted(tags['scalars'])} == {sorted(want)}")
    for tag, series in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)] if tag in tags["scalars"] else []
        check(len(got) == len(series) and all(gs == ws and same(gv, wv) for (gs, gv), (ws, wv) in zip(got, series)),
              f"{entry}: {tag}: {len(got)} points equal to {'metrics.jsonl' if training else 'results.json'}'s {len(series)}")
    text = ""
    if "settings" in tags["tensors"]:
        events = acc.Tensors("settings")
        text = tensor_util.make_ndarray(events[0].tensor_proto).item()
        text = text.decode() if isinstance(text, bytes) else str(text)
    check(setting in text, f"{entry}: settings text has a {setting} row")

    pacc = pea.EventAccumulator(tb, size_guidance={pea.TENSORS: 0})
    pacc.Reload()
    def plugin_tags(name):
        try:
            return set(pacc.PluginTagToContent(name))
        except KeyError:  # no tag of that plugin at all
            return set()
    scalars = plugin_tags("scalars")
    check(scalars == set(want), f"{entry}: the server's reader files {len(scalars)} tags under the scalars plugin")
    check("settings" in plugin_tags("text"), f"{entry}: the server's reader files settings under the text plugin")


def entries(path):
    if os.path.isdir(os.path.join(path, "tb")):
        return [path]
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "entries", "*", "*", "tb")))


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    found = [e for p in sys.argv[1:] for e in entries(p)]
    check(len(found) > 0, f"entries with tb/ under {' '.join(sys.argv[1:])}: {len(found)}")
    for e in found:
        check_entry(e)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
