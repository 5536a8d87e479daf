"""`quantlab tokenize MODEL_DIR FILE [--special]` on the shared tiny Qwen3 and Llama 3 directories:
every golden text (one JSON string per line, so newlines and tabs survive) comes back as the
golden ids, one JSON array per line, with and without --special; a line that is not a JSON
string fails with file:line and a non-zero exit, printing nothing. Exit 77 (skip) without
../shared."""
import json
import os
import subprocess
import sys
import tempfile

quantlab = sys.argv[1]
arch = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data", "arch")
if not os.path.exists(os.path.join(arch, "qwen3-tiny", "golden", "tokenizer_ids.json")):
    print("skip: needs ../shared/data/arch")
    sys.exit(77)

failures = 0
with tempfile.TemporaryDirectory() as tmp:
    for model in ("qwen3-tiny", "llama3-tiny"):
        cases = json.load(open(os.path.join(arch, model, "golden", "tokenizer_ids.json")))["cases"]
        texts = os.path.join(tmp, model + ".txt")
        with open(texts, "w", encoding="utf-8") as f:
            for c in cases:
                f.write(json.dumps(c["text"]) + "\n")
        for flag, key in (([], "ids"), (["--special"], "ids_with_special_tokens")):
            out = subprocess.run([quantlab, "tokenize", os.path.join(arch, model), texts] + flag,
                                 capture_output=True, text=True, check=True).stdout.splitlines()
            got = [json.loads(line) for line in out]
            want = [c[key] for c in cases]
            if got != want:
                bad = [c["source"] for c, g in zip(cases, got) if g != c[key]]
                print(f"FAIL {model} {flag}: {len(bad)} cases differ, e.g. {bad[:3]}; lines {len(got)} vs {len(want)}")
                failures += 1
    bad_file = os.path.join(tmp, "bad.txt")
    with open(bad_file, "w") as f:
        f.write('"fine"\n[1, 2]\n')
    r = subprocess.run([quantlab, "tokenize", os.path.join(arch, "qwen3-tiny"), bad_file], capture_output=True, text=True)
    if r.returncode == 0 or r.stdout or f"{bad_file}:2:" not in r.stderr:
        print("FAIL bad line:", r.returncode, repr(r.stdout), r.stderr)
        failures += 1

print("ok" if failures == 0 else f"{failures} failures")
sys.exit(1 if failures else 0)
