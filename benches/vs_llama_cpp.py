#!/usr/bin/env python3
"""Flint against llama.cpp, side by side in one run, on the same model, machine and threads.

llama.cpp is driven through the `llama-cpp-python` package (install it yourself; it builds
llama.cpp from source: `CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python`).
Tests as llama-bench defines them: ppN = one batch of N prompt tokens from an empty context;
tgN = N single-token decode steps. The two engines alternate, `--reps` rounds, medians.

    python3 benches/vs_llama_cpp.py [--model M] [--threads 2] [-p 512] [-n 128] [--reps 5]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLINT = os.path.join(ROOT, "target", "release", "flint")


def flint_round(model, threads, p, n):
    out = subprocess.run(
        [FLINT, "--threads", str(threads), "bench", "--model", model, "-p", str(p), "-n", str(n), "--reps", "1", "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    r = {x["test"]: x["tok_s_median"] for x in json.loads(out)["results"]}
    return r[f"pp{p}"], r[f"tg{n}"]


def llama_round(llm, p, n, vocab):
    toks = [300 + (i * 7919) % (vocab - 300) for i in range(p)]
    llm.reset()
    t = time.perf_counter()
    llm.eval(toks)
    pp = p / (time.perf_counter() - t)
    llm.reset()
    t = time.perf_counter()
    for i in range(n):
        llm.eval([300 + (i * 104729) % (vocab - 300)])
    tg = n / (time.perf_counter() - t)
    return pp, tg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=subprocess.run([FLINT, "pull"], capture_output=True, text=True).stdout.strip().splitlines()[-1] if os.path.exists(FLINT) else None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("llama-cpp-python is not installed (see this file's docstring)")
    llm = Llama(a.model, n_ctx=a.p + a.n + 8, n_batch=a.p, n_ubatch=a.p, n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    vocab = llm.n_vocab()
    llama_round(llm, min(a.p, 32), 4, vocab)  # warm up
    flint_round(a.model, a.threads, min(a.p, 32), 4)
    res = {"flint": ([], []), "llama.cpp": ([], [])}
    for _ in range(a.reps):
        for name, f in [("flint", lambda: flint_round(a.model, a.threads, a.p, a.n)), ("llama.cpp", lambda: llama_round(llm, a.p, a.n, vocab))]:
            pp, tg = f()
            res[name][0].append(pp)
            res[name][1].append(tg)
    print(f"model {os.path.basename(a.model)}, {a.threads} threads, {a.reps} alternating rounds, medians")
    print(f"| engine    | pp{a.p} tok/s | tg{a.n} tok/s |")
    for name, (pp, tg) in res.items():
        print(f"| {name:<9} | {statistics.median(pp):>10.1f} | {statistics.median(tg):>10.1f} |")
    f, l = res["flint"], res["llama.cpp"]
    print(f"flint / llama.cpp: prefill {statistics.median(f[0]) / statistics.median(l[0]):.2f}x, decode {statistics.median(f[1]) / statistics.median(l[1]):.2f}x")


if __name__ == "__main__":
    main()
