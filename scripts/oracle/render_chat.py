#!/usr/bin/env python3
"""Renders chat conversations with a model's real Jinja chat template, the way
Hugging Face transformers does (apply_chat_template with tokenize=False): an
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the
loopcontrols extension, a raise_exception global, an un-escaped tojson
filter, and the tokenizer config's special tokens passed as variables.

This is the oracle for the chat package and the tokenizer parity tests.

    render_chat.py TOKENIZER_CONFIG_JSON [--generation-prompt] < messages.jsonl
        each input line is {"messages": [{"role": ..., "content": ...}, ...]}
    render_chat.py TOKENIZER_CONFIG_JSON --alpaca RECORDS.jsonl[.gz] [--system TEXT]
        each record {"instruction", "input", "output"} becomes one user turn
        (instruction, then a blank line and input when input is not empty)
        and one assistant turn (output), after an optional system message.

Output: one {"text": ...} line per conversation, in input order. A template
error on one conversation is written as {"error": ...} on its line.
"""
import argparse
import gzip
import json
import sys
from datetime import datetime

import jinja2.ext
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def strftime_now(fmt):
    return datetime.now().strftime(fmt)


def special_tokens(config):
    """The special-token variables transformers passes to the template."""
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token",
                "boi_token", "eoi_token", "image_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None:
            out[key] = value
    return out


def alpaca_conversations(path, system):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            prompt = rec["instruction"]
            if rec.get("input", ""):
                prompt += "\n\n" + rec["input"]
            messages = []
            if system is not None:
                messages.append({"role": "system", "content": system})
            messages.append({"role": "user", "content": prompt})
            messages.append({"role": "assistant", "content": rec["output"]})
            yield messages


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--alpaca")
    ap.add_argument("--system")
    ap.add_argument("--generation-prompt", action="store_true")
    args = ap.parse_args()

    with open(args.config, encoding="utf-8") as f:
        config = json.load(f)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    template = env.from_string(config["chat_template"])
    variables = special_tokens(config)

    if args.alpaca:
        conversations = alpaca_conversations(args.alpaca, args.system)
    else:
        conversations = (json.loads(l)["messages"] for l in sys.stdin if l.strip())

    out = sys.stdout
    for messages in conversations:
        try:
            text = template.render(messages=messages,
                                   add_generation_prompt=args.generation_prompt,
                                   **variables)
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        except TemplateError as err:
            out.write(json.dumps({"error": str(err)}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
