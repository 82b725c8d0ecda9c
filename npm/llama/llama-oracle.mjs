// Oracle for the GGUF export tests: llama.cpp (node-llama-cpp's prebuilt
// CPU build) and @huggingface/gguf read the files we write.
//
//   node llama-oracle.mjs meta FILE.gguf
//       prints {"metadata": {...}, "tensors": [{"name", "shape", "dtype"}]}
//       as @huggingface/gguf reads them (token arrays as their length).
//   node llama-oracle.mjs logits FILE.gguf OUT.f32 [LORA.gguf]
//       reads {"ids": [...], "at": [...]} lines on stdin; for each line,
//       evaluates the ids from position 0 in a fresh context (with the GGUF
//       LoRA adapter LORA applied at scale 1, when given) and appends the
//       logits at the positions listed in "at" (len(at) × vocabulary
//       float32, little-endian) to OUT.f32.
//   node llama-oracle.mjs tokenize FILE.gguf
//       {"text": "..."} lines in, {"ids": [...], "text": "..."} lines out:
//       llama.cpp's tokenizer with special tokens parsed and no BOS added,
//       and its detokenizer's text of those ids (special tokens written).
//   node llama-oracle.mjs chat FILE.gguf
//       {"messages": [{"role", "content"}, ...]} lines in, {"text", "ids"}
//       lines out: the conversation as node-llama-cpp formats it with the
//       file's own chat template (tokenizer.chat_template), as text (special
//       tokens written out) and as the token ids it would evaluate. A
//       conversation ending in a user turn gets the generation prompt; one
//       ending in a model turn is left open after the answer, ready to be
//       continued.
//   node llama-oracle.mjs quantize FILE.gguf OUT.gguf FTYPE
//       llama.cpp's own quantiser (llama_model_quantize, what llama-quantize
//       runs, no importance matrix) turns FILE into OUT of llama_ftype FTYPE
//       (a number: 15 is Q4_K_M), through koffi: node-llama-cpp's addon does
//       not expose it.
//   node llama-oracle.mjs tensors FILE.gguf
//       {"fileType": general.file_type, "tensors": [{"name", "type",
//       "sha256"}, ...]}: each tensor's ggml type and the digest of its
//       data, in the file's order.
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import {fileURLToPath} from 'node:url';
import {getLlama, JinjaTemplateChatWrapper, LlamaText} from 'node-llama-cpp';
import {gguf} from '@huggingface/gguf';

const [cmd, file, out] = process.argv.slice(2);

// tensorBytes is a tensor's size by ggml's block sizes (ggml.c's
// type_traits: elements a block, bytes a block).
function tensorBytes(t) {
  const blocks = {0: [1, 4], 1: [1, 2], 30: [1, 2], 2: [32, 18], 3: [32, 20], 6: [32, 22], 7: [32, 24], 8: [32, 34],
    10: [256, 84], 11: [256, 110], 12: [256, 144], 13: [256, 176], 14: [256, 210]};
  const [elems, bytes] = blocks[t.dtype] ?? (() => { throw new Error(`${t.name}: ggml type ${t.dtype} not known here`); })();
  const n = t.shape.map(Number).reduce((a, b) => a * b, 1);
  return n / elems * bytes;
}

// stdinLines reads stdin to its end (a pipe Go writes into may not be
// ready yet, which a synchronous read reports as EAGAIN).
async function stdinLines() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  return Buffer.concat(chunks).toString('utf8').split('\n').filter((l) => l.length > 0).map((l) => JSON.parse(l));
}

async function loadModel(opts = {}) {
  const llama = await getLlama({gpu: false, build: 'never', logLevel: 'error'});
  return llama.loadModel({modelPath: file, gpuLayers: 0, ...opts});
}

