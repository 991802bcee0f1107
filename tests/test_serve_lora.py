"""Serving LoRA adapters: several adapters and the base model batched together (dhad.multi_lora, the
engine, `dhad serve --adapter NAME=DIR`).

The references are independent of dhad's LoRA code: PEFT's own adapters (made with `peft` on the
transformers `LlamaForCausalLM` that loads dhad's checkpoint), merged with PEFT's `merge_and_unload`,
decoded greedily by transformers; and, for the fused targets PEFT cannot express on Llama, the merge
W + scale * B @ A done by hand in the test.
"""
from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch

from dhad.checkpoint import save_model
from dhad.config import Config
from dhad.engine import Engine, UnknownAdapter
from dhad.model import Transformer
from dhad.multi_lora import MultiLoRA, target_slot

import peft  # noqa: E402  (test extra: missing is an error, not a skip)
import transformers  # noqa: E402

NO_EOS = dict(eos_token_id=())
PEFT_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                "up_proj": "up", "down_proj": "down"}


def _tokenizer():
    from dhad.tokenizer import train_bpe
    return train_bpe(["x"], vocab_size=256 + 3, min_frequency=1)


def _peft_adapter(hf_dir, out_dir, seed, **lora_kw):
    """A PEFT adapter over the transformers model of ``hf_dir``, with random (non-zero) A and B, saved in
    PEFT's format; returns the PEFT model."""
    base = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **lora_kw))
    with torch.no_grad():  # PEFT's default init of B is kaiming-uniform; keep deltas moderate
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(0.5)
    pm.save_pretrained(out_dir)
    return pm.eval()


