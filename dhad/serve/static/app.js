// dhad web chat: streams answers from /v1/chat/completions (SSE), renders Markdown safely and sets
// each message's direction from its content (RTL for Arabic, LTR for English).
//
// Safety: every piece of model or user text is HTML-escaped FIRST; the Markdown renderer then only
// adds its own fixed tags to the escaped text, and links are kept only for http(s)/mailto URLs. No
// innerHTML ever receives unescaped text, so neither the user nor the model can inject HTML.
"use strict";

const RTL_LETTER = /[\u0590-\u08FF\uFB1D-\uFDFF\uFE70-\uFEFF]/;

// Direction of a text by its first strong (letter) character, as the Unicode bidi algorithm's
// "first strong" rule (P2/P3) and dir="auto" do; text with no letters is LTR.
function textDirection(text) {
  const m = /\p{L}/u.exec(text || "");
  return m && RTL_LETTER.test(m[0]) ? "rtl" : "ltr";
}

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
          .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

// Inline Markdown on ALREADY-ESCAPED text: `code`, **bold**, *italic* / _italic_, [text](url).
function renderInline(escaped) {
  const codes = [];
  let s = escaped.replace(/`([^`\n]+)`/g, (_, c) => { codes.push(c); return "\u0000" + (codes.length - 1) + "\u0000"; });
  s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
       .replace(/__([^_\n]+)__/g, "<strong>$1</strong>")
       .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/gu, "$1<em>$2</em>")
       .replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/gu, "$1<em>$2</em>")
       .replace(/\[([^\]\n]+)\]\(([^)\s]+)\)/g, (all, text, url) =>
         /^(https?:\/\/|mailto:)/i.test(url) ? `<a href="${url}" rel="noopener noreferrer nofollow" target="_blank">${text}</a>` : all);
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + codes[+i] + "</code>");
}

// Block Markdown: fenced code, headings, lists, blockquotes, paragraphs. Each block gets dir="auto"
// so a mixed answer lays out each paragraph by its own language.
function renderMarkdown(src) {
  const lines = escapeHtml(src.replace(/\r\n?/g, "\n")).split("\n");
  const out = [];
  let para = [], list = null, fence = null;
  const flushPara = () => { if (para.length) { out.push(`<p dir="auto">${para.map(renderInline).join("<br>")}</p>`); para = []; } };
  const flushList = () => { if (list) { out.push(`<${list.tag}>${list.items.map(i => `<li dir="auto">${renderInline(i)}</li>`).join("")}</${list.tag}>`); list = null; } };
  for (const line of lines) {
    if (fence !== null) {
      if (/^\s*(```|~~~)\s*$/.test(line)) { out.push(`<pre><code>${fence.join("\n")}</code></pre>`); fence = null; }
      else fence.push(line);
      continue;
    }
    let m;
    if (/^\s*(```|~~~)/.test(line)) { flushPara(); flushList(); fence = []; continue; }
    if ((m = /^(#{1,6})\s+(.*)$/.exec(line))) { flushPara(); flushList(); const h = Math.min(6, m[1].length + 2); out.push(`<h${h} dir="auto">${renderInline(m[2])}</h${h}>`); continue; }
    if ((m = /^\s*[-*+]\s+(.*)$/.exec(line)) || (m = /^\s*\d+[.)]\s+(.*)$/.exec(line))) {
      const tag = /^\s*\d/.test(line) ? "ol" : "ul";
      flushPara();
      if (list && list.tag !== tag) flushList();
      if (!list) list = { tag, items: [] };
      list.items.push(m[1]);
      continue;
    }
    if ((m = /^&gt;\s?(.*)$/.exec(line))) { flushPara(); flushList(); out.push(`<blockquote dir="auto">${renderInline(m[1])}</blockquote>`); continue; }
    if (/^\s*$/.test(line)) { flushPara(); flushList(); continue; }
    flushList();
    para.push(line);
  }
  if (fence !== null) out.push(`<pre><code>${fence.join("\n")}</code></pre>`);  // still streaming
  flushPara(); flushList();
  return out.join("");
}

// ---------------------------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);
let history = [];           // [{role, content}] without the system prompt
let controller = null;      // AbortController of the running request

function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "you · أنت" : role === "assistant" ? "dhad · ضاد" : "error · خطأ";
  const body = document.createElement("div");
  body.className = "body";
  el.append(label, body);
  setText(el, text);
  $("messages").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function setText(el, text) {
  el.dataset.text = text;
  el.dir = textDirection(text);
  el.querySelector(".body").innerHTML = renderMarkdown(text);
}

function numberParam(id, parse) {
  const v = $(id).value.trim();
  if (v === "") return undefined;
  const n = parse(v);
  return Number.isFinite(n) ? n : undefined;
}

function buildRequest() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  const model = $("model_pick").value;  // a LoRA adapter or the base model, when the server serves several
  if (model) body.model = model;
  const params = {
    temperature: numberParam("temperature", parseFloat), top_p: numberParam("top_p", parseFloat),
    top_k: numberParam("top_k", (v) => parseInt(v, 10)), max_tokens: numberParam("max_tokens", (v) => parseInt(v, 10)),
    repetition_penalty: numberParam("repetition_penalty", parseFloat), seed: numberParam("seed", (v) => parseInt(v, 10)),
  };
  for (const [k, v] of Object.entries(params)) if (v !== undefined) body[k] = v;
  return body;
}

async function errorText(resp) {
  try {
    const j = await resp.json();
    if (j.error && j.error.message) return j.error.message;
    return JSON.stringify(j);
  } catch (_) { return resp.status + " " + resp.statusText; }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bot = addMessage("assistant", "");
  bot.classList.add("streaming");
  $("send").disabled = true; $("stop").disabled = false;
  controller = new AbortController();
  const headers = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  let answer = "";
  let pending = false;
  const paint = () => { pending = false; setText(bot, answer); bot.scrollIntoView({ block: "end" }); };
  try {
    const resp = await fetch("v1/chat/completions", { method: "POST", headers, body: JSON.stringify(buildRequest()), signal: controller.signal });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buf = "", done = false, usage = null, finish = null;
    while (!done) {
      const r = await reader.read();
      if (r.done) break;
      buf += decoder.decode(r.value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i); buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          for (const c of chunk.choices || []) {
            if (c.delta && c.delta.content) answer += c.delta.content;
            if (c.finish_reason) finish = c.finish_reason;
          }
        }
        if (!pending) { pending = true; requestAnimationFrame(paint); }
      }
    }
    paint();
    history.push({ role: "assistant", content: answer });
    if (usage || finish) {
      const u = document.createElement("span");
      u.className = "usage"; u.dir = "ltr";
      u.textContent = (usage ? `${usage.prompt_tokens} + ${usage.completion_tokens} tokens` : "") + (finish ? ` · ${finish}` : "");
      bot.append(u);
    }
    bot.dataset.finished = finish || "stop";
  } catch (e) {
    if (e.name === "AbortError") {
      paint();
      history.push({ role: "assistant", content: answer });
      bot.dataset.finished = "aborted";
    } else {
      bot.remove();
      history.pop();
      addMessage("error", String(e.message || e));
    }
  } finally {
    bot.classList.remove("streaming");
    $("send").disabled = false; $("stop").disabled = true;
    controller = null;
  }
}

function init() {
  $("api_key").value = sessionStorage.getItem("dhad_api_key") || "";
  $("api_key").addEventListener("change", () => sessionStorage.setItem("dhad_api_key", $("api_key").value));
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  });
  // Enter sends, Shift+Enter is a new line (multi-line messages).
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("reset").addEventListener("click", () => { if (controller) controller.abort(); history = []; $("messages").replaceChildren(); });
  fetch("v1/models").then((r) => r.ok ? r.json() : null).then((j) => {
    if (!j || !j.data || !j.data[0]) return;
    $("model").textContent = j.data[0].id;
    if (j.data.length > 1) {  // the base model and its LoRA adapters: let the user pick one
      const pick = $("model_pick");
      for (const m of j.data) {
        const opt = document.createElement("option");
        opt.value = m.id;
        opt.textContent = m.parent ? m.id + " (LoRA · " + m.parent + ")" : m.id;
        pick.appendChild(opt);
      }
      pick.addEventListener("change", () => { $("model").textContent = pick.value; });
      $("model_row").hidden = false;
    }
  }).catch(() => {});
}

window.dhad = { renderMarkdown, textDirection, escapeHtml };
document.addEventListener("DOMContentLoaded", init);
