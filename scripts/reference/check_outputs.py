#!/usr/bin/env python3
"""Checks the outputs of a demo run with the tools users have: pyarrow reads
every stage's table as it is, and transformers + PEFT load the adapter the
qlora stage wrote and reproduce the loss the Go code computed.

    check_outputs.py DIR
      DIR/tables/{alpaca,chat,tokens,pack}.arrow  the stages' data.arrow files
      DIR/tables/*.jsonl                            `pipeline export --format jsonl` of each
      DIR/case/{model,adapter,batch.jsonl}          base checkpoint, adapter, packed rows
      DIR/go_loss.json                              `pipeline loss` of the same
"""
import json
import os
import sys

import pyarrow as pa
import pyarrow.ipc
import torch

sys.path.insert(0, os.path.dirname(__file__))
import reference  # noqa: E402  (load_case, loss_sum: the float64 reference)


def check_tables(d):
    for name in ("alpaca", "chat", "tokens", "pack"):
        with pa.memory_map(os.path.join(d, name + ".arrow")) as src:
            table = pa.ipc.open_file(src).read_all()
        rows = [json.loads(l) for l in open(os.path.join(d, name + ".jsonl"))]
        assert table.num_rows == len(rows), (name, table.num_rows, len(rows))
        assert table.to_pylist() == rows, f"{name}: pyarrow reads other values than the export"
        print(f"pyarrow {pa.__version__} reads {name}.arrow: {table.num_rows} rows, schema {table.schema.names}")
    pack = pa.ipc.open_file(pa.memory_map(os.path.join(d, "pack.arrow"))).read_all().to_pylist()
    seq_len = len(pack[0]["input_ids"])
    for r in pack:
        assert all(len(r[c]) == seq_len for c in ("input_ids", "labels", "position_ids"))
        at = 0
        for n in r["seq_lengths"]:
            assert r["position_ids"][at:at + n] == list(range(n))
            assert r["labels"][at] == -100
            at += n
        assert all(x == 0 for x in r["input_ids"][at:]) and all(x == -100 for x in r["labels"][at:])
    print(f"packed rows: {len(pack)} of {seq_len} tokens, positions restart per example, padding masked")


def check_adapter(d):
    reference.patch_norms()
    model, params, rows, scale, arch = reference.load_case(os.path.join(d, "case"))
    with torch.no_grad():
        total, count, _ = reference.loss_sum(model, rows)
    hf = float(total) / count
    go = json.load(open(os.path.join(d, "go_loss.json")))
    rel = abs(go["loss"] - hf) / abs(hf)
    print(f"PEFT {reference.peft.__version__} + transformers {reference.transformers.__version__} (float64): "
          f"loss {hf:.9f} over {count} tokens; Go: {go['loss']:.9f} over {go['tokens']}; relative error {rel:.2e}")
    assert count == go["tokens"] and rel < 1e-5, "PEFT does not reproduce the Go loss"


if __name__ == "__main__":
    check_tables(os.path.join(sys.argv[1], "tables"))
    check_adapter(sys.argv[1])
    print("ok")
