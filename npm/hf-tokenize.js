// Oracle for the Go tokenizer tests and benchmark: runs Hugging Face
// tokenizers (the Rust library behind Node) on JSON lines from stdin.
//
//   node hf-tokenize.js encode TOKENIZER_JSON [--add-special] [--offsets]
//       {"text": "..."} lines in, {"ids": [...], "offsets": [[start, end], ...]}
//       lines out; offsets are converted from code points to UTF-8 bytes.
//   node hf-tokenize.js decode TOKENIZER_JSON [--skip-special]
//       {"ids": [...]} lines in, {"text": "..."} lines out.
//   node hf-tokenize.js bench TOKENIZER_JSON TEXTS_JSONL [--add-special] [--repeat N]
//       times encodeBatch over all texts and prints
//       {"texts": n, "tokens": n, "seconds": s, "tokens_per_second": r}.
'use strict';
const fs = require('fs');
const { Tokenizer } = require('tokenizers');

function readLines(input) {
  return input.split('\n').filter((l) => l.length > 0).map((l) => JSON.parse(l));
}

// byteStarts[k] is the UTF-8 byte offset of code point k; one extra entry
// holds the total length.
function byteStarts(text) {
  const starts = [0];
  let b = 0;
  for (const ch of text) {
    const cp = ch.codePointAt(0);
    b += cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    starts.push(b);
  }
  return starts;
}

async function main() {
  const [mode, tokPath, ...rest] = process.argv.slice(2);
  if (!mode || !tokPath) {
    throw new Error('usage: hf-tokenize.js encode|decode|bench TOKENIZER_JSON ...');
  }
  const tok = Tokenizer.fromFile(tokPath);
  const flag = (name) => rest.includes(name);
  const out = [];
  if (mode === 'encode') {
    const recs = readLines(fs.readFileSync(0, 'utf8'));
    const addSpecialTokens = flag('--add-special');
    const chunk = 512;
    for (let i = 0; i < recs.length; i += chunk) {
      const texts = recs.slice(i, i + chunk).map((r) => r.text);
      const encs = await tok.encodeBatch(texts, { addSpecialTokens });
      encs.forEach((enc, j) => {
        const rec = { ids: enc.getIds() };
        if (flag('--offsets')) {
          const starts = byteStarts(texts[j]);
          rec.offsets = enc.getOffsets().map(([s, e]) => [starts[s], starts[e]]);
        }
        out.push(JSON.stringify(rec));
      });
    }
  } else if (mode === 'decode') {
    const recs = readLines(fs.readFileSync(0, 'utf8'));
    const skip = flag('--skip-special');
    for (const r of recs) {
      out.push(JSON.stringify({ text: await tok.decode(r.ids, skip) }));
    }
  } else if (mode === 'bench') {
    const texts = readLines(fs.readFileSync(rest[0], 'utf8')).map((r) => r.text);
    const addSpecialTokens = flag('--add-special');
    const ri = rest.indexOf('--repeat');
    const repeat = ri >= 0 ? Number(rest[ri + 1]) : 1;
    await tok.encodeBatch(texts.slice(0, 100), { addSpecialTokens }); // warm up
    let best = Infinity;
    let tokens = 0;
    for (let k = 0; k < repeat; k++) {
      const t0 = process.hrtime.bigint();
      const encs = await tok.encodeBatch(texts, { addSpecialTokens });
      const secs = Number(process.hrtime.bigint() - t0) / 1e9;
      tokens = encs.reduce((n, e) => n + e.getLength(), 0);
      best = Math.min(best, secs);
    }
    out.push(JSON.stringify({ texts: texts.length, tokens, seconds: best, tokens_per_second: tokens / best }));
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
  if (out.length > 0) {
    fs.writeFileSync(1, out.join('\n') + '\n');
  }
}

main().catch((err) => {
  console.error(`hf-tokenize: ${err.stack || err}`);
  process.exit(1);
});