if (cmd === 'meta') {
  const {metadata, tensorInfos} = await gguf(file, {allowLocalFile: true});
  const meta = {};
  for (const [k, v] of Object.entries(metadata)) {
    meta[k] = Array.isArray(v) && v.length > 64 ? {length: v.length, head: v.slice(0, 8)} : v;
  }
  const tensors = tensorInfos.map((t) => ({name: t.name, shape: t.shape.map(Number), dtype: t.dtype}));
  process.stdout.write(JSON.stringify({metadata: meta, tensors}, (k, v) => (typeof v === 'bigint' ? Number(v) : v)) + '\n');
} else if (cmd === 'logits') {
  const model = await loadModel();
  const n = model.fileInfo.metadata.tokenizer.ggml.tokens.length;
  const fd = fs.openSync(out, 'w');
  for (const {ids, at} of await stdinLines()) {
    // A float32 KV cache: llama.cpp's default float16 one would round keys and
    // values on top of what the file's own type does.
    const lora = process.argv[5];
    const context = await model.createContext({contextSize: Math.max(256, ids.length + 8), sequences: 1, threads: 2,
      experimentalKvCacheKeyType: 'F32', experimentalKvCacheValueType: 'F32',
      ...(lora ? {lora: {adapters: [{filePath: lora}]}} : {})});
    const seq = context.getSequence();
    const want = new Set(at);
    const res = await seq.controlledEvaluate(ids.map((id, t) => (want.has(t) ? [id, {generateNext: {logits: true}}] : id)));
    const buf = new Float32Array(at.length * n);
    at.forEach((t, i) => {
      for (const [tok, v] of res[t].next.logits) buf[i * n + tok] = v;
    });
    fs.writeSync(fd, Buffer.from(buf.buffer));
    await context.dispose();
  }
  fs.closeSync(fd);
} else if (cmd === 'tokenize') {
  const model = await loadModel({vocabOnly: true});
  for (const {text} of await stdinLines()) {
    const ids = model.tokenize(text, true);
    process.stdout.write(JSON.stringify({ids: Array.from(ids), text: model.detokenize(ids, true)}) + '\n');
  }
} else if (cmd === 'chat') {
  const model = await loadModel({vocabOnly: true});
  const template = model.fileInfo.metadata.tokenizer.chat_template;
  const wrapper = new JinjaTemplateChatWrapper({template, tokenizer: model.tokenizer});
  for (const {messages} of await stdinLines()) {
    const history = messages.map((m) =>
      m.role === 'assistant' ? {type: 'model', response: [m.content]} : {type: m.role, text: m.content});
    if (history.at(-1).type === "user") history.push({type: "model", response: []});
    const {contextText} = wrapper.generateContextState({chatHistory: history});
    const ids = LlamaText(contextText).tokenize(model.tokenizer);
    process.stdout.write(JSON.stringify({text: model.detokenize(ids, true), ids: Array.from(ids)}) + '\n');
  }
} else if (cmd === 'quantize') {
  const {default: koffi} = await import('koffi');
  const bins = fileURLToPath(new URL('node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/', import.meta.url));
  const name = fs.readdirSync(bins).find((f) => /^libllama\.v.*\.so$/.test(f));
  const lib = koffi.load(path.join(bins, name));
  // llama.h's llama_model_quantize_params of the release node-llama-cpp
  // pins (package-lock.json); a new release may change it.
  const Params = koffi.struct('llama_model_quantize_params', {
    nthread: 'int32', ftype: 'int32', output_tensor_type: 'int32', token_embedding_type: 'int32',
    allow_requantize: 'bool', quantize_output_tensor: 'bool', only_copy: 'bool', pure: 'bool',
    keep_split: 'bool', dry_run: 'bool',
    imatrix: 'void *', kv_overrides: 'void *', tt_overrides: 'void *', prune_layers: 'void *',
    max_buf_size: 'size_t',
  });
  const defaults = lib.func('llama_model_quantize_default_params', Params, []);
  const quantize = lib.func('llama_model_quantize', 'uint32', ['str', 'str', koffi.pointer(Params)]);
  const params = defaults();
  params.ftype = Number(process.argv[5]);
  params.nthread = 2;
  if (quantize(file, out, params) !== 0) {
    console.error(`llama_model_quantize ${file} -> ${out} (ftype ${params.ftype}) failed`);
    process.exit(1);
  }
} else if (cmd === 'tensors') {
  const {metadata, tensorInfos, tensorDataOffset} = await gguf(file, {allowLocalFile: true});
  const fd = fs.openSync(file, 'r');
  const tensors = tensorInfos.map((t) => {
    const n = tensorBytes(t);
    const buf = Buffer.alloc(n);
    if (fs.readSync(fd, buf, 0, n, Number(tensorDataOffset) + Number(t.offset)) !== n) throw new Error(`${t.name}: the file ends inside it`);
    return {name: t.name, type: t.dtype, sha256: crypto.createHash('sha256').update(buf).digest('hex')};
  });
  process.stdout.write(JSON.stringify({fileType: metadata['general.file_type'], tensors}) + '\n');
} else {
  console.error('usage: llama-oracle.mjs meta|logits|tokenize|chat|quantize|tensors FILE.gguf [OUT] [FTYPE]');
  process.exit(2);
}
// Exit once stdout has taken every line: writes to a pipe that is full
// wait in a queue, and exiting at once (which node-llama-cpp's open
// handles otherwise prevent) would drop them.
process.stdout.write('', () => process.exit(0));
