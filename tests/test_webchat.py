"""The web chat at `/` in a real headless Chromium (Debian's `chromium`, driven by Playwright).

Sends an Arabic message, watches the answer stream in, checks its direction (RTL) and its safe
Markdown rendering, and saves a screenshot to test-artifacts/webchat.png. The expected answer is
`dhad.generate.generate_text` on the same conversation (greedy), independent of server and page.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from playwright import sync_api   # the `test` extra installs it; the browser is Debian's chromium

import dhad
from dhad.generate import generate_text
from dhad.serve.app import BackgroundServer, create_app
from dhad.engine import Engine
from dhad.serve.backend import Backend

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium); the web chat test needs a real "
                "browser", allow_module_level=True)

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
AR_Q = "كيف أجهز كوب شاهي؟"


def first_strong_direction(text: str) -> str:
    """The Unicode bidi 'first strong character' rule, in Python (independent of the page's JS)."""
    import unicodedata
    for ch in text:
        bidi = unicodedata.bidirectional(ch)
        if bidi in ("R", "AL"):
            return "rtl"
        if bidi == "L":
            return "ltr"
    return "ltr"


@pytest.fixture(scope="module")
def server(demo_dir):
    # 15 ms per forward pass: the pace of a real model (~60 tokens/s), so that the page visibly
    # streams; the tiny model alone answers within a single animation frame.
    model, tok = dhad.load_model(demo_dir), dhad.load_tokenizer(demo_dir)
    model.register_forward_pre_hook(lambda m, a: time.sleep(0.015))
    b = Backend.from_engine(Engine(model, tok), model_dir=demo_dir)
    b.engine.start()
    with BackgroundServer(create_app(b)) as s:
        yield s
    b.engine.shutdown(wait=False)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, server):
    pg = browser.new_page(viewport={"width": 960, "height": 720}, locale="ar")
    requests = []
    pg.on("request", lambda r: requests.append(r))
    pg.requests = requests
    pg.goto(server.url + "/")
    pg.wait_for_function("() => window.dhad !== undefined")
    yield pg
    pg.close()


def chat_bodies(page):
    return [json.loads(r.post_data) for r in page.requests if r.url.endswith("/v1/chat/completions")]


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-finished], .msg.error", timeout=90_000)


def test_arabic_message_streams_an_rtl_answer(page, server, demo_dir):
    model, tok = dhad.load_model(demo_dir), dhad.load_tokenizer(demo_dir)
    expected = generate_text(model, tok, [{"role": "user", "content": AR_Q}], max_new_tokens=100)
    assert first_strong_direction(expected) == "rtl"
    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "100")
    # record every text the answer shows while it streams
    page.evaluate("""() => {
      window.__seen = [];
      new MutationObserver(() => {
        for (const el of document.querySelectorAll('.msg.assistant')) window.__seen.push(el.dataset.text);
      }).observe(document.getElementById('messages'), {subtree: true, childList: true, attributes: true});
    }""")
    send(page, AR_Q)
    user = page.locator(".msg.user").last
    bot = page.locator(".msg.assistant").last
    assert user.get_attribute("dir") == "rtl"
    assert bot.get_attribute("dir") == "rtl"
    assert bot.evaluate("el => getComputedStyle(el).direction") == "rtl"
    assert bot.get_attribute("data-text") == expected
    # streamed: the page showed growing prefixes of the answer before the whole of it
    seen = [t for t in page.evaluate("window.__seen") if t]
    partial = {t for t in seen if t != expected}
    assert partial and all(expected.startswith(t) for t in partial), seen[:5]
    # Markdown: **خمس دقائق** is bold, rendered by the page (not raw asterisks)
    assert "**" in expected
    assert bot.locator(".body strong").first.inner_text() == expected.split("**")[1]
    assert "**" not in bot.locator(".body").inner_text()
    body = chat_bodies(page)[-1]
    assert body["messages"] == [{"role": "user", "content": AR_Q}]
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 100
    # nothing is fetched from anywhere but this server (no CDN)
    assert page.requests and all(r.url.startswith(server.url) for r in page.requests)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webchat.png"), full_page=True)