def _hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = hf(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = _tokenizer()
    cfg = Config.from_name("tiny-llama", vocab_size=tok.vocab_size)
    model = Transformer(cfg).init_weights(seed=0).eval()
    d = tmp_path_factory.mktemp("lora-base")
    save_model(model, d, tokenizer=tok)
    dirs = {"alpha": tmp_path_factory.mktemp("alpha"), "beta": tmp_path_factory.mktemp("beta")}
    pa = _peft_adapter(d, dirs["alpha"], 1, r=4, lora_alpha=8, target_modules=list(PEFT_TARGETS))
    pb = _peft_adapter(d, dirs["beta"], 2, r=8, lora_alpha=4, use_rslora=True,
                       target_modules=["q_proj", "v_proj", "up_proj"])
    refs = {"alpha": pa.merge_and_unload(), "beta": pb.merge_and_unload(),
            None: transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()}
    return dict(tok=tok, model=model, dir=d, refs=refs, dirs=dirs)


PROMPTS = [([5, 6, 7, 8, 9], "alpha"), ([40, 41, 42], None), ([100, 7, 3, 9, 200, 31, 2], "beta"),
           ([11, 12], "alpha"), ([250, 1, 77, 3], "beta"), ([9, 9, 9, 9, 9, 9], None)]
N_NEW = 8


def test_mixed_adapter_batch_equals_each_alone_and_the_merged_model(setup):
    model, tok, refs = setup["model"], setup["tok"], setup["refs"]
    want = [_hf_greedy(refs[a], p, N_NEW) for p, a in PROMPTS]
    # the adapters matter: each changes the greedy answer of some prompt
    for name in ("alpha", "beta"):
        assert any(_hf_greedy(refs[None], p, N_NEW) != w for (p, a), w in zip(PROMPTS, want) if a == name)
    # some requests end early: their rows are refilled by moving the last row (and its adapter) into them
    lengths = [N_NEW, 3, N_NEW, 5, 2, N_NEW]
    eng = Engine(model, tok, max_batch_size=8, adapters=MultiLoRA.from_dirs(model, setup["dirs"])).start()
    try:
        with eng._cv:  # hold the loop back until every request is queued: one prefill, one decode batch
            hs = [eng.submit(p, max_new_tokens=n, adapter=a, **NO_EOS) for (p, a), n in zip(PROMPTS, lengths)]
        mixed = [h.result(60).token_ids for h in hs]
        st = eng.stats()
        assert st["decode_steps"] == N_NEW - 1 and st["adapters"] == ["alpha", "beta"]  # all rows decoded together
        alone = [eng.generate(p, max_new_tokens=n, adapter=a, timeout=60, **NO_EOS).token_ids
                 for (p, a), n in zip(PROMPTS, lengths)]
    finally:
        eng.shutdown()
        eng.lora.remove()  # the module's model serves the next tests plain
    assert mixed == alone
    assert mixed == [w[:n] for w, n in zip(want, lengths)]


def _random_adapter(cfg, targets, r, scale, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(cfg.n_layer):
        for t in targets:
            mod, lo, hi = target_slot(cfg, t)
            fin = cfg.n_inner if mod == "mlp.proj" else cfg.n_embd
            out[layer, t] = (torch.randn(r, fin, generator=g) * 0.1, torch.randn(hi - lo, r, generator=g) * 0.1, scale)
    return out


def _merged_by_hand(model, weights):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for (layer, t), (A, B, s) in weights.items():
            mod, lo, hi = target_slot(m.config, t)
            part, name = mod.split(".")
            lin = getattr(getattr(m.h[layer], part), name)
            lin.weight[lo:hi] += s * B @ A
    return m


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-jais"])
def test_batched_forward_equals_merged_weights_fused_targets_too(preset):
    """Per-row logits of a mixed batch (adapters over the fused qkv / gate|up, over sub-projections,
    and the base) equal the model with that adapter merged by hand; base rows are untouched exactly."""
    cfg = Config.from_name(preset)
    model = Transformer(cfg).init_weights(seed=0).eval()
    a = _random_adapter(cfg, ["qkv", "o", "gate_up", "down"], 4, 2.0, 1)
    b = _random_adapter(cfg, ["q", "v", "up"], 8, 0.5, 2)
    ids = torch.randint(0, cfg.vocab_size, (4, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(ids)
        ref = [_merged_by_hand(model, a)(ids[:1]), None, _merged_by_hand(model, b)(ids[2:3]),
               _merged_by_hand(model, a)(ids[3:])]
        lora = MultiLoRA(model, {"a": a, "b": b})
        with lora.batch([0, -1, 1, 0]):
            out = model(ids)
            kept = model(ids, keep=torch.tensor([[2, 8], [0, 5], [4, 4], [7, 1]]))  # queries at some positions only
        assert torch.equal(model(ids), base)  # outside `batch`: the plain model
    for i in (0, 2, 3):
        torch.testing.assert_close(out[i], ref[i][0], rtol=0, atol=1e-5)
        assert (out[i] - base[i]).abs().max() > 1e-2  # the adapter does change the logits
    assert torch.equal(out[1], base[1])
    for i, pos in enumerate(([2, 8], [0, 5], [4, 4], [7, 1])):
        torch.testing.assert_close(kept[i], out[i, pos], rtol=0, atol=1e-5)
    lora.remove()
    assert torch.equal(model(ids), base)


def test_bad_adapters_and_requests_are_refused(setup):
    model, cfg = setup["model"], setup["model"].config
    with pytest.raises(ValueError, match="do not fit"):
        MultiLoRA(model, {"x": {(0, "q"): (torch.zeros(4, 3), torch.zeros(64, 4), 1.0)}})
    with pytest.raises(ValueError, match="not a projection"):
        MultiLoRA(model, {"x": {(0, "c_attn"): (torch.zeros(4, 64), torch.zeros(64, 4), 1.0)}})
    with pytest.raises(ValueError, match="layer 9"):
        MultiLoRA(model, {"x": {(9, "o"): (torch.zeros(4, 64), torch.zeros(64, 4), 1.0)}})
    with pytest.raises(ValueError, match="adapter 'x'.*no adapter_config.json"):
        MultiLoRA.from_dirs(model, {"x": setup["dir"]})
    lora = MultiLoRA(model, {"x": _random_adapter(cfg, ["q"], 2, 1.0, 0)})
    with pytest.raises(ValueError, match="indices must be"):
        with lora.batch([1]):
            pass
    lora.remove()
    eng = Engine(model, setup["tok"], adapters=MultiLoRA.from_dirs(model, setup["dirs"])).start()
    try:
        with pytest.raises(UnknownAdapter, match="unknown adapter 'gamma'.*'alpha', 'beta'"):
            eng.submit([1, 2], adapter="gamma")
    finally:
        eng.shutdown()
        eng.lora.remove()  # the module's model serves the next tests plain


# --- the HTTP API: `dhad serve --adapter NAME=DIR` ------------------------------------------------

@pytest.fixture(scope="module")
def served(setup):
    from dhad.serve.app import BackgroundServer, create_app
    from dhad.serve.backend import load_backend
    backend = load_backend(setup["dir"], model_name="base", max_batch_size=8, adapters=setup["dirs"])
    backend.engine.start()
    with BackgroundServer(create_app(backend)) as s:
        yield s, backend
    backend.engine.shutdown(wait=False)


def test_http_model_field_picks_the_adapter_in_a_shared_batch(served, setup):
    import concurrent.futures

    import httpx
    server, backend = served
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [("base", None), ("alpha", "base"), ("beta", "base")]
    assert httpx.get(server.url + "/v1/models/beta").json()["parent"] == "base"
    tok = setup["tok"]
    prompt = "abc"
    ids = tok.encode(prompt, add_special_tokens=True)

    def complete(model):
        r = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": model, "prompt": prompt, "max_tokens": N_NEW, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    names = ["alpha", "base", "beta", "alpha", "beta", "base"]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as ex:  # concurrent: batched together by the engine
        got = list(ex.map(complete, names))
    eos = setup["model"].config.eos_token_id
    for name, r in zip(names, got):
        assert r["model"] == name
        res = backend.engine.generate(ids, max_new_tokens=N_NEW, adapter=None if name == "base" else name, timeout=60)
        want = _hf_greedy(setup["refs"][None if name == "base" else name], ids, N_NEW)  # PEFT's merged model
        n = next((i + 1 for i, t in enumerate(want) if t == eos), N_NEW)  # greedy up to EOS, as served
        assert res.token_ids == want[:n]
        assert r["choices"][0]["text"] == res.text and r["usage"]["completion_tokens"] == n
    assert len({r["choices"][0]["text"] for r in got}) == 3  # the three models answer differently

    # chat and the card's /score honour it too, and agree with each other
    msgs = [{"role": "user", "content": "hi"}]
    answers = {}
    for name in ("base", "alpha", "beta"):
        c = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": name, "messages": msgs, "max_tokens": N_NEW, "temperature": 0}).json()
        s = httpx.post(server.url + "/score", timeout=60, json={
            "model": name, "input_data": {"input_string": msgs, "parameters": {"max_new_tokens": N_NEW}}}).json()
        assert c["model"] == name and c["choices"][0]["message"]["content"] == s["output"]
        answers[name] = s["output"]
    # streamed: every chunk names the adapter, and the text is the same
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": "beta", "messages": msgs, "max_tokens": N_NEW, "temperature": 0, "stream": True}) as resp:
        data = [ln[6:] for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["model"] for c in chunks} == {"beta"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answers["beta"]
    plain = httpx.post(server.url + "/score", timeout=60, json={
        "input_data": {"input_string": msgs, "parameters": {"max_new_tokens": N_NEW}}}).json()
    assert plain["output"] == answers["base"]  # no model: the base model
    assert len(set(answers.values())) == 3


def test_http_unknown_model_is_an_openai_404(served):
    import httpx
    server, _ = served
    msgs = [{"role": "user", "content": "hi"}]
    for path, body in (("/v1/chat/completions", {"model": "gamma", "messages": msgs}),
                       ("/v1/completions", {"model": "gamma", "prompt": "x"}),
                       ("/score", {"model": "gamma", "input_data": {"input_string": msgs}})):
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 404, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert "'gamma'" in err["message"] and "'alpha'" in err["message"]
    assert httpx.get(server.url + "/v1/models/gamma").status_code == 404


def test_serve_cli_adapter_errors(setup, tmp_path, capsys):
    from dhad.cli import main
    from dhad.serve.backend import load_backend
    base = str(setup["dir"])
    for bad, msg in (("noequals", "NAME=DIR"), ("=x", "NAME=DIR"), (f"x={tmp_path}/missing", "not a directory"),
                     (f"x={tmp_path}", "no adapter_config.json")):
        assert main(["serve", "--model", base, "--adapter", bad]) == 2
        assert msg in capsys.readouterr().err
    a = str(setup["dirs"]["alpha"])
    assert main(["serve", "--model", base, "--adapter", f"x={a}", "--adapter", f"x={a}"]) == 2
    assert "given twice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="base model's name"):
        load_backend(setup["dir"], model_name="m", adapters={"m": a})


# --- --engine vllm: adapters go to vLLM's LoRA support ----------------------------------------
# vLLM cannot run here (its CPU build pins an older transformers; no GPU): a stand-in with vLLM's
# interface (EngineArgs, LLMEngine.add_request(..., lora_request=), vllm.lora.request.LoRARequest)
# decodes with a dhad model and applies the adapter a request's LoRARequest names, read from its path.

def _fake_vllm(model):
    import types
    fake = types.ModuleType("vllm")
    fake.__version__ = "0.8.0"
    fake.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    fake.EngineArgs = lambda **kw: kw
    lora_mod = types.ModuleType("vllm.lora")
    req_mod = types.ModuleType("vllm.lora.request")

    class LoRARequest:
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    req_mod.LoRARequest = LoRARequest

    class LLMEngine:
        @classmethod
        def from_engine_args(cls, args):
            fake.args = args
            return cls(args)

        def __init__(self, args):
            self.reqs, self.seen, self.loras = {}, [], {}

        def add_request(self, rid, prompt, sp, lora_request=None):
            if lora_request is not None:
                assert fake.args["enable_lora"] and lora_request.lora_int_id >= 1
                if lora_request.lora_int_id not in self.loras:  # vLLM loads an adapter from its path
                    self.loras[lora_request.lora_int_id] = MultiLoRA.from_dirs(model, {"x": lora_request.lora_path})
            self.seen.append(lora_request)
            self.reqs[rid] = (list(prompt["prompt_token_ids"]), [], sp, lora_request)

        def abort_request(self, rid):
            self.reqs.pop(rid, None)

        def step(self):
            outs = []
            for rid, (p, gen, sp, lr) in list(self.reqs.items()):
                ctx = self.loras[lr.lora_int_id].batch([0]) if lr is not None else contextlib.nullcontext()
                with torch.no_grad(), ctx:
                    gen.append(int(model(torch.tensor([p + gen]))[0, -1].argmax()))
                done = len(gen) >= sp.max_tokens
                if done:
                    del self.reqs[rid]
                out = types.SimpleNamespace(token_ids=list(gen), finish_reason="length" if done else None)
                outs.append(types.SimpleNamespace(request_id=rid, outputs=[out], finished=done))
            return outs

    fake.LLMEngine = LLMEngine
    return fake, lora_mod, req_mod


def test_vllm_engine_passes_adapters_as_lora_requests(setup, monkeypatch):
    import sys

    from dhad.engine import make_engine
    from dhad.vllm_engine import lora_engine_args
    model, tok, dirs = setup["model"], setup["tok"], setup["dirs"]
    fake, lora_mod, req_mod = _fake_vllm(copy.deepcopy(model))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora_mod)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", req_mod)
    assert lora_engine_args(dirs, 4) == {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8}
    eng = make_engine(setup["dir"], tok, engine="vllm", max_batch_size=4, adapters=dirs,
                      max_lora_rank=16)  # a --vllm-arg wins over the derived value
    native = Engine(model, tok, max_batch_size=4, adapters=MultiLoRA.from_dirs(model, dirs)).start()
    with eng.start():
        assert fake.args["enable_lora"] is True and fake.args["max_loras"] == 2 and fake.args["max_lora_rank"] == 16
        assert eng.adapter_names == ("alpha", "beta") and eng.stats()["adapters"] == ["alpha", "beta"]
        try:
            hs = [eng.submit(p, max_new_tokens=N_NEW, adapter=a, **NO_EOS) for p, a in PROMPTS]
            for (p, a), h in zip(PROMPTS, hs):
                want = native.generate(p, max_new_tokens=N_NEW, adapter=a, timeout=60, **NO_EOS)
                assert h.result(60).token_ids == want.token_ids
        finally:
            native.shutdown()
            native.lora.remove()
        seen = [(r.lora_name, r.lora_int_id, r.lora_path) if r else None for r in eng._engine.seen]
        assert seen == [None if a is None else (a, 1 if a == "alpha" else 2, str(dirs[a].resolve()))
                        for _, a in PROMPTS]
        with pytest.raises(UnknownAdapter, match="'gamma'"):
            eng.submit([1, 2], adapter="gamma")


@pytest.mark.parametrize("preset", ["tiny-jais", "tiny-llama"])
def test_adapter_dirs_written_by_dhad_batch_like_dhad_lora_unmerged(preset, tmp_path):
    """Adapters saved by dhad.lora (Jais: one A/B on the fused c_attn), served together: each row's logits
    equal `dhad.lora.load_adapter`'s single-adapter model (unmerged LoraLinear layers)."""
    from dhad.lora import LoraConfig, apply_lora, lora_layers, save_adapter
    cfg = Config.from_name(preset)
    base = Transformer(cfg).init_weights(seed=0).eval()
    dirs, singles = {}, {}
    every = ("q", "k", "v", "o", "gate", "up", "down")
    for name, seed, targets in (("a", 1, every), ("b", 2, ("q", "k", "v", "down"))):
        m = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets=targets), seed=seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # trained-looking B (PEFT's init has B = 0)
            for layer in lora_layers(m).values():
                for b in layer.lora_B.values():
                    b.copy_(torch.randn(b.shape, generator=g) * 0.2)
        dirs[name] = save_adapter(m, tmp_path / name)
        singles[name] = m.eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    lora = MultiLoRA.from_dirs(base, dirs)
    with torch.no_grad(), lora.batch([1, 0, -1]):
        out = base(ids)
    with torch.no_grad():
        for i, name in enumerate(("b", "a")):
            torch.testing.assert_close(out[i], singles[name](ids[i:i + 1])[0], rtol=0, atol=1e-5)
            assert (out[i] - base(ids[i:i + 1])[0]).abs().max() > 1e-2
    lora.remove()


def test_adapters_apply_to_the_batching_thread_only_and_fit_the_layout(tmp_path):
    import threading

    from dhad.lora import LoraConfig, apply_lora, save_adapter
    cfg = Config.from_name("tiny-llama")
    model = Transformer(cfg).init_weights(seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    lora = MultiLoRA(model, {"a": _random_adapter(cfg, ["q", "down"], 4, 2.0, 1)})
    with torch.no_grad():
        base = model(ids)
        seen = {}
        with lora.batch([0]):
            inside = model(ids)
            t = threading.Thread(target=lambda: seen.setdefault("other", model(ids)))  # e.g. an eval beside the engine
            t.start()
            t.join()
    assert (inside - base).abs().max() > 1e-2 and torch.equal(seen["other"], base)
    lora.remove()
    jcfg = Config.from_name("tiny-jais")
    jais = apply_lora(Transformer(jcfg).init_weights(seed=0), LoraConfig(r=2, targets=("q", "k", "v")))
    d = save_adapter(jais, tmp_path / "jais-adapter")
    with pytest.raises(ValueError, match="other model layout"):
        MultiLoRA.from_dirs(model, {"j": d})


def test_serve_cli_with_adapters(setup, wait_healthy):
    """`dhad serve --adapter NAME=DIR` end to end, in its own process: the adapters are model ids, and a
    completion through one equals the in-process engine's (itself checked against PEFT above)."""
    import os
    import socket
    import subprocess
    import sys

    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dhad", "serve", "--model", str(setup["dir"]), "--port", str(port),
           "--served-model-name", "base", "--log-level", "warning"]
    for name, d in setup["dirs"].items():
        cmd += ["--adapter", f"{name}={d}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, 90, lambda: proc.stdout.read() if proc.poll() else "")
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["base", "alpha", "beta"]
        r = httpx.post(url + "/v1/completions", timeout=60,
                       json={"model": "beta", "prompt": "abc", "max_tokens": N_NEW, "temperature": 0}).json()
        eng = Engine(setup["model"], setup["tok"], adapters=MultiLoRA.from_dirs(setup["model"], setup["dirs"]))
        with eng.start():
            want = eng.generate(setup["tok"].encode("abc", add_special_tokens=True), max_new_tokens=N_NEW,
                                adapter="beta", timeout=60)
        eng.lora.remove()
        assert r["model"] == "beta" and r["choices"][0]["text"] == want.text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_zero_adapter_for_vllm_cpu_base_rows_has_no_delta(tmp_path):
    """The all-zero adapter vLLM's CPU build gets for base requests: same modules, ranks and A as the
    adapter it copies, every B exactly zero -- so a model with it merged is the base model."""
    from dhad.lora import LoraConfig, apply_lora, lora_layers, read_adapter, save_adapter
    from dhad.vllm_engine import zero_adapter
    model = Transformer(Config.from_name("tiny-llama")).init_weights(seed=0).eval()
    m = apply_lora(copy.deepcopy(model), LoraConfig(r=4, alpha=8, targets=("q", "v", "down")), seed=1)
    with torch.no_grad():
        for layer in lora_layers(m).values():
            for b in layer.lora_B.values():
                b.normal_()
    src = save_adapter(m, tmp_path / "a")
    cfg0, w0 = read_adapter(src)
    cfg1, w1 = read_adapter(zero_adapter(src))
    assert cfg1 == cfg0 and w1.keys() == w0.keys() and w0
    for key, (a, b) in w1.items():
        assert torch.equal(a, w0[key][0]) and b.shape == w0[key][1].shape and not b.any()
        assert w0[key][1].any()
