"""`--engine vllm` against a real vLLM: skipped where vLLM is not installed (.venv has none).

`bash scripts/test-vllm.sh` runs it with vLLM's CPU build in a venv of its own (.venv-vllm: vLLM pins
transformers < 5.20, older than the project's); `bash scripts/test.sh` does so after the main suite
when CI=true (CI) or DHAD_TEST_VLLM=1.

The checkpoint is a dhad-built tiny Llama (head_dim 64: vLLM's CPU attention has no kernel for 16)
saved in the Hugging Face layout; vLLM loads it with its own LlamaForCausalLM. Greedy tokens and text
must equal dhad's native engine, through the engine interface and through the HTTP server.
"""
from __future__ import annotations

import os

import pytest
import torch

# scripts/test-vllm.sh sets DHAD_REQUIRE_VLLM: there a missing vLLM is a failure, not a skip
vllm = __import__("vllm") if os.environ.get("DHAD_REQUIRE_VLLM") else pytest.importorskip("vllm")

from dhad.checkpoint import save_model  # noqa: E402
from dhad.config import Config  # noqa: E402
from dhad.engine import Engine, make_engine  # noqa: E402
from dhad.model import Transformer  # noqa: E402
from dhad.tokenizer import train_bpe  # noqa: E402

pytestmark = pytest.mark.timeout(600)

NO_EOS = dict(eos_token_id=())


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    tok = train_bpe(["x"], vocab_size=256 + 3, min_frequency=1)
    torch.manual_seed(0)
    cfg = Config.from_name("tiny-llama", vocab_size=tok.vocab_size, n_embd=128, n_head=2, n_kv_head=1)
    model = Transformer(cfg).init_weights(seed=0).eval()
    d = tmp_path_factory.mktemp("vllm-model")
    save_model(model, d, tokenizer=tok)
    # on the CPU build gpu_memory_utilization is the share of RAM vLLM reserves for its KV cache
    real = make_engine(d, tok, engine="vllm", max_batch_size=4, max_queue=16, max_new_tokens_limit=64,
                       dtype="float32", gpu_memory_utilization=0.1).start()
    native = Engine(model, tok, max_batch_size=4, max_queue=16, max_new_tokens_limit=64).start()
    yield real, native, tok, d
    real.shutdown()
    native.shutdown()


def test_concurrent_greedy_requests_equal_native(engines):
    real, native, tok, _ = engines
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(3, tok.vocab_size, (int(n),), generator=g).tolist() for n in (3, 17, 9, 30, 1, 12)]
    hs = [real.submit(p, max_new_tokens=6 + i, **NO_EOS) for i, p in enumerate(ps)]  # 6 requests, 4 rows
    for i, (p, h) in enumerate(zip(ps, hs)):
        got, want = h.result(300), native.generate(p, max_new_tokens=6 + i, timeout=120, **NO_EOS)
        assert got.token_ids == want.token_ids and got.text == want.text, i
        assert got.finish_reason == want.finish_reason == "length"
    assert real.stats()["vllm_version"] == vllm.__version__


def test_request_eos_min_new_tokens_and_cancel(engines):
    real, native, _, _ = engines
    free = native.generate([5, 6, 7], max_new_tokens=8, timeout=60, **NO_EOS).token_ids
    eos = free[2]  # the 3rd greedy token plays the request's EOS
    got = real.generate([5, 6, 7], max_new_tokens=8, eos_token_id=eos, timeout=300)
    assert got.token_ids == free[:3] and got.finish_reason == "stop"
    got = real.generate([5, 6, 7], max_new_tokens=8, min_new_tokens=5, eos_token_id=eos, timeout=300)
    want = native.generate([5, 6, 7], max_new_tokens=8, min_new_tokens=5, eos_token_id=eos, timeout=60)
    assert got.token_ids == want.token_ids and eos not in got.token_ids[:5]
    before = real.stats()["cancelled"]
    h = real.submit([9, 9, 9], max_new_tokens=60, **NO_EOS)
    next(iter(h))
    h.cancel()
    assert h.result(60).finish_reason == "cancelled"
    assert real.stats()["cancelled"] == before + 1
    assert real.generate([1, 2], max_new_tokens=3, timeout=300, **NO_EOS).finish_reason == "length"  # still serving


def test_server_over_vllm_answers_like_native(engines):
    from fastapi.testclient import TestClient

    from dhad.serve.app import create_app
    from dhad.serve.backend import Backend
    real, native, _, d = engines
    body = {"input_data": {"input_string": [{"role": "user", "content": "hello"}],
                           "parameters": {"do_sample": False, "max_new_tokens": 12}}}
    outs = []
    for eng in (real, native):
        app = create_app(Backend.from_engine(eng, model_name="tiny"), api_key=None, shutdown_engine=False)
        with TestClient(app) as c:
            r = c.post("/score", json=body)
            assert r.status_code == 200, r.text
            chat = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 12, "temperature": 0,
                                                         "messages": [{"role": "user", "content": "hello"}]})
            assert chat.status_code == 200, chat.text
            outs.append((r.json()["output"], chat.json()["choices"][0]["message"]["content"],
                         chat.json()["usage"]))
    assert outs[0] == outs[1]


def test_lora_adapters_mixed_in_one_batch_equal_native(engines, tmp_path):
    """`dhad serve --engine vllm --adapter NAME=DIR`: adapters in PEFT's format (written by dhad.lora) reach
    vLLM's LoRA support; greedy tokens of a mixed batch (two adapters and the base) equal the native
    engine's batched multi-LoRA."""
    import copy

    from dhad.lora import LoraConfig, apply_lora, lora_layers, save_adapter
    from dhad.multi_lora import MultiLoRA
    _, native_base, tok, d = engines
    model = native_base.model
    dirs = {}
    for name, seed, targets in (("a", 1, ("q", "k", "v", "o", "gate", "up", "down")), ("b", 2, ("q", "v"))):
        m = apply_lora(copy.deepcopy(model), LoraConfig(r=4, alpha=8, targets=targets), seed=seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # trained-looking B (PEFT's init has B = 0)
            for layer in lora_layers(m).values():
                for b in layer.lora_B.values():
                    b.copy_(torch.randn(b.shape, generator=g) * 0.2)
        dirs[name] = save_adapter(m, tmp_path / name)
    real = make_engine(d, tok, engine="vllm", max_batch_size=4, max_queue=16, max_new_tokens_limit=64,
                       dtype="float32", gpu_memory_utilization=0.1, adapters=dirs).start()
    own = copy.deepcopy(model)  # hooks go on a copy: the module fixture's native engine stays plain
    native = Engine(own, tok, max_batch_size=4, max_new_tokens_limit=64,
                    adapters=MultiLoRA.from_dirs(own, dirs)).start()
    try:
        g = torch.Generator().manual_seed(2)
        ps = [torch.randint(3, tok.vocab_size, (int(n),), generator=g).tolist() for n in (5, 11, 8, 3)]
        names = ["a", None, "b", "a"]
        hs = [real.submit(p, max_new_tokens=8, adapter=a, **NO_EOS) for p, a in zip(ps, names)]
        got = [h.result(300).token_ids for h in hs]
        want = [native.generate(p, max_new_tokens=8, adapter=a, timeout=120, **NO_EOS).token_ids
                for p, a in zip(ps, names)]
        assert got == want
        plain = native.generate(ps[0], max_new_tokens=8, timeout=120, **NO_EOS).token_ids
        assert plain != want[0]  # the adapter changed the answer
    finally:
        real.shutdown()
        native.shutdown()
