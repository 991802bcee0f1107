"""Runs in llama-cpp-python's own venv (scripts/test-llamacpp.sh builds it), driven by
tests/test_llamacpp_real.py and benchmarks/bench_llamacpp.py: one JSON argument, one JSON line out.

  {"mode": "greedy", "model": F, "prompt": [ids], "n": 64, "out": "logits.npy"}
      feed the prompt, then n greedy tokens one at a time (llama.cpp's KV cache); the logits of every
      position (logits_all) go to `out`; prints {"tokens": [...]}
  {"mode": "tokenize", "model": F, "texts": [...]}      -> {"ids": [[...], ...]} (BOS as the file says)
  {"mode": "bench", "model": F, "prompt": [ids], "n": 64, "threads": T, "repeats": R}
      batch-1 decode: best of R runs of n single-token steps -> {"tokens_per_s": x}
"""
import json
import sys
import time

import numpy as np
from llama_cpp import Llama


def main() -> None:
    a = json.loads(sys.argv[1])
    threads = int(a.get("threads", 1))
    n_ctx = int(a.get("n_ctx", 256))
    llm = Llama(model_path=a["model"], n_ctx=n_ctx, n_batch=n_ctx, logits_all=a["mode"] == "greedy",
                n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
    if a["mode"] == "tokenize":
        ids = [llm.tokenize(t.encode("utf-8"), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                            special=True) for t in a["texts"]]
        print(json.dumps({"ids": ids}))
    elif a["mode"] == "greedy":
        llm.eval(a["prompt"])
        out = []
        for _ in range(int(a["n"])):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(t)
            llm.eval([t])
        np.save(a["out"], np.asarray(llm.scores[: llm.n_tokens], dtype=np.float32))
        print(json.dumps({"tokens": out}))
    elif a["mode"] == "bench":
        best = 0.0
        for _ in range(int(a.get("repeats", 3))):
            llm.reset()
            llm.eval(a["prompt"])
            t = int(a.get("token", 0))  # the cost of a step does not depend on which token it is
            t0 = time.perf_counter()
            for _ in range(int(a["n"])):
                llm.eval([t])
            best = max(best, int(a["n"]) / (time.perf_counter() - t0))
        print(json.dumps({"tokens_per_s": best}))
    else:
        raise SystemExit(f"unknown mode {a['mode']!r}")


if __name__ == "__main__":
    main()
