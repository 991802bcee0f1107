"""Engine: continuous batching equals one-at-a-time, cancellation frees rows, UTF-8 streaming, limits."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from dhad.config import Config
from dhad.engine import Engine, EngineClosed, QueueFull, RequestError, make_engine
from dhad.generate import SamplingParams, generate_ids
from dhad.model import Transformer
from test_generate import scripted_model  # noqa: E402  (tests/ is on sys.path under pytest)

NO_EOS = dict(eos_token_id=())  # random tiny models: run to the length limit


@pytest.fixture(scope="session", params=["tiny-jais", "tiny-llama"])
def tiny(request):
    torch.manual_seed(0)
    return Transformer(Config.from_name(request.param)).init_weights(seed=0).eval()


@pytest.fixture(scope="session")
def byte_tok():
    from dhad.tokenizer import train_bpe
    return train_bpe(["x"], vocab_size=256 + 3, min_frequency=1)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 500, (int(L),), generator=g).tolist()
            for L in torch.randint(1, 40, (n,), generator=g)]


def test_continuous_batching_equals_one_at_a_time(tiny):
    ps = prompts(9)
    lens = [3 + 4 * i % 23 for i in range(len(ps))]  # rows finish at different steps; new ones join
    mixed = [SamplingParams(max_new_tokens=n, repetition_penalty=1.3 if i % 3 == 1 else 1.0, **NO_EOS)
             for i, n in enumerate(lens)]
    alone = [generate_ids(tiny, p, sp)[0] for p, sp in zip(ps, mixed)]
    with Engine(tiny, None, max_batch_size=3, max_queue=16) as eng:
        hs = [eng.submit(p, sp) for p, sp in zip(ps, mixed)]
        res = [h.result(60) for h in hs]
        stats = eng.stats()
    assert [r.token_ids for r in res] == alone
    assert all(r.finish_reason == "length" and r.completion_tokens == n for r, n in zip(res, lens))
    assert stats["active"] == 0 and stats["completed"] == len(ps)
    assert stats["decode_steps"] < sum(lens)  # rows really shared decode steps


def test_seeded_sampling_same_alone_or_batched(tiny):
    sp = SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.95, seed=42, **NO_EOS)
    p = prompts(1, seed=5)[0]
    with Engine(tiny, None, max_batch_size=4) as eng:
        alone = eng.generate(p, sp, timeout=30).token_ids
        others = [eng.submit(q, max_new_tokens=20, do_sample=True, seed=i, **NO_EOS) for i, q in enumerate(prompts(3))]
        batched = eng.generate(p, sp, timeout=30).token_ids
        [h.result(30) for h in others]
    assert alone == batched


def test_cancel_frees_the_row_and_queue_full():
    m = Transformer(Config.from_name("tiny-llama")).init_weights(seed=0).eval()
    with Engine(m, None, max_batch_size=1, max_queue=1) as eng:
        a = eng.submit([1, 2, 3], max_new_tokens=500, **NO_EOS)
        while not a.token_ids:  # a is running
            a._done.wait(0.01)
        b = eng.submit([4, 5], max_new_tokens=5, **NO_EOS)  # waits for the only row
        with pytest.raises(QueueFull):
            eng.submit([6], max_new_tokens=5)
        a.cancel()
        ra, rb = a.result(30), b.result(30)
        assert ra.finish_reason == "cancelled" and ra.completion_tokens < 500
        assert rb.finish_reason == "length" and rb.completion_tokens == 5
        st = eng.stats()
        assert (st["active"], st["queued"], st["cancelled"], st["rejected"]) == (0, 0, 1, 1)


def test_cancel_while_queued():
    m = Transformer(Config.from_name("tiny-llama")).init_weights(seed=0).eval()
    with Engine(m, None, max_batch_size=1, max_queue=4) as eng:
        a = eng.submit([1, 2, 3], max_new_tokens=300, **NO_EOS)
        b = eng.submit([4, 5], max_new_tokens=300, **NO_EOS)
        b.cancel()
        assert b.result(30).finish_reason == "cancelled"  # answered while `a` still holds the row
        a.cancel()
        assert a.result(30).finish_reason == "cancelled"


def test_disconnected_async_stream_frees_its_row():
    m = Transformer(Config.from_name("tiny-jais")).init_weights(seed=0).eval()

    async def main(eng):
        h = eng.submit([1, 2, 3], max_new_tokens=400, **NO_EOS)
        got = []

        async def client():  # a server handler streaming to a client
            async for ev in h:
                got.append(ev)

        task = asyncio.create_task(client())
        while len(got) < 2:
            await asyncio.sleep(0.005)
        task.cancel()  # the client disconnects
        await asyncio.gather(task, return_exceptions=True)
        res = await asyncio.to_thread(h.result, 30)
        nxt = [ev async for ev in eng.stream([7, 8], max_new_tokens=4, **NO_EOS)]
        return res, nxt

    with Engine(m, None, max_batch_size=1, max_queue=0) as eng:
        res, nxt = asyncio.run(main(eng))
        assert res.finish_reason == "cancelled" and res.completion_tokens < 400
        assert nxt[-1].finished and nxt[-1].finish_reason == "length"
        assert sum(len(e.token_ids) for e in nxt) == 4 and nxt[-1].usage == {
            "prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
        assert eng.stats()["active"] == 0


def test_streams_complete_arabic_characters(byte_tok):
    answer = "عاصمة الإمارات هي أبوظبي."
    script = byte_tok.encode(answer)
    m = scripted_model(byte_tok.vocab_size, script, eos=0)
    with Engine(m, byte_tok, max_batch_size=2) as eng:
        events = list(eng.submit([byte_tok.encode("x")[0]], max_new_tokens=200))
    texts = [e.text for e in events]
    assert "".join(texts) == answer
    assert all("\ufffd" not in t for t in texts)
    assert sum(1 for t in texts if t) == len(answer)  # each Arabic letter arrives whole, once
    last = events[-1]
    assert last.finished and last.finish_reason == "stop"
    assert last.usage == {"prompt_tokens": 1, "completion_tokens": len(script) + 1, "total_tokens": len(script) + 2}


def test_stop_string_ends_request(byte_tok):
    answer = "مرحبا"
    script = byte_tok.encode(answer + "\n[|Human|] more text")
    m = scripted_model(byte_tok.vocab_size, script, eos=0)
    with Engine(m, byte_tok) as eng:
        r = eng.generate([0], max_new_tokens=100, stop_strings=["\n[|Human|]"], timeout=30)
        full = eng.generate([0], max_new_tokens=100, timeout=30)
    assert r.text == answer and r.finish_reason == "stop"
    assert full.text == answer + "\n[|Human|] more text"


def test_request_limits_and_lifecycle():
    m = Transformer(Config.from_name("tiny-llama")).init_weights(seed=0).eval()
    eng = Engine(m, None, max_batch_size=2, max_new_tokens_limit=64, max_seq_len=32)
    with pytest.raises(EngineClosed, match="not started"):
        eng.submit([1])
    eng.start()
    with pytest.raises(RequestError, match="longer than the context"):
        eng.submit(list(range(1, 33)))
    with pytest.raises(RequestError, match="above this server's limit of 64"):
        eng.submit([1], max_new_tokens=65)
    with pytest.raises(RequestError, match="empty prompt"):
        eng.submit([])
    with pytest.raises(RequestError, match="outside the vocabulary"):
        eng.submit([10**6])
    with pytest.raises(RequestError, match="top_p"):
        eng.submit([1], top_p=2.0)
    with pytest.raises(RequestError, match="tokenizer"):
        eng.submit("text prompt")
    # the context caps the answer: 29 prompt tokens leave 3 slots
    r = eng.generate(list(range(1, 30)), max_new_tokens=50, timeout=30, **NO_EOS)
    assert r.finish_reason == "length" and r.completion_tokens == 3
    # graceful shutdown finishes what is running and queued
    hs = [eng.submit([i + 1], max_new_tokens=6, **NO_EOS) for i in range(4)]
    eng.shutdown(wait=True, timeout=60)
    assert [h.result(0).finish_reason for h in hs] == ["length"] * 4
    assert not eng.running
    with pytest.raises(EngineClosed):
        eng.submit([1])


def test_shutdown_without_wait_cancels():
    m = Transformer(Config.from_name("tiny-llama")).init_weights(seed=0).eval()
    eng = Engine(m, None, max_batch_size=1, max_queue=4).start()
    hs = [eng.submit([i + 1], max_new_tokens=400, **NO_EOS) for i in range(3)]
    eng.shutdown(wait=False, timeout=60)
    assert [h.result(5).finish_reason for h in hs] == ["cancelled"] * 3


def test_engine_failure_ends_requests_and_its_thread(monkeypatch):
    """A model that raises mid-decode: every request ends with finish_reason "error", the worker thread
    ends without an unhandled exception (it escaped to threading.excepthook before), the engine says
    why it stopped and refuses new requests with that reason; shutdown() returns at once."""
    import threading
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    m = Transformer(Config.from_name("tiny-llama")).init_weights(seed=0).eval()
    eng = Engine(m, None, max_batch_size=2, max_queue=4)

    def step():  # a forward's own error fails only its rows; this one stops the loop
        raise MemoryError("out of memory (simulated)")

    monkeypatch.setattr(eng, "_step", step)
    eng.start()
    hs = [eng.submit([i + 1, 2], max_new_tokens=50, **NO_EOS) for i in range(4)]
    results = [h.result(30) for h in hs]
    assert {r.finish_reason for r in results} == {"error"}
    assert all("engine stopped: MemoryError: out of memory" in r.error for r in results)
    eng._thread.join(30)
    assert not eng.running and eng.stats()["error"] == "MemoryError: out of memory (simulated)"
    with pytest.raises(EngineClosed, match="stopped after an error"):
        eng.submit([1])
    eng.shutdown(timeout=5)
    assert escaped == []


def test_shutdown_joins_the_thread_or_says_it_could_not():
    from dhad.engine import EngineError
    m = Transformer(Config.from_name("tiny-llama")).init_weights(seed=0).eval()
    m.register_forward_pre_hook(lambda mod, a: time.sleep(0.05))
    eng = Engine(m, None, max_batch_size=1).start()
    h = eng.submit([1, 2], max_new_tokens=200, **NO_EOS)
    next(iter(h))
    with pytest.raises(EngineError, match="did not stop within 0.01 s"):
        eng.shutdown(wait=True, timeout=0.01)  # finishing 200 tokens takes longer
    eng.shutdown(wait=False, timeout=30)  # abort: the row is cancelled within one step
    assert not eng._thread.is_alive() and h.result(1).finish_reason == "cancelled"


def test_vllm_engine_needs_vllm(tmp_path):
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    from dhad.engine import EngineError
    with pytest.raises(EngineError, match="needs vLLM"):
        make_engine(tmp_path, engine="vllm")
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine(tmp_path, engine="tgi")


def test_vllm_version_support(tmp_path):
    import json

    from dhad.engine import EngineError
    from dhad.vllm_engine import check_support
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["JAISLMHeadModel"]}))
    check_support(tmp_path, "0.6.3")
    check_support(tmp_path, "0.22.1")
    for v in ("0.3.3", "0.23.0", "1.0.0"):
        with pytest.raises(EngineError, match="0.3.4 through 0.22"):
            check_support(tmp_path, v)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    check_support(tmp_path, "0.23.0")


def test_vllm_parameter_mapping():
    import types

    from dhad.vllm_engine import to_vllm_params
    fake = types.SimpleNamespace(SamplingParams=lambda **kw: kw)  # records the keywords vLLM would get
    jais = to_vllm_params(SamplingParams.preset("jais"), n_prompt=10, limit=50, vllm_module=fake)
    assert jais == {"max_tokens": 50, "repetition_penalty": 1.2, "skip_special_tokens": True, "min_tokens": 4,
                    "temperature": 0.3, "top_p": 0.9, "top_k": 50}
    # transformers' min_length counts the prompt; vLLM's min_tokens does not. Greedy is temperature 0.
    g = to_vllm_params(SamplingParams(min_length=14, top_k=0, stop_strings=["\n"], seed=0), 10, 50, fake)
    assert (g["min_tokens"], g["temperature"], g["stop"], g["seed"]) == (4, 0.0, ["\n"], 0)
    s = to_vllm_params(SamplingParams(do_sample=True, top_k=0), 10, 50, fake)
    assert s["top_k"] == -1 and s["temperature"] == 1.0
    # a request's own EOS replaces the checkpoint's: vLLM stops on it and ignores its own
    e = to_vllm_params(SamplingParams(eos_token_id=(7, 9), stop_token_ids=(3,)), 10, 50, fake)
    assert e["stop_token_ids"] == [3, 7, 9] and e["ignore_eos"] is True
    # denormal values that overflow logits are raised to vLLM's own temperature floor, 0.01
    d = to_vllm_params(SamplingParams(do_sample=True, temperature=1e-45, repetition_penalty=5e-324), 10, 50, fake)
    assert (d["temperature"], d["repetition_penalty"]) == (0.01, 0.01)


def test_finished_request_frees_its_row_before_the_client_hears():
    """With one row and no queue, a client that resubmits as soon as its answer ends is accepted
    (the final event is sent after the row is released), and a request being prefilled counts as busy."""
    torch.manual_seed(0)
    model = Transformer(Config.from_name("tiny-llama")).init_weights(seed=0).eval()
    eng = Engine(model, None, max_batch_size=1, max_queue=0).start()
    try:
        for i in range(5):
            h = eng.submit([1, 2, 3 + i], max_new_tokens=3, **NO_EOS)
            events = list(h)
            assert events[-1].finished and events[-1].finish_reason == "length"
        h = eng.submit([5, 6, 7], max_new_tokens=200, **NO_EOS)
        with pytest.raises(QueueFull):
            eng.submit([5, 6, 8], SamplingParams(max_new_tokens=2))
        h.cancel()
        list(h)
    finally:
        eng.shutdown()


# --- the vLLM adapter's driving loop, against a stand-in with vLLM's LLMEngine interface ---------
# vLLM needs a GPU build that this machine cannot install; the stand-in implements the part of
# vLLM's API the adapter calls (EngineArgs, LLMEngine.from_engine_args, add_request(id,
# {"prompt_token_ids"}, SamplingParams), step() -> [RequestOutput(request_id, outputs=[
# CompletionOutput(token_ids, finish_reason)], finished)], abort_request) with vLLM's semantics
# (greedy at temperature 0, max_tokens, min_tokens, stop_token_ids, EOS), decoding with a dhad model.

class _FakeVLLM:
    __version__ = "0.6.3"

    def __init__(self, model, eos):
        import types
        self.model, self.eos, fake = model, eos, self
        self.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
        self.EngineArgs = lambda **kw: kw

        class LLMEngine:
            @classmethod
            def from_engine_args(cls, args):
                fake.args = args
                return cls()

            def __init__(self):
                self.reqs, self.aborted = {}, []

            def add_request(self, rid, prompt, sp):
                assert sp.temperature == 0.0, "the stand-in decodes greedily"
                self.reqs[rid] = (list(prompt["prompt_token_ids"]), [], sp)

            def abort_request(self, rid):
                self.aborted.append(rid)
                self.reqs.pop(rid, None)

            def step(self):
                outs = []
                for rid, (p, gen, sp) in list(self.reqs.items()):
                    with torch.no_grad():
                        logits = fake.model(torch.tensor([p + gen]))[0, -1]
                    ends = getattr(sp, "stop_token_ids", []) + ([] if getattr(sp, "ignore_eos", False) else [fake.eos])
                    if len(gen) < getattr(sp, "min_tokens", 0):
                        logits[ends] = -float("inf")
                    gen.append(int(logits.argmax()))
                    stop = gen[-1] in ends
                    done = stop or len(gen) >= sp.max_tokens
                    if done:
                        del self.reqs[rid]
                    out = types.SimpleNamespace(token_ids=list(gen), finish_reason=("stop" if stop else "length")
                                                if done else None)
                    outs.append(types.SimpleNamespace(request_id=rid, outputs=[out], finished=done))
                return outs

        self.LLMEngine = LLMEngine


def test_vllm_adapter_drives_llmengine_like_native(tmp_path, monkeypatch, byte_tok):
    import sys

    from dhad.checkpoint import save_model
    torch.manual_seed(0)
    model = Transformer(Config.from_name("tiny-llama", vocab_size=byte_tok.vocab_size)).init_weights(seed=0).eval()
    save_model(model, tmp_path, tokenizer=byte_tok)
    free = generate_ids(model, [5, 6, 7], max_new_tokens=8, eos_token_id=())[0]
    eos = free[3]  # the 4th greedy token plays EOS (requests name it; the checkpoint's EOS is another)
    fake = _FakeVLLM(model, model.config.eos_token_id)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    eng = make_engine(tmp_path, byte_tok, engine="vllm", max_batch_size=4, max_queue=2, max_new_tokens_limit=64)
    with eng.start():
        assert fake.args["max_num_seqs"] == 4 and fake.args["model"] == str(tmp_path)
        ps = [[t % byte_tok.vocab_size for t in p] for p in prompts(5, seed=3)]
        hs = [eng.submit(p, max_new_tokens=6 + i, eos_token_id=eos) for i, p in enumerate(ps)]
        native = Engine(model, byte_tok, max_batch_size=4).start()
        try:
            for i, (p, h) in enumerate(zip(ps, hs)):
                got, want = h.result(60), native.generate(p, max_new_tokens=6 + i, eos_token_id=eos, timeout=60)
                assert got.token_ids == want.token_ids and got.text == want.text
                assert got.finish_reason == want.finish_reason
            # min_new_tokens forbids the EOS at step 4, as in the native engine
            got = eng.generate([5, 6, 7], max_new_tokens=8, min_new_tokens=6, eos_token_id=eos, timeout=60)
            want = native.generate([5, 6, 7], max_new_tokens=8, min_new_tokens=6, eos_token_id=eos, timeout=60)
            assert got.token_ids == want.token_ids and eos not in got.token_ids[:6]
        finally:
            native.shutdown()
        # a cancelled stream is aborted in vLLM too
        h = eng.submit([9, 9, 9], max_new_tokens=60, eos_token_id=())
        next(iter(h))
        h.cancel()
        assert h.result(30).finish_reason == "cancelled"
        with pytest.raises(RequestError, match="above this server's limit"):
            eng.submit([1, 2], max_new_tokens=65)
        st = eng.stats()
        assert st["engine"] == "vllm" and st["cancelled"] == 1 and st["completed"] == 6
        # vLLM failing mid-request ends the request with an error instead of hanging the client; the
        # worker thread ends there (the exception used to escape it, after this test had finished)
        fake.model = None
        res = eng.generate([1, 2, 3], max_new_tokens=4, timeout=30)
        assert res.finish_reason == "error" and "engine stopped" in res.error
        eng._thread.join(30)
        assert not eng.running and "TypeError" in eng.stats()["error"]
        with pytest.raises(EngineClosed, match="stopped after an error .TypeError"):
            eng.submit([1, 2], max_new_tokens=2)
    assert not eng._thread.is_alive()


def test_vllm_engine_args_reach_vllm(tmp_path, monkeypatch, byte_tok):
    """`dhad serve --engine vllm --vllm-arg KEY=VALUE`: values read as JSON, passed to vllm.EngineArgs
    with the dtype (the checkpoint's unless given); refused for the native engine."""
    import sys

    from dhad.checkpoint import save_model
    from dhad.cli import CLIError
    from dhad.serve.backend import load_backend
    from dhad.serve.cli import parse_engine_args
    args = parse_engine_args(["tensor_parallel_size=8", "gpu_memory_utilization=0.2", "enforce_eager=true",
                              "kv_cache_dtype=fp8"])
    assert args == {"tensor_parallel_size": 8, "gpu_memory_utilization": 0.2, "enforce_eager": True,
                    "kv_cache_dtype": "fp8"}
    for bad in ("novalue", "=3", "two words=1"):
        with pytest.raises(CLIError, match="KEY=VALUE"):
            parse_engine_args([bad])
    model = Transformer(Config.from_name("tiny-llama", vocab_size=byte_tok.vocab_size)).init_weights(seed=0)
    save_model(model, tmp_path, tokenizer=byte_tok)
    fake = _FakeVLLM(model, model.config.eos_token_id)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    backend = load_backend(tmp_path, engine="vllm", engine_args={"tensor_parallel_size": 2})
    with backend.engine.start():
        assert fake.args["tensor_parallel_size"] == 2 and fake.args["dtype"] == "auto"
    with pytest.raises(ValueError, match="for --engine vllm"):
        load_backend(tmp_path, engine_args={"tensor_parallel_size": 2})
    # a checkpoint without tokenizer files: token ids in and out, vLLM told not to load one
    bare = tmp_path / "bare"
    save_model(model, bare)
    with make_engine(bare, None, engine="vllm") as eng:
        assert fake.args["skip_tokenizer_init"] is True and eng.tokenizer is None
        res = eng.generate([5, 6, 7], max_new_tokens=4, eos_token_id=(), timeout=60)
        assert res.token_ids == generate_ids(model, [5, 6, 7], max_new_tokens=4, eos_token_id=())[0]
        assert res.text == ""


def test_engines_share_a_front_end_without_an_import_cycle():
    """dhad.engine and dhad.vllm_engine both build on dhad.engine_api; the vLLM adapter never imports the
    native engine (which loads the adapter lazily, in make_engine), so the two form no cycle (issue 19)."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "dhad"

    def imports(name: str) -> set[str]:
        tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"))
        out = set()
        for node in ast.walk(tree):  # lazy imports inside functions count too
            if isinstance(node, ast.ImportFrom) and node.module:
                out.add(node.module)
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
        return out

    assert "dhad.engine" not in imports("vllm_engine")
    assert {"dhad.engine", "dhad.vllm_engine"}.isdisjoint(imports("engine_api"))
    assert "dhad.engine_api" in imports("engine") and "dhad.engine_api" in imports("vllm_engine")
    import dhad.engine
    import dhad.engine_api
    import dhad.vllm_engine
    for name in ("RequestHandle", "StreamEvent", "Completion", "EngineError", "QueueFull", "RequestError",
                 "EngineClosed"):  # the public names stay importable from dhad.engine
        assert getattr(dhad.engine, name) is getattr(dhad.engine_api, name)
    assert issubclass(dhad.vllm_engine.VLLMEngine, dhad.engine_api.EngineFrontend)