def test_system_prompt_ltr_and_no_html_injection(page):
    page.click("#settings summary")
    page.fill("#system", "أنت مساعد مفيد.")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "30")
    page.fill("#top_k", "5")
    evil = '<img src=x onerror="window.__pwned=1"> **bold** Hello, who are you?'
    send(page, evil)
    user = page.locator(".msg.user").last
    assert user.get_attribute("dir") == "ltr"
    assert page.locator("#messages img").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert '<img src=x onerror="window.__pwned=1">' in user.inner_text()  # shown as text
    assert user.locator("strong").inner_text() == "bold"
    bot = page.locator(".msg.assistant").last
    assert bot.get_attribute("dir") == first_strong_direction(bot.get_attribute("data-text"))
    body = chat_bodies(page)[-1]
    assert body["messages"] == [{"role": "system", "content": "أنت مساعد مفيد."}, {"role": "user", "content": evil}]
    assert body["top_k"] == 5 and body["max_tokens"] == 30
    # the second turn carries the history; "New chat" clears it
    send_second = "مرحبا، من أنت؟"
    page.fill("#input", send_second)
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-finished]').length == 2",
                           timeout=90_000)
    msgs = chat_bodies(page)[-1]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"] and msgs[-1]["content"] == send_second
    page.click("#reset")
    assert page.locator(".msg").count() == 0


def test_server_errors_are_shown(page):
    page.click("#settings summary")
    page.fill("#max_tokens", "5000")
    send(page, "hello")
    err = page.locator(".msg.error").last
    assert "limit of 4096" in err.inner_text()
    assert page.locator(".msg.assistant").count() == 0


def test_markdown_renderer_is_safe(page):
    render = lambda s: page.evaluate("s => window.dhad.renderMarkdown(s)", s)  # noqa: E731
    assert "<script" not in render("<script>alert(1)</script>")
    assert "&lt;script&gt;" in render("<script>alert(1)</script>")
    assert "<a" not in render("[x](javascript:alert(1))")
    # an attribute-breaking URL stays inside href (quotes are escaped before links are made)
    attrs = page.evaluate("""s => { const d = document.createElement('div');
                                  d.innerHTML = window.dhad.renderMarkdown(s);
                                  const a = d.querySelector('a'); return a ? a.getAttributeNames() : null; }""",
                          '[x](https://example.org/"onmouseover="alert(1))')
    assert attrs is not None and "onmouseover" not in attrs
    assert render("```\n<b>x</b>\n```") == "<pre><code>&lt;b&gt;x&lt;/b&gt;</code></pre>"
    assert render("# عنوان") == '<h3 dir="auto">عنوان</h3>'
    assert render("- a\n- b") == '<ul><li dir="auto">a</li><li dir="auto">b</li></ul>'
    assert render("use `<i>` here") == '<p dir="auto">use <code>&lt;i&gt;</code> here</p>'
    direction = lambda s: page.evaluate("s => window.dhad.textDirection(s)", s)  # noqa: E731
    for s in ("مرحبا hello", "hello مرحبا", "123 مرحبا", "**خمس** دقائق", "", "42"):
        assert direction(s) == first_strong_direction(s), s


def test_page_headers(server):
    import httpx
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx.get(server.url + asset).status_code == 200


def test_model_picker_sends_the_chosen_lora_adapter(browser, demo_dir, tmp_path):
    """With LoRA adapters served, the settings offer the base model and each adapter; the chosen one
    answers (expected: dhad.lora's single-adapter model, independent of the server's batched LoRA)."""
    import copy

    import torch

    from dhad.lora import LoraConfig, apply_lora, load_adapter, lora_layers, save_adapter
    from dhad.serve.backend import load_backend
    base, tok = dhad.load_model(demo_dir), dhad.load_tokenizer(demo_dir)
    m = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets=("q", "k", "v", "o", "up", "down")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(m).values():
            for b in layer.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    adir = save_adapter(m, tmp_path / "tea")
    msgs = [{"role": "user", "content": AR_Q}]
    expected = generate_text(load_adapter(copy.deepcopy(base), adir).eval(), tok, msgs, max_new_tokens=30)
    assert expected != generate_text(base, tok, msgs, max_new_tokens=30)  # the adapter changes the answer
    b = load_backend(demo_dir, adapters={"tea": adir})
    b.engine.start()
    try:
        with BackgroundServer(create_app(b)) as s:
            pg = browser.new_page(viewport={"width": 960, "height": 720}, locale="ar")
            requests = []
            pg.on("request", lambda r: requests.append(r))
            pg.requests = requests
            pg.goto(s.url + "/")
            pg.wait_for_function("() => document.querySelectorAll('#model_pick option').length === 2")
            pg.click("#settings summary")
            assert pg.is_visible("#model_pick")
            pg.select_option("#model_pick", "tea")
            assert pg.inner_text("#model") == "tea"
            pg.fill("#temperature", "0")
            pg.fill("#max_tokens", "30")
            send(pg, AR_Q)
            assert pg.locator(".msg.assistant").last.get_attribute("data-text") == expected
            assert chat_bodies(pg)[-1]["model"] == "tea"
            pg.close()
    finally:
        b.engine.shutdown(wait=False)
