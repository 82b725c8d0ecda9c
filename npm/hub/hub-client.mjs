// The JavaScript Hub client (@huggingface/hub) as a second client of the
// Hugging Face cache, for the tests of package hub. One JSON object on
// standard output:
//
//   node hub-client.mjs snapshot HUB_URL CACHE_DIR TYPE/ORG/NAME REVISION
//       snapshotDownload into CACHE_DIR: {"path": snapshot folder}
//   node hub-client.mjs file HUB_URL CACHE_DIR TYPE/ORG/NAME REVISION PATH
//       downloadFileToCacheDir: {"path": the file's pointer in the cache}
//   node hub-client.mjs scan CACHE_DIR
//       scanCacheDir: {"repos": [{id, type, revisions: [{commit, refs,
//       files: [{path, size, blob}]}]}], "warnings": [...]}
import { downloadFileToCacheDir, scanCacheDir, snapshotDownload } from "@huggingface/hub";
import { relative } from "node:path";

const [cmd, ...args] = process.argv.slice(2);
const repoOf = (s) => {
  const [type, ...id] = s.split("/");
  return { type, name: id.join("/") };
};
// The library logs each download with console.debug; keep stdout for JSON.
console.debug = () => {};
console.info = () => {};

let out;
if (cmd === "snapshot") {
  const [hubUrl, cacheDir, repo, revision] = args;
  out = { path: await snapshotDownload({ hubUrl, cacheDir, repo: repoOf(repo), revision }) };
} else if (cmd === "file") {
  const [hubUrl, cacheDir, repo, revision, path] = args;
  out = { path: await downloadFileToCacheDir({ hubUrl, cacheDir, repo: repoOf(repo), revision, path }) };
} else if (cmd === "scan") {
  const info = await scanCacheDir(args[0]);
  out = {
    repos: info.repos.map((r) => ({
      id: r.id.name,
      type: r.id.type,
      revisions: r.revisions.map((v) => ({
        commit: v.commitOid,
        refs: v.refs,
        files: v.files.map((f) => ({ path: relative(v.path, f.path), size: f.blob.size, blob: f.blob.path })),
      })),
    })),
    warnings: info.warnings.map((w) => String(w)),
  };
} else {
  console.error("usage: hub-client.mjs snapshot|file|scan ...");
  process.exit(2);
}
process.stdout.write(JSON.stringify(out) + "\n");
