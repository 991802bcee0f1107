"""`dhad speedrun`: build, evaluate and serve a small bilingual chat model with one command.

    dhad speedrun                          # ~15 minutes on a 2-core CPU: runs/speedrun/{final,report.md}
    dhad speedrun --budget 60 --out runs/big
    dhad speedrun --recipe adapted         # the Jais-adapted path: English base + vocabulary extension
    dhad speedrun --ci                     # CI-sized (a minute or two), same stages and artifacts

Stages (each writes `OUT/stages/<name>.json` with its outputs and seconds once it is done):

    plan       choose the model size, batch and precision from measured throughput (bf16 vs fp32)
    tokenizer  bilingual byte-level BPE + an English-only one trained the same way; fertility per
               language (adapted: + the English base extended with the bilingual tokenizer's Arabic tokens)
    data       sample the corpus, clean/filter/dedup/tokenize/shard it (dhad.data.prepare) per language with
               a held-out split; SFT shards (dhad.data.sft: packed, prompt-masked, Jais chat format)
    donor      (adapted) a small bilingual model: its embeddings seed the projected init of new tokens
    pretrain   the trainer (dhad.train.loop) on a Jais-family-style model (ALiBi, SwiGLU, muP) from
               scratch (adapted: a Llama-style English-only base)
    adapt      (adapted) extend + projected init (dhad.adapt), then two stages on Arabic: embeddings only
               (backbone frozen), then everything
    sft        instruction tuning on bilingual instruction data
    dpo        (--dpo) preference alignment on QA preference pairs
    eval       bits per byte on held-out Arabic and English for the untrained, pretrained and final models;
               a few of the cards' benchmarks with a small --limit
    check      ask the final model in Arabic and in English through `dhad serve`'s /score endpoint (greedy)
               and check it answers in the script it was asked in
    report     report.md + PNGs (loss, throughput, eval, fertility) and how to chat with / serve the model

Design choices
- The budget is wall-clock for everything. The plan stage measures training throughput of candidate
  model sizes on this machine (in both fp32 and bf16 autocast; the faster wins) and picks the largest
  size whose token budget still gives `TOKENS_PER_PARAM` tokens per non-embedding parameter (the
  Chinchilla-style trade-off, at the tiny end). Every training stage then re-sizes its step count from
  the time actually left and the throughput actually measured, so a slow machine gets fewer steps, not
  a late finish.
- Resumable: a stage whose marker exists (with the same options) is reused; a training stage that was
  interrupted resumes from the trainer's last checkpoint (Ctrl-C checkpoints after the current step).
  When a stage is (re)computed, every later marker is dropped so nothing stale is reused.
- Held-out bits per byte is tokenizer independent: every model is scored on the same held-out texts
  (decoded from the validation split), bytes counted in UTF-8, special tokens excluded (nanochat's
  convention). That makes the English base, the adapted and the bilingual models comparable.
- SFT examples are rendered so the answer follows exactly the prompt `dhad serve` sends ("...\\n[|AI|]\\n
  ### Response :" — the Jais card's prompt); the tokenizer's own (Jais) chat template, whose history
  turns read "\\n[|AI|] answer", stays in the model directory.
- Only library calls: the trainer, data pipeline, tokenizer, adaptation, evaluation and server are the
  project's own modules; nothing here trains or serves by itself.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Options


class SpeedrunError(ValueError):
    """A speedrun that cannot run as asked (no data, mismatched output directory, ...)."""


class SpeedrunInterrupted(KeyboardInterrupt):
    """A training stage stopped on a signal after checkpointing; running again resumes it."""


RECIPES = ("jais", "adapted")


@dataclass
class SpeedrunConfig:
    data: str | None = None          # data root (corpus/, eval/, preference/); default $DHAD_DATA_DIR
    out: str = "runs/speedrun"
    budget: float = 15.0             # minutes, wall clock, everything included
    recipe: str = "jais"             # jais | adapted
    dpo: bool = False
    ci: bool = False
    device: str = "auto"             # auto | cpu | cuda
    seed: int = 1234
    until: str | None = None         # stop after this stage (its marker is written)
    fresh: bool = False              # forget earlier stage markers in OUT
    progress: bool = True
    # Testing hook: stop the named training stage after this many optimizer steps, as a signal would
    # (the trainer checkpoints and the run ends with SpeedrunInterrupted).
    interrupt_at: tuple[str, int] | None = None

    def key(self) -> dict:
        """The options a stage's result depends on (a marker made with other options is not reused)."""
        return {"recipe": self.recipe, "budget": self.budget, "ci": self.ci, "seed": self.seed,
                "dpo": self.dpo, "data": str(Path(self.data).resolve()) if self.data else None}


def stage_names(recipe: str, dpo: bool) -> list[str]:
    if recipe not in RECIPES:
        raise SpeedrunError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    train = ["pretrain", "sft"] if recipe == "jais" else ["donor", "pretrain", "adapt", "sft"]
    return ["plan", "tokenizer", "data"] + train + (["dpo"] if dpo else []) + ["eval", "check", "report"]


# ---------------------------------------------------------------------------------------------
# Model sizes (Jais-family style: ALiBi, SwiGLU, muP; the adapted path's base is Llama style)

@dataclass(frozen=True)
class Size:
    name: str
    n_embd: int
    n_layer: int
    n_head: int
    vocab: int

    @property
    def n_inner(self) -> int:
        # Jais-family rule (dhad.config): 8/3 * n_embd rounded up to a multiple of 16
        return int(math.ceil(8 * self.n_embd / 3 / 16) * 16)


LADDER = (
    Size("xs", 64, 2, 2, 2048),
    Size("s1", 96, 3, 3, 4096),
    Size("s2", 128, 4, 4, 4096),
    Size("s3", 192, 4, 4, 8192),
    Size("s4", 256, 4, 4, 8192),
    Size("s5", 256, 6, 4, 8192),
    Size("s6", 384, 6, 6, 16384),
    Size("m1", 512, 8, 8, 16384),
    Size("m2", 768, 12, 12, 32768),
    Size("m3", 1024, 16, 16, 32768),
)
CI_SIZE = Size("ci", 64, 2, 2, 1024)
# tokens per non-embedding parameter a size must be able to see in the pretraining budget. Chinchilla's
# compute-optimal ratio is ~20 tokens per (total) parameter; we accept larger, less-trained models (5 per
# non-embedding parameter) because a chat model that must follow the script of a question needs width
# more than the last bit of held-out loss.
# Characters per token of a byte-level BPE of this vocabulary size on the bilingual corpus (measured
# here; used only to size the data sample before the tokenizer exists).
CHARS_PER_TOKEN = {1024: 2.0, 2048: 2.4, 4096: 2.8, 8192: 3.2, 16384: 3.5, 32768: 3.8}
TOKENS_PER_PARAM = 5.0
JAIS_MUP_ALPHA = 1.09518349815769


def model_overrides(size: Size, arch: str, block_size: int, vocab: int | None = None) -> tuple[str, dict]:
    """(preset, overrides) for the trainer's `model:` section."""
    v = int(vocab or size.vocab)
    common = dict(vocab_size=v, n_embd=size.n_embd, n_layer=size.n_layer, n_head=size.n_head,
                  n_inner=size.n_inner, block_size=block_size)
    if arch == "jais":
        width = 256 / size.n_embd  # Jais-family muP: width scale = 256 / n_embd (dhad.config)
        return "small-jais", dict(common, logits_scale=JAIS_MUP_ALPHA * width, mup_width_scale=width)
    # Llama layout (Jais-adapted's base); our byte-level BPE has <|endoftext|> = 0 as bos/eos/pad
    return "small-llama", dict(common, n_kv_head=size.n_head, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def size_params(size: Size, arch: str = "jais") -> tuple[int, int]:
    """(non-embedding, total) parameters."""
    from dhad.config import Config
    preset, ov = model_overrides(size, arch, 512)
    cfg = Config.from_name(preset, **ov)
    return cfg.num_params(include_embeddings=False), cfg.num_params()


def flops_per_token(size: Size, seq_len: int, arch: str = "jais") -> float:
    from dhad.config import Config
    preset, ov = model_overrides(size, arch, max(seq_len, 512))
    return Config.from_name(preset, **ov).flops_per_token(seq_len)


def choose_size(tps_of, train_seconds: float, ladder=LADDER, ratio: float = TOKENS_PER_PARAM,
                max_size: str | None = None) -> tuple[Size, dict]:
    """Walk the ladder upwards while the measured throughput gives at least `ratio` tokens per
    non-embedding parameter in `train_seconds`; return the last size that does (at least the first)
    and what was measured. `tps_of(size) -> tokens/s` (the probe; a pure function in tests)."""
    chosen, seen = ladder[0], {}
    for s in ladder:
        tps = float(tps_of(s))
        n, _ = size_params(s)
        tokens = tps * train_seconds
        seen[s.name] = {"tokens_per_s": tps, "tokens": tokens, "nonemb_params": n, "tokens_per_param": tokens / n}
        if tokens >= ratio * n:
            chosen = s
        else:
            break
        if max_size is not None and s.name == max_size:
            break
    return chosen, seen


# ---------------------------------------------------------------------------------------------
# Throughput probe

def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_train_tps(size: Size, arch: str, seq_len: int, batch: int, precision: str, device,
                      steps: int = 2, warmup: int = 1, seed: int = 0) -> float:
    """Training tokens/s of one forward + backward + AdamW step on random tokens (no data, no loop:
    a probe to size the run, not a trainer)."""
    import torch
    import torch.nn.functional as F

    from dhad.config import Config
    from dhad.model import Transformer
    preset, ov = model_overrides(size, arch, max(seq_len, 512))
    cfg = Config.from_name(preset, **ov)
    model = Transformer(cfg).init_weights(seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g).to(device)
    ac = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with ac():
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    return batch * seq_len / (sum(timed) / len(timed))


def pick_device(device: str):
    import torch
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SpeedrunError("--device cuda: no CUDA device is available")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------
# Corpus sampling

def _chunks(text: str, max_chars: int) -> list[str]:
    """Split a long document at line breaks (else at spaces) into pieces of at most `max_chars`."""
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    out, cur = [], ""
    for line in text.split("\n"):
        while len(line) > max_chars:  # one very long line: cut at the last space before the limit
            cut = line.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            if cur:
                out.append(cur)
                cur = ""
            out.append(line[:cut])
            line = line[cut:].lstrip()
        if cur and len(cur) + 1 + len(line) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n{line}" if cur else line
    if cur.strip():
        out.append(cur)
    return [c.strip() for c in out if c.strip()]


def file_documents(path: Path, max_chars: int = 4000, group_chars: int = 1500) -> list[str]:
    """Documents of a corpus file: `.jsonl` rows' `text`; `.txt` consecutive lines grouped into
    paragraphs of about `group_chars` (one-line-per-verse poetry and plays become readable documents).
    Long documents (books) are cut into pieces of at most `max_chars` at line breaks."""
    docs: list[str] = []
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # counted by the data pipeline's reader when it matters; a sample can skip it
                t = row.get("text") if isinstance(row, dict) else None
                if isinstance(t, str) and t.strip():
                    docs.extend(_chunks(t, max_chars))
    else:
        cur: list[str] = []
        size = 0
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.rstrip("\n")
                if not line.strip():
                    if size >= group_chars // 3 and cur:
                        docs.append("\n".join(cur))
                        cur, size = [], 0
                    continue
                cur.append(line)
                size += len(line) + 1
                if size >= group_chars:
                    docs.append("\n".join(cur))
                    cur, size = [], 0
        if cur:
            docs.append("\n".join(cur))
        docs = [c for d in docs for c in _chunks(d, max_chars)]
    return docs


def water_fill(sizes: dict[str, int], budget: int) -> dict[str, int]:
    """Split `budget` equally over files; a file smaller than its share gives the rest to the others."""
    quota = {k: 0 for k in sizes}
    left = dict(sizes)
    remaining = budget
    while left and remaining > 0:
        share = remaining / len(left)
        small = {k: v for k, v in left.items() if v <= share}
        if not small:
            for k in left:
                quota[k] += int(share)
            break
        for k, v in small.items():
            quota[k] += v
            remaining -= v
            del left[k]
    return quota


def corpus_files(data: Path, lang: str) -> list[Path]:
    d = data / "corpus" / lang
    if not d.is_dir():
        raise SpeedrunError(f"no {lang} corpus: {d} is not a directory (--data must hold corpus/{lang}/)")
    files = sorted(p for p in d.iterdir() if p.suffix in (".jsonl", ".txt") and p.is_file())
    if not files:
        raise SpeedrunError(f"no .jsonl or .txt files in {d}")
    return files


def sample_corpus(files: list[Path], out_dir: Path, chars: int, heldout_chars: int, seed: int) -> dict:
    """Sample about `chars` characters of documents from `files` (equal shares, water-filled) into
    `out_dir/train.jsonl`, and up to `heldout_chars` of other documents into `out_dir/heldout.jsonl`
    (never used to train the tokenizer: fertility is measured on them). Returns per-file counts."""
    rng = random.Random(seed)
    docs = {p.name: file_documents(p) for p in files}
    sizes = {k: sum(len(d) for d in v) for k, v in docs.items()}
    quota = water_fill(sizes, chars)
    held_quota = water_fill(sizes, heldout_chars)
    train, held, stats = [], [], {}
    for name, ds in docs.items():
        order = list(range(len(ds)))
        rng.shuffle(order)
        got_h = got_t = 0
        for i in order:
            d = ds[i]
            if got_h < held_quota[name] and len(ds) > 1:
                held.append(d)
                got_h += len(d)
            elif got_t < quota[name]:
                train.append(d)
                got_t += len(d)
            elif got_h >= held_quota[name]:
                break
        stats[name] = {"available_chars": sizes[name], "train_chars": got_t, "heldout_chars": got_h}
    out_dir.mkdir(parents=True, exist_ok=True)
    for fname, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        _write_text(out_dir / fname, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows))
    return stats


def read_texts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Bits per byte (tokenizer independent)

def bits_per_byte(model, tok, texts: list[str], seq_len: int, batch_size: int = 8, device=None) -> dict:
    """Held-out bits per UTF-8 byte of `texts` under `model`: the texts are encoded with `tok`, each
    followed by EOS, concatenated and cut into non-overlapping windows of `seq_len` + 1 (every token
    is predicted once; the first token of each window has no target). Targets that are special tokens
    (EOS) have no bytes and are left out of both sums (nanochat's convention)."""
    import torch
    import torch.nn.functional as F

    device = device or model.device
    eos = tok.eos_token_id
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc)
        ids.append(eos)
    nbytes = torch.zeros(max(tok.vocab_size, model.config.vocab_size), dtype=torch.float64)
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i)
        nbytes[i] = len(b) if b is not None else 0
    stream = torch.tensor(ids, dtype=torch.long)
    windows = [stream[s:s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    nll = 0.0
    total_bytes = 0.0
    n_tokens = 0
    model.eval()
    with torch.inference_mode():
        for k in range(0, len(windows), batch_size):
            group = windows[k:k + batch_size]
            T = max(len(w) for w in group) - 1
            x = torch.full((len(group), T), eos, dtype=torch.long)
            y = torch.full((len(group), T), -100, dtype=torch.long)
            for r, w in enumerate(group):
                x[r, :len(w) - 1] = w[:-1]
                y[r, :len(w) - 1] = w[1:]
            logits = model(x.to(device)).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                                   ignore_index=-100, reduction="none").reshape(y.shape).double().cpu()
            tb = nbytes[y.clamp(min=0)] * (y != -100)
            counted = tb > 0
            nll += float(loss[counted].sum())
            total_bytes += float(tb.sum())
            n_tokens += int(counted.sum())
    return {"bpb": nll / math.log(2) / max(total_bytes, 1.0), "bytes": int(total_bytes), "tokens": n_tokens,
            "nats_per_token": nll / max(n_tokens, 1)}


# ---------------------------------------------------------------------------------------------
# Script check through the server

QUESTIONS = (
    ("ar", "ما هي عاصمة الإمارات العربية المتحدة؟"),
    ("ar", "اكتب قصة قصيرة عن قطة صغيرة."),
    ("en", "What is the capital of the United Arab Emirates?"),
    ("en", "Write a short story about a small cat."),
)


def script_of(text: str) -> str:
    """"ar" when Arabic letters outnumber Latin ones, "en" for the reverse, "none" without letters."""
    from dhad.tokenizer import is_arabic_char
    ar = sum(1 for c in text if c.isalpha() and is_arabic_char(c))
    la = sum(1 for c in text if c.isalpha() and c.isascii())
    if ar == la == 0:
        return "none"
    return "ar" if ar > la else "en"


def check_scripts(model_dir: str | Path, questions=QUESTIONS, max_new_tokens: int = 48) -> dict:
    """Ask the model through `dhad serve`'s /score endpoint (the ALLaM card's schema), greedy, and check
    that every answer is written in the script of its question.

    As the Jais card does (`prompt_ar` / `prompt_eng`), an Arabic question carries the card's Arabic
    instruction as the system message and an English one the default instruction; that is the pass
    criterion. The same questions without the Arabic instruction (the English default for both) are
    asked too and reported. Decoding is greedy with a minimum of 4 new tokens (the card's
    `min_length=input_len + 4`). Not the card's repetition_penalty 1.2: transformers applies it to the
    prompt's tokens too, which pushes a small model off the commonest words of its own language (the
    Arabic instruction is full of "في")."""
    from fastapi.testclient import TestClient

    from dhad.serve.app import create_app
    params = {"do_sample": False, "max_new_tokens": max_new_tokens, "min_new_tokens": 4}
    app = create_app(str(model_dir), max_batch_size=len(questions))
    variants = {"card": [], "default_system": []}
    with TestClient(app) as client:
        for variant, rows in variants.items():
            for lang, q in questions:
                msgs = [{"role": "user", "content": q}]
                system = card_system("arabic" if lang == "ar" else "english") if variant == "card" else None
                if system:
                    msgs.insert(0, {"role": "system", "content": system})
                body = {"input_data": {"input_string": msgs, "parameters": params}}
                r = client.post("/score", json=body)
                if r.status_code != 200:
                    raise SpeedrunError(f"/score answered {r.status_code}: {r.text[:300]}")
                out = r.json()["output"]
                got = script_of(out)
                rows.append({"lang": lang, "question": q, "system": system, "answer": out, "script": got,
                             "ok": got == lang})
    return {"passed": all(r["ok"] for r in variants["card"]), "answers": variants["card"],
            "default_system": {"passed": all(r["ok"] for r in variants["default_system"]),
                               "answers": variants["default_system"]},
            "endpoint": "/score", "parameters": params}


# ---------------------------------------------------------------------------------------------
# Small helpers

def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _write_json(path: Path, obj) -> Path:
    return _write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _copy_model_dir(src: Path, dst: Path) -> Path:
    """Copy a model directory atomically (a half-copied OUT/final never exists)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
    return dst


def resolve_data(data: str | None) -> Path:
    d = data or os.environ.get("DHAD_DATA_DIR")
    if not d:
        raise SpeedrunError("no data: pass --data DIR (holding corpus/arabic, corpus/english, corpus/instruct and "
                            "eval/) or set $DHAD_DATA_DIR; scripts/speedrun.sh uses ../shared/data")
    p = Path(d).expanduser()
    if not (p / "corpus").is_dir():
        raise SpeedrunError(f"--data {p}: no corpus/ directory in it (expected corpus/arabic, corpus/english, "
                            "corpus/instruct)")
    return p


def _proc_start_time() -> float | None:
    """Wall-clock time this process started (Linux /proc), to count interpreter start and imports too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except Exception:  # noqa: BLE001 - not Linux: count from run() instead
        return None


# ---------------------------------------------------------------------------------------------
# The run

SFT_FILES = {  # the bilingual instruction data the README names (corpus/instruct)
    "arabic": ["arastories_msa.jsonl", "xquad_ar_qa.jsonl", "arcd_qa.jsonl", "arastories_egyptian.jsonl",
               "arastories_moroccan.jsonl"],
    "english": ["alpaca_en_demo_1k.jsonl", "selfinstruct_seed_tasks_en.jsonl",
                "selfinstruct_user_oriented_en.jsonl"],
}
PREF_FILES = {"arabic": ["derived/xquad_qa_pairs_ar.jsonl", "derived/arcd_qa_pairs_ar.jsonl"],
              "english": ["derived/xquad_qa_pairs_en.jsonl"]}
BENCH_TASKS = ("arabicmmlu", "acva", "hellaswag", "piqa")
LANGS = ("arabic", "english")
SCRIPT = {"arabic": "arabic", "english": "latin"}

# Shares of the training time (the rest of the budget: tokenizer, data, evaluation, report)
TRAIN_WEIGHTS = {"jais": {"pretrain": 0.50, "sft": 0.16, "dpo": 0.06},
                 "adapted": {"donor": 0.08, "pretrain": 0.28, "adapt": 0.20, "sft": 0.12, "dpo": 0.05}}
POST_RESERVE = 0.06  # of the budget, kept for eval + check + report (measured: 2-3% at the default size)


class Run:
    """One speedrun: options, paths, the plan, and the stage bookkeeping."""

    def __init__(self, cfg: SpeedrunConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.data = resolve_data(cfg.data)
        self.stages = stage_names(cfg.recipe, cfg.dpo)
        if cfg.until is not None and cfg.until not in self.stages:
            raise SpeedrunError(f"--until {cfg.until}: not a stage of this recipe ({', '.join(self.stages)})")
        if cfg.budget <= 0:
            raise SpeedrunError(f"--budget must be > 0 minutes, got {cfg.budget}")
        self.budget_s = 60.0 * cfg.budget
        # what the stages may use: the budget less the interpreter's start, imports and exit around them
        self.work_s = self.budget_s - max(15.0, 0.02 * self.budget_s)
        self.t0 = time.perf_counter()
        self.wall0 = time.time()
        self.reused_s = 0.0  # seconds of stages done by earlier invocations
        self.plan: dict = {}
        self.computed: list[str] = []  # stages computed (not reused) by this invocation, in order
        self.log_lines: list[str] = []

    # -- paths ---------------------------------------------------------------------------------
    def p(self, *parts) -> Path:
        return self.out.joinpath(*parts)

    def marker_path(self, name: str) -> Path:
        return self.p("stages", f"{self.stages.index(name) + 1:02d}-{name}.json")

    def marker(self, name: str) -> dict | None:
        f = self.marker_path(name)
        return _read_json(f) if f.is_file() else None

    # -- time ----------------------------------------------------------------------------------
    def spent(self) -> float:
        return time.perf_counter() - self.t0 + self.reused_s

    def stage_seconds(self, name: str) -> float:
        """Seconds this training stage may take: its share of what is left after the post-training reserve."""
        w = TRAIN_WEIGHTS[self.cfg.recipe]
        todo = [s for s in self.stages[self.stages.index(name):] if s in w]
        left = self.work_s - self.budget_s * POST_RESERVE - self.spent()
        return max(0.0, left) * w[name] / sum(w[s] for s in todo)

    def say(self, msg: str) -> None:
        line = f"[speedrun {time.perf_counter() - self.t0:6.1f}s] {msg}"
        self.log_lines.append(line)
        print(line, flush=True)

    @property
    def device(self):
        return pick_device(self.cfg.device)


def run_speedrun(cfg: SpeedrunConfig) -> dict:
    """Run (or resume) every stage; returns {"out", "stages": {name: marker}, "final", "check"}."""
    run = Run(cfg)
    run.out.mkdir(parents=True, exist_ok=True)
    key = cfg.key()
    if cfg.fresh:
        shutil.rmtree(run.p("stages"), ignore_errors=True)
        shutil.rmtree(run.p("recipes"), ignore_errors=True)
    # a marker made with other options means OUT is another run: refuse rather than mix them
    for f in sorted(run.p("stages").glob("*.json")) if run.p("stages").is_dir() else []:
        m = _read_json(f)
        if m.get("key") != key:
            diff = {k: (m.get("key", {}).get(k), v) for k, v in key.items() if m.get("key", {}).get(k) != v}
            raise SpeedrunError(f"{run.out} holds a speedrun made with other options ({diff}): pass --fresh to "
                                "start over there, or choose another --out")
    markers: dict[str, dict] = {}
    redo = False
    for i, name in enumerate(run.stages):
        m = None if redo else run.marker(name)
        if m is not None and m.get("status") == "done":
            markers[name] = m
            run.reused_s += float(m.get("seconds", 0.0))
            if name == "plan":
                run.plan = _read_json(run.p("plan.json"))
                _apply_threads(run.plan)
            run.say(f"stage {i + 1}/{len(run.stages)} {name}: done earlier ({m['seconds']:.1f}s), reused")
        else:
            if not redo:  # from here on everything is recomputed: later markers would be stale
                for later in run.stages[i:]:
                    run.marker_path(later).unlink(missing_ok=True)
                redo = True
            run.say(f"stage {i + 1}/{len(run.stages)} {name}: running")
            t = time.perf_counter()
            outputs = STAGES[name](run, markers)
            run.computed.append(name)
            dt = time.perf_counter() - t
            m = {"stage": name, "status": "done", "seconds": dt, "finished": time.time(), "key": key,
                 "outputs": outputs}
            _write_json(run.marker_path(name), m)
            markers[name] = m
            run.say(f"stage {i + 1}/{len(run.stages)} {name}: done in {dt:.1f}s")
        if cfg.until == name:
            run.say(f"stopped after stage {name} (--until); run again without --until to continue")
            break
    done = "report" in markers
    if done:
        final = run.p("final")
        print(f"\nreport: {run.p('report.md')}\nchat:   dhad chat --model {final}\nserve:  dhad serve --model {final}"
              f"   (POST /score, OpenAI API at /v1, web chat at /)", flush=True)
    return {"out": str(run.out), "stages": markers, "final": str(run.p("final")) if done else None,
            "check": markers.get("check", {}).get("outputs"), "wall_s": time.perf_counter() - run.t0}


# ---------------------------------------------------------------------------------------------
# Stages

def stage_plan(run: Run, markers: dict) -> dict:
    import torch

    from dhad.train.metrics import measure_peak_flops
    cfg = run.cfg
    dev = run.device
    arch = "jais" if cfg.recipe == "jais" else "llama"
    w = TRAIN_WEIGHTS[cfg.recipe]
    # time the pretraining stage will get if plan + tokenizer + data take ~12% of the budget (measured: 9%)
    pre_share = w["pretrain"] / sum(v for k, v in w.items() if k != "dpo" or cfg.dpo)
    train_s = run.budget_s * (1 - POST_RESERVE - 0.12)
    t_pre = train_s * pre_share
    measured: dict = {}
    if cfg.ci:
        size, seq_pre, seq_sft, probe_batch = CI_SIZE, 128, 384, 4
    else:
        seq_pre, seq_sft, probe_batch = 512, 512, 8 if dev.type == "cpu" else 32
        size = None

    precisions = ("fp32", "bf16") if (dev.type == "cuda" or _cpu_has_bf16()) else ("fp32",)
    steps = 1 if cfg.ci else 2
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # Threads: on a machine shared with other jobs, OpenMP threads that wait for each other can be
        # slower than one thread; measure both on a small size and keep the faster for the whole run.
        probe_size = size or LADDER[0]
        by_threads, results = {}, {}
        for n in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(n)
            results[n] = {prec: measure_train_tps(probe_size, arch, seq_pre, probe_batch, prec, dev, steps=steps)
                          for prec in precisions}
            by_threads[n] = max(results[n].values())
        threads = max(by_threads, key=by_threads.get)
        torch.set_num_threads(threads)
        measured["threads"] = {str(k): v for k, v in by_threads.items()}
        measured["probes"] = {probe_size.name: results[threads]}
        run.say("  threads: " + ", ".join(f"{k}: {v:,.0f} tok/s" for k, v in by_threads.items())
                + f" ({probe_size.name}) -> {threads}")

    def probe(s: Size) -> float:
        if s.name not in measured.get("probes", {}):
            res = {prec: measure_train_tps(s, arch, seq_pre, probe_batch, prec, dev, steps=steps)
                   for prec in precisions}
            measured.setdefault("probes", {})[s.name] = res
        res = measured["probes"][s.name]
        run.say(f"  probe {s.name} (n_embd {s.n_embd}, {s.n_layer} layers, vocab {s.vocab}): "
                + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in res.items()))
        return max(res.values())

    if cfg.ci:
        probe(size)
        ladder_seen = {}
    else:
        size, ladder_seen = choose_size(probe, t_pre, max_size="s6" if dev.type == "cpu" else None)
    probes = measured["probes"][size.name]
    precision = max(probes, key=probes.get)
    tps = probes[precision]
    peak = measure_peak_flops(dev, torch.bfloat16 if precision == "bf16" else torch.float32,
                              n=512 if cfg.ci else 1024, seconds=0.1 if cfg.ci else 0.3)
    if cfg.ci:
        pre_tokens, chars_per_lang, tok_chars, held_chars, bench_limit = 250 * 8 * 128, 300_000, 150_000, 6_000, 2
    else:
        pre_tokens = tps * t_pre
        # text for ~0.6 of the planned pretraining tokens (the model sees it ~1.7 times: repeating a small
        # sample costs a tiny model little, and preparing data is time the model does not train)
        cpt = CHARS_PER_TOKEN.get(size.vocab, 3.0)
        chars_per_lang = int(min(max(0.6 * pre_tokens / 2 * cpt, 300_000), 8_000_000))
        tok_chars = int(min(chars_per_lang, 2_000_000))
        held_chars = int(min(max(tps * run.budget_s * 0.003 * 3.5, 20_000), 80_000))
        # per task *and subtask* (ACVA has 58 topics, ArabicMMLU ~40 subjects): keep it small
        bench_limit = int(min(max(tps * run.budget_s / 500_000, 3), 20))
    sft_share = w["sft"] / sum(v for k, v in w.items() if k != "dpo" or cfg.dpo)
    # SFT rows per language: what the SFT time can train on (rows are ~90% full), with 30% to spare
    sft_rows = 200 if cfg.ci else int(max(train_s * sft_share * tps / seq_sft / 2 * 1.3, 300))
    plan = {
        "device": str(dev), "arch": arch, "size": asdict(size), "n_inner": size.n_inner,
        "params": dict(zip(("nonemb", "total"), size_params(size, arch))),
        "precision": precision, "probe_tokens_per_s": probes, "ladder": ladder_seen,
        "tokens_per_s": tps, "peak_flops": peak, "threads": threads, "threads_probe": measured.get("threads"), "seq_len_pretrain": seq_pre, "seq_len_sft": seq_sft,
        "block_size": 2 * max(seq_pre, seq_sft), "pretrain_seconds_planned": t_pre,
        "pretrain_tokens_planned": pre_tokens, "sample_chars_per_lang": chars_per_lang,
        "tokenizer_chars_per_lang": tok_chars, "heldout_chars_per_lang": held_chars, "bench_limit": bench_limit,
        "sft_rows_per_lang": sft_rows,
        "bench_tasks": list(BENCH_TASKS), "budget_s": run.budget_s, "ci": cfg.ci,
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    _write_json(run.p("plan.json"), plan)
    run.plan = plan
    run.say(f"  plan: {size.name} ({plan['params']['total'] / 1e6:.2f}M params), {precision}, "
            f"{tps:,.0f} tok/s measured, ~{pre_tokens / 1e6:.2f}M pretraining tokens")
    return {"plan": str(run.p("plan.json"))}


def _apply_threads(plan: dict) -> None:
    if plan.get("threads") and str(plan.get("device", "cpu")).startswith("cpu"):
        import torch
        torch.set_num_threads(int(plan["threads"]))


def _cpu_has_bf16() -> bool:
    """bf16 autocast is worth measuring on CPUs with native bf16 dot products (AVX-512 BF16 / AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def stage_tokenizer(run: Run, markers: dict) -> dict:
    from dhad.tokenizer import Source, plot_stats, token_stats, train_tokenizer
    plan, cfg = run.plan, run.cfg
    V = plan["size"]["vocab"]
    # sample the corpus once: the tokenizer trains on part of it, the data stage prepares all of it
    sample = {}
    for lang in LANGS:
        sample[lang] = sample_corpus(corpus_files(run.data, lang), run.p("data", "sample", lang),
                                     plan["sample_chars_per_lang"], max(plan["heldout_chars_per_lang"], 20_000),
                                     cfg.seed)
    srcs = {lang: Source(lang, [run.p("data", "sample", lang, "train.jsonl")], 1.0, "text") for lang in LANGS}
    total = 2 * plan["tokenizer_chars_per_lang"]
    run.say(f"  training BPE tokenizers (vocab {V}) on {total / 1e6:.1f}M characters each")
    bi = train_tokenizer([srcs["arabic"], srcs["english"]], V, total_chars=total, seed=cfg.seed)
    en = train_tokenizer([srcs["english"]], V, total_chars=total, seed=cfg.seed)
    bi.save(run.p("tokenizer"))
    en.save(run.p("tokenizer-en"))
    held = {lang: read_texts(run.p("data", "sample", lang, "heldout.jsonl")) for lang in LANGS}
    rows = []
    toks = {"bilingual": bi, "english-only": en}
    ext_report = None
    if cfg.recipe == "adapted":
        from dhad.tokenizer import extend_tokenizer
        arabic_train = read_texts(run.p("data", "sample", "arabic", "train.jsonl"))[:2000]
        ext, rep = extend_tokenizer(en, bi, V, by="frequency", corpus=arabic_train)
        ext.save(run.p("tokenizer-ext"))
        ext_report = rep.as_dict()
        toks["english+arabic (extended)"] = ext
        run.say(f"  extended the English tokenizer with {rep.added} Arabic tokens of the bilingual one "
                f"({rep.base_vocab} -> {rep.new_vocab})")
    for name, tok in toks.items():
        for lang in LANGS:
            st = token_stats(tok, held[lang], name=name, lang=lang)
            rows.append(st)
    plot_stats(rows, run.p("fertility.png"))
    fert = [dict(r.as_dict(), vocab_size=toks[r.tokenizer].vocab_size) for r in rows]
    _write_json(run.p("tokenizer", "fertility.json"), {"rows": fert, "extension": ext_report, "sample": sample})
    for r in fert:
        run.say(f"  {r['tokenizer']:<28} {r['lang']:<8} {r['fertility']:.3f} tokens/word")
    return {"tokenizer": str(run.p("tokenizer")), "tokenizer_en": str(run.p("tokenizer-en")),
            "fertility": fert, "extension": ext_report}


def _prepare_lang(run: Run, lang: str, tok_dir: Path, out: Path, val_fraction: float) -> dict:
    from dhad.data.filters import FilterConfig
    from dhad.data.prepare import PrepareConfig, prepare
    pc = PrepareConfig(inputs=[f"{lang}={run.p('data', 'sample', lang)}"], tokenizer=str(tok_dir), out=str(out),
                       val_fraction=val_fraction, seed=run.cfg.seed, workers=min(2, os.cpu_count() or 1),
                       filters=FilterConfig(scripts={lang: SCRIPT[lang]}), progress=run.cfg.progress)
    return prepare(pc)


def _heldout_texts(run: Run, lang: str, shard_dir: Path, tok_dir: Path) -> list[str]:
    """Held-out documents (the validation split), decoded back to text, up to the plan's characters."""
    from dhad.data.shards import ShardSet
    from dhad.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir)
    ss = ShardSet.open(shard_dir, "validation")
    out, n = [], 0
    for i in range(ss.n_docs):
        ids = [int(t) for t in ss.doc(i)]
        if ids and ids[-1] == ss.meta["eos_token_id"]:
            ids = ids[:-1]
        t = tok.decode(ids)
        out.append(t)
        n += len(t)
        if n >= run.plan["heldout_chars_per_lang"]:
            break
    if not out:
        raise SpeedrunError(f"{shard_dir}: the validation split is empty; give the run more data or budget")
    return out


def answer_starts_with_digit(line: str) -> bool:
    """True for an instruction row whose answer (`output`) opens with a digit ("1. First, ...", "1958")."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return False  # the SFT reader counts it
    out = row.get("output") if isinstance(row, dict) else None
    return isinstance(out, str) and out.strip()[:1].isdigit()


def sample_rows(files: list[Path], n: int, seed: int) -> tuple[list[str], int]:
    """Up to `n` JSONL rows (raw lines) drawn uniformly from all `files` together, leaving out rows whose
    answer starts with a digit; returns (rows, number left out).

    Why leave those out: greedy decoding takes the single likeliest first token, and a model this small
    learns little more than the first-token distribution of its SFT answers. Our byte-level BPE splits
    digits, so " " + digit is *one* token for every numbered list and numeric answer (~10% of Alpaca's
    answers); it outweighs any single word and the model answers "1. 1. 10000." in either language."""
    lines = [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    kept, skipped = [], 0
    for line in lines:
        if len(kept) >= n:
            break
        if answer_starts_with_digit(line):
            skipped += 1
        else:
            kept.append(line)
    return kept, skipped


def card_system(lang: str) -> str | None:
    """The system instruction the Jais card's prompt uses for questions in `lang`: its Arabic prompt
    (`prompt_ar`) carries the instruction in Arabic; English uses the template's default instruction."""
    if lang != "arabic":
        return None
    from dhad.prompts import JAIS_PROMPT_AR
    head = JAIS_PROMPT_AR.split("### Instruction:", 1)[-1]
    system = head.split(" أكمل المحادثة", 1)[0].strip()
    if not system or "[|Human|]" in system:
        raise SpeedrunError("cannot find the system instruction in the card's Arabic prompt")
    return system


def _prepare_sft(run: Run, lang: str, tok_dir: Path, out: Path) -> dict:
    from dhad.data.sft import SFTConfig, prepare_sft
    files = SFT_FILES[lang]
    inst = run.data / "corpus" / "instruct"
    found = [inst / f for f in files if (inst / f).is_file()]
    if not found:
        raise SpeedrunError(f"no {lang} instruction data in {inst} (expected {', '.join(files)})")
    # a uniform sample of the rows the SFT time can use (rendering + encoding every row costs time too)
    sample = run.p("data", "sft_sample", f"{lang}.jsonl")
    rows, n_digit = sample_rows(found, run.plan["sft_rows_per_lang"], run.cfg.seed)
    _write_text(sample, "\n".join(rows) + "\n")
    sc = SFTConfig(inputs=[f"{lang}={sample}"], tokenizer=str(tok_dir), out=str(out),
                   chat_format="jais", seq_len=run.plan["seq_len_sft"], packed=True, overflow="truncate",
                   val_fraction=0.03, seed=run.cfg.seed, system=card_system(lang), progress=run.cfg.progress,
                   answer_as_served=True)  # the answer after "\n[|AI|]\n### Response :", as `dhad serve` sends
    rep = prepare_sft(sc)
    rep["digit_start_left_out"] = n_digit
    return rep


def stage_data(run: Run, markers: dict) -> dict:
    from dhad.data.prepare import format_report
    from dhad.data.sft import format_sft_report
    plan = run.plan
    adapted = run.cfg.recipe == "adapted"
    sample_chars = {lang: sum(len(t) for t in read_texts(run.p("data", "sample", lang, "train.jsonl")))
                    for lang in LANGS}
    reports, held = {}, {}
    # pretraining shards: bilingual tokenizer (jais); adapted: English with the base tokenizer, Arabic with
    # the extended one (the English base never sees Arabic; adaptation never needs base-tokenized Arabic)
    jobs = [("arabic", "tokenizer-ext" if adapted else "tokenizer"), ("english", "tokenizer-en" if adapted else "tokenizer")]
    if adapted:
        jobs.append(("arabic-bi", "tokenizer"))  # the donor's Arabic (bilingual tokenizer)
        jobs.append(("english-bi", "tokenizer"))
    for name, tok in jobs:
        lang = name.split("-")[0]
        vf = min(max(1.5 * plan["heldout_chars_per_lang"] / max(sample_chars[lang], 1), 0.01), 0.2)
        run.say(f"  prepare {name} ({sample_chars[lang] / 1e6:.2f}M chars, tokenizer {tok})")
        rep = _prepare_lang(run, lang, run.p(tok), run.p("data", "pretrain", name), vf)
        reports[name] = rep
        run.say("  " + format_report(rep).replace("\n", "\n  "))
        if name in LANGS:
            held[lang] = _heldout_texts(run, lang, run.p("data", "pretrain", name), run.p(tok))
            _write_text(run.p("data", "heldout", f"{lang}.jsonl"),
                        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in held[lang]))
    sft = {}
    sft_tok = run.p("tokenizer-ext" if adapted else "tokenizer")
    for lang in LANGS:
        sft[lang] = _prepare_sft(run, lang, sft_tok, run.p("data", "sft", lang))
        run.say(f"  sft {lang}: " + format_sft_report(sft[lang]).replace("\n", "\n  "))
    return {"pretrain": {k: {"splits": v["splits"], "rules": v["rules"], "by_source": v["by_source"],
                             "cleaning": v["cleaning"]} for k, v in reports.items()},
            "heldout": {lang: {"docs": len(t), "chars": sum(len(x) for x in t)} for lang, t in held.items()},
            "sft": {lang: {"splits": r["splits"], "dropped": r["dropped"], "chat_format": r["chat_format"],
                           "digit_start_left_out": r["digit_start_left_out"]} for lang, r in sft.items()}}


# -- training -----------------------------------------------------------------------------------

def _measured_tps(run_dir: Path) -> float | None:
    """Median training tokens/s a finished run logged (its measured throughput under today's load)."""
    from dhad.train.metrics import read_metrics
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return None
    v = sorted(r["tokens_per_s"] for r in read_metrics(f) if r.get("event") == "step" and r.get("tokens_per_s"))
    return v[len(v) // 2] if v else None


def _batch_for(tokens: float, seq_len: int, steps_target: int, max_micro: int, ci: bool) -> tuple[int, int]:
    """(micro batch, global batch) in sequences: about `steps_target` steps for `tokens`, 1..64 sequences."""
    if ci:
        return max_micro, max_micro
    seqs = int(min(max(round(tokens / steps_target / seq_len), 1), 64))
    micro = min(seqs, max_micro)
    return micro, max(micro, seqs // micro * micro)


def _train_stage(run: Run, name: str, recipe: dict, run_dir: Path, seconds: float | None = None) -> dict:
    """Run (or resume) one trainer recipe; returns the summary the marker keeps.

    `seconds`: the stage's time. The step count was sized from measured throughput; if the machine gets
    slower (it is shared), the trainer's time budget (`max_seconds`) stops training at 93% of the time
    (it checkpoints) and
    the run continues from that checkpoint with the schedule cut short: a quick decay to the final
    learning rate over 5% more steps, then the model is saved as usual."""
    from dhad.train.checkpointing import latest_checkpoint
    from dhad.train.loop import train
    from dhad.train.recipe import parse_recipe
    saved = run.p("recipes", f"{name}.json")
    # resume only a stage whose inputs are the ones it was interrupted with: every earlier stage reused
    resume = latest_checkpoint(run_dir) is not None and saved.is_file() and not run.computed
    if resume:
        # the interrupted run's recipe, not one re-sized from the time left now: the schedule continues
        recipe = _read_json(saved)
        run.say(f"  {name}: resuming from {latest_checkpoint(run_dir)}")
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a run that never checkpointed: nothing to resume, start clean
        _write_json(saved, recipe)
    stop_at = None
    if run.cfg.interrupt_at and run.cfg.interrupt_at[0] == name and not resume:
        stop_at = int(run.cfg.interrupt_at[1])
    t = time.perf_counter()
    limit = None if (seconds is None or run.cfg.ci) else 0.93 * seconds
    res = train(parse_recipe(recipe, source=f"speedrun:{name}"), resume=resume, run_dir=run_dir,
                progress=run.cfg.progress, stop_at=stop_at, max_seconds=limit)
    cut = None
    if res.interrupted and res.timed_out:
        planned = recipe["schedule"]["total_steps"]
        total = res.step + max(2, math.ceil(0.05 * res.step))
        run.say(f"  {name}: out of time at step {res.step} of {planned} (training ran slower than measured); "
                f"decaying the learning rate over {total - res.step} more steps")
        recipe = json.loads(json.dumps(recipe))
        sc = recipe["schedule"]
        sc["total_steps"] = total
        sc["warmup_steps"] = min(sc["warmup_steps"], res.step)
        for st in recipe.get("stages", [])[:-1]:  # a stage boundary past the new end moves to it
            st["tokens"] = min(st["tokens"], res.step * recipe["batch"]["global_batch_size"] *
                               recipe["batch"].get("seq_len", run.plan["seq_len_sft"]))
        _write_json(saved, recipe)
        cut = {"at_step": res.step, "planned_steps": planned, "final_steps": total}
        res = train(parse_recipe(recipe, source=f"speedrun:{name}"), resume=True, run_dir=run_dir,
                    progress=run.cfg.progress)
    if res.interrupted:
        raise SpeedrunInterrupted(f"{name} stopped at step {res.step} (checkpoint {res.checkpoint}); run the same "
                                  "command again to resume")
    tps = _measured_tps(run_dir)
    losses = res.losses
    from dhad.train.metrics import read_metrics
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "step"]
    return {"run_dir": str(run_dir), "model": str(res.model_dir), "steps": res.step, "resumed": resume,
            "deadline_cut": cut, "train_seconds": time.perf_counter() - t, "tokens_per_s": tps,
            "first_loss": steps[0]["loss"] if steps else (losses[0][1] if losses else None),
            "last_loss": steps[-1]["loss"] if steps else (losses[-1][1] if losses else None),
            "evals": res.evals[-1:] if res.evals else [], "plan": res.plan}


def _pretrain_recipe(run: Run, name: str, arch: str, size: Size, vocab: int, tok_dir: Path, sources: dict,
                     seconds: float, tps: float, lr: float, stages: list | None = None, init_from: str | None = None,
                     rtype: str = "pretrain") -> dict:
    plan, cfg = run.plan, run.cfg
    T = plan["seq_len_pretrain"]
    if cfg.ci:
        steps = {"donor": 40, "pretrain": 250, "adapt": 60}.get(name, 60)
        micro, glob = _batch_for(0, T, 0, 8, True)
    else:
        # 88%: the trainer's own evaluations, checkpoints and start-up are not in the probe's tokens/s
        budget_tokens = max(seconds * 0.88 - 5.0, 1.0) * tps
        micro, glob = _batch_for(budget_tokens, T, 300, 8 if run.device.type == "cpu" else 32, False)
        steps = int(max(budget_tokens // (glob * T), 10))
    preset, ov = model_overrides(size, arch, plan["block_size"], vocab)
    model = {"init_from": init_from} if init_from else {"preset": preset, "overrides": ov}
    d = {
        "type": rtype, "name": f"speedrun-{name}", "seed": cfg.seed, "model": model, "tokenizer": str(tok_dir),
        "data": {"sources": {k: str(v) for k, v in sources.items()}, "train_split": "train",
                 "val_split": "validation"},
        "optimizer": {"lr": lr, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "schedule": {"warmup_steps": max(1, steps // 20), "total_steps": steps, "min_lr": lr / 10, "decay": "cosine"},
        "batch": {"micro_batch_size": micro, "global_batch_size": glob, "seq_len": T},
        "precision": plan["precision"], "peak_flops": plan["peak_flops"], "distributed": "none",
        "device": "cuda" if run.device.type == "cuda" else "cpu",
        "checkpoint_every": max(steps // 4, 1), "keep_checkpoints": 1,
        "eval_every": max(steps // 4, 1), "eval_batches": 2, "log_every": 1,
    }
    if stages:
        d["stages"] = stages
    else:
        d["stages"] = [{"name": "main", "mix": {k: 1.0 for k in sources}}]
    return d


def _size(run: Run) -> Size:
    return Size(**run.plan["size"])


def stage_pretrain(run: Run, markers: dict) -> dict:
    plan = run.plan
    secs = run.stage_seconds("pretrain")
    if run.cfg.recipe == "jais":
        sources = {lang: run.p("data", "pretrain", lang) for lang in LANGS}
        tok, arch, vocab = run.p("tokenizer"), "jais", None
    else:  # the English-only base of the adapted recipe (Llama architecture, English tokenizer)
        sources = {"english": run.p("data", "pretrain", "english")}
        tok, arch, vocab = run.p("tokenizer-en"), "llama", None
    run.say(f"  pretrain: {secs:.0f}s of the budget at ~{plan['tokens_per_s']:,.0f} tok/s")
    recipe = _pretrain_recipe(run, "pretrain", arch, _size(run), vocab, tok, sources, secs, plan["tokens_per_s"],
                              lr=3e-3)
    return _train_stage(run, "pretrain", recipe, run.p("pretrain"), secs)


def stage_donor(run: Run, markers: dict) -> dict:
    """The adapted recipe's donor: a small bilingual Jais-style model with the bilingual tokenizer (in
    Jais-adapted the donor is Jais itself); its embeddings of the new Arabic tokens seed their init."""
    plan = run.plan
    secs = run.stage_seconds("donor")
    size = _size(run)
    small = [s for s in LADDER if s.n_embd < size.n_embd] or [size]
    donor = CI_SIZE if run.cfg.ci else small[-1]
    sources = {"arabic": run.p("data", "pretrain", "arabic-bi"), "english": run.p("data", "pretrain", "english-bi")}
    tps = plan["tokens_per_s"] * (flops_per_token(size, plan["seq_len_pretrain"]) /
                                  flops_per_token(donor, plan["seq_len_pretrain"]))
    run.say(f"  donor {donor.name}: {secs:.0f}s")
    recipe = _pretrain_recipe(run, "donor", "jais", donor, size.vocab, run.p("tokenizer"), sources, secs, tps, lr=3e-3)
    return _train_stage(run, "donor", recipe, run.p("donor"), secs)


def stage_adapt(run: Run, markers: dict) -> dict:
    """Vocabulary extension + projected init (dhad.adapt), then the two-stage adaptive pretraining on
    Arabic: stage 1 trains only embeddings and LM head (backbone frozen), stage 2 trains everything."""
    from dhad.adapt import adapt_init
    plan = run.plan
    base = Path(markers["pretrain"]["outputs"]["model"])
    init_dir = run.p("adapt-init")
    rep = adapt_init(base, run.p("tokenizer-ext"), init_dir, donor=Path(markers["donor"]["outputs"]["model"]),
                     base_tokenizer=run.p("tokenizer-en"), seed=run.cfg.seed)
    run.say("  " + rep.summary().replace("\n", "\n  "))
    secs = run.stage_seconds("adapt")
    tps = markers["pretrain"]["outputs"].get("tokens_per_s") or plan["tokens_per_s"]
    T = plan["seq_len_pretrain"]
    recipe = _pretrain_recipe(run, "adapt", "llama", _size(run), None, run.p("tokenizer-ext"),
                              {"arabic": run.p("data", "pretrain", "arabic")}, secs, tps, lr=2e-3,
                              init_from=str(init_dir), rtype="adapt")
    steps = recipe["schedule"]["total_steps"]
    tokens_per_step = recipe["batch"]["global_batch_size"] * T
    stage1 = max(1, steps // 3) * tokens_per_step  # a third of the steps with the backbone frozen
    recipe["stages"] = [{"name": "stage1-embeddings", "tokens": stage1, "trainable": "embeddings"},
                        {"name": "stage2-all", "trainable": "all"}]
    out = _train_stage(run, "adapt", recipe, run.p("adapt"), secs)
    out["init"] = rep.as_dict()
    out["init_model"] = str(init_dir)
    return out


def stage_sft(run: Run, markers: dict) -> dict:
    plan = run.plan
    secs = run.stage_seconds("sft")
    prev = markers["adapt" if run.cfg.recipe == "adapted" else "pretrain"]["outputs"]
    tok = run.p("tokenizer-ext" if run.cfg.recipe == "adapted" else "tokenizer")
    tps = prev.get("tokens_per_s") or plan["tokens_per_s"]
    T = plan["seq_len_sft"]
    if run.cfg.ci:
        steps, micro, glob = 30, 4, 4
    else:
        budget_tokens = max(secs * 0.88 - 5.0, 1.0) * tps
        micro, glob = _batch_for(budget_tokens, T, 200, 8 if run.device.type == "cpu" else 32, False)
        steps = int(max(budget_tokens // (glob * T), 10))
    lr = 5e-4
    run.say(f"  sft: {secs:.0f}s, {steps} steps of {glob} x {T} tokens")
    recipe = {
        "type": "sft", "name": "speedrun-sft", "seed": run.cfg.seed, "model": {"init_from": prev["model"]},
        "tokenizer": str(tok),
        "data": {"sources": {lang: str(run.p("data", "sft", lang)) for lang in LANGS}, "train_split": "train",
                 "val_split": "validation"},
        "stages": [{"name": "main", "mix": {"arabic": 1.0, "english": 1.0}}],
        "optimizer": {"lr": lr, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "schedule": {"warmup_steps": max(1, steps // 20), "total_steps": steps, "min_lr": lr / 10, "decay": "cosine"},
        "batch": {"micro_batch_size": micro, "global_batch_size": glob},
        "precision": plan["precision"], "peak_flops": plan["peak_flops"], "distributed": "none",
        "device": "cuda" if run.device.type == "cuda" else "cpu",
        "checkpoint_every": max(steps // 4, 1), "keep_checkpoints": 1, "eval_every": max(steps // 4, 1),
        "eval_batches": 2, "log_every": 1,
    }
    out = _train_stage(run, "sft", recipe, run.p("sft"), secs)
    if not run.cfg.dpo:
        _copy_model_dir(Path(out["model"]), run.p("final"))
    return out


def stage_dpo(run: Run, markers: dict) -> dict:
    """Optional preference alignment of the SFT model on QA preference pairs (Arabic and English, derived
    from XQuAD/ARCD: the gold span preferred over another question's answer), with the DPO engineer's
    `run_dpo_stage` (the trainer's `dpo` objective)."""
    from dhad.data.prefs import PrefsConfig, prepare_prefs
    from dhad.train.checkpointing import latest_checkpoint
    from dhad.train.dpo import run_dpo_stage
    plan = run.plan
    tok = run.p("tokenizer-ext" if run.cfg.recipe == "adapted" else "tokenizer")
    pref_root = run.data / "preference"
    files = [f"{lang}={pref_root / f}" for lang in LANGS for f in PREF_FILES[lang] if (pref_root / f).is_file()]
    if not files:
        raise SpeedrunError(f"--dpo: no preference data in {pref_root} (expected {PREF_FILES})")
    prefs = run.p("data", "prefs")
    rep = prepare_prefs(PrefsConfig(inputs=files, tokenizer=str(tok), out=str(prefs),
                                    chat_format="jais", answer_as_served=True, max_len=plan["seq_len_sft"],
                                    seed=run.cfg.seed, max_rows=200 if run.cfg.ci else None))
    secs = run.stage_seconds("dpo")
    tps = markers["sft"]["outputs"].get("tokens_per_s") or plan["tokens_per_s"]
    batch = 8 if run.cfg.ci else 16
    # a step is a forward + backward over batch pairs (prompt once, two answers): ~batch * seq_len tokens
    steps = 8 if run.cfg.ci else int(max((secs * 0.8 - 10) * tps / (batch * plan["seq_len_sft"]), 5))
    run.say(f"  dpo: {secs:.0f}s, {steps} steps of {batch} pairs")
    t = time.perf_counter()
    out_dir = run.p("dpo")
    res = run_dpo_stage(run.p("sft", "model"), prefs, out_dir, steps=steps, batch_pairs=batch,
                        micro_batch=min(8, batch), lr=1e-4, seq_len=plan["seq_len_sft"],
                        precision=plan["precision"], seed=run.cfg.seed, progress=run.cfg.progress,
                        peak_flops=plan["peak_flops"], resume=latest_checkpoint(out_dir) is not None)
    if res.get("interrupted"):
        raise SpeedrunInterrupted(f"dpo stopped at step {res['steps']}; run the same command again to resume")
    _copy_model_dir(Path(res["model_dir"]), run.p("final"))
    from dhad.train.metrics import read_metrics
    steps_logged = [r for r in read_metrics(out_dir / "metrics.jsonl") if r.get("event") == "step"]
    return {"run_dir": str(out_dir), "model": res["model_dir"], "steps": res["steps"], "resumed": False,
            "train_seconds": time.perf_counter() - t, "tokens_per_s": _measured_tps(out_dir),
            "first_loss": steps_logged[0]["loss"] if steps_logged else None,
            "last_loss": steps_logged[-1]["loss"] if steps_logged else None, "dpo": res,
            "prefs": {"splits": rep.get("splits"), "dropped": rep.get("dropped")}}


# -- evaluation ---------------------------------------------------------------------------------

def _models_to_eval(run: Run, markers: dict) -> list[tuple[str, str | None, dict | None]]:
    """(label, model dir or None, recipe model section for a fresh init)."""
    plan = run.plan
    size = _size(run)
    if run.cfg.recipe == "jais":
        preset, ov = model_overrides(size, "jais", plan["block_size"])
        return [("untrained", None, {"preset": preset, "overrides": ov, "tok": "tokenizer"}),
                ("pretrained", markers["pretrain"]["outputs"]["model"], None),
                ("sft", markers["sft"]["outputs"]["model"], None)] + (
                [("dpo", markers["dpo"]["outputs"]["model"], None)] if "dpo" in markers else [])
    preset, ov = model_overrides(size, "llama", plan["block_size"])
    return [("untrained (English base)", None, {"preset": preset, "overrides": ov, "tok": "tokenizer-en"}),
            ("English base", markers["pretrain"]["outputs"]["model"], None),
            ("extended + projected init", markers["adapt"]["outputs"]["init_model"], None),
            ("adapted", markers["adapt"]["outputs"]["model"], None),
            ("sft", markers["sft"]["outputs"]["model"], None)] + (
            [("dpo", markers["dpo"]["outputs"]["model"], None)] if "dpo" in markers else [])


def stage_eval(run: Run, markers: dict) -> dict:
    import dhad
    from dhad.config import Config
    from dhad.evaluate.report import markdown_tables, write_results
    from dhad.evaluate.runner import evaluate
    from dhad.model import Transformer
    from dhad.tokenizer import load_tokenizer
    plan = run.plan
    dev = run.device
    held = {lang: read_texts(run.p("data", "heldout", f"{lang}.jsonl")) for lang in LANGS}
    T = plan["seq_len_pretrain"]
    bpb, bench = {}, {}
    for label, mdir, fresh in _models_to_eval(run, markers):
        if mdir is None:
            model = Transformer(Config.from_name(fresh["preset"], **fresh["overrides"])).init_weights(run.cfg.seed)
            tok = load_tokenizer(run.p(fresh["tok"]))
        else:
            model = dhad.load_model(mdir, dtype="float32")
            tok = load_tokenizer(mdir)
        model = model.to(dev).eval()
        bpb[label] = {lang: bits_per_byte(model, tok, held[lang], T, device=dev) for lang in LANGS}
        run.say(f"  {label:<26} bpb: " + ", ".join(f"{lang} {v['bpb']:.3f}" for lang, v in bpb[label].items()))
        if mdir is not None and label in ("pretrained", "English base", "sft", "dpo"):
            res = evaluate(model, tok, list(plan["bench_tasks"]), shots=0, limit=plan["bench_limit"],
                           data_dir=run.data, progress=False)
            res["model"]["name"] = label
            write_results(res, run.p("eval", f"bench-{label.replace(' ', '-')}"))
            bench[label] = res
    table = markdown_tables(list(bench.values())) if bench else ""
    _write_json(run.p("eval", "eval.json"), {"bpb": bpb, "bench": {k: {"tasks": v["tasks"], "languages": v["languages"],
                                                                         "average": v["average"]}
                                                                     for k, v in bench.items()},
                                             "bench_table": table, "heldout": {l: len(t) for l, t in held.items()}})
    return {"eval": str(run.p("eval", "eval.json")), "bpb": {k: {l: v[l]["bpb"] for l in v} for k, v in bpb.items()}}


def stage_check(run: Run, markers: dict) -> dict:
    res = check_scripts(run.p("final"), max_new_tokens=24 if run.cfg.ci else 48)
    for title, rows in (("card prompts", res["answers"]), ("default system prompt", res["default_system"]["answers"])):
        for r in rows:
            run.say(f"  {title} [{r['lang']}] {r['question']} -> {r['answer'][:80]!r} ({r['script']}, "
                    f"{'ok' if r['ok'] else 'WRONG SCRIPT'})")
    run.say(f"  script check {'passed' if res['passed'] else 'FAILED'} (with the default system prompt for both "
            f"languages: {'passed' if res['default_system']['passed'] else 'failed'})")
    _write_json(run.p("check.json"), res)
    return res


def stage_report(run: Run, markers: dict) -> dict:
    from dhad.report import write_report
    path = write_report(run, markers)
    run.say(f"  wrote {path}")
    return {"report": str(path)}


STAGES = {"plan": stage_plan, "tokenizer": stage_tokenizer, "data": stage_data, "donor": stage_donor,
          "pretrain": stage_pretrain, "adapt": stage_adapt, "sft": stage_sft, "dpo": stage_dpo,
          "eval": stage_eval, "check": stage_check, "report": stage_report}


# ---------------------------------------------------------------------------------------------
# CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="data root with corpus/, eval/ (and preference/ for --dpo); "
                                                "default $DHAD_DATA_DIR")
    p.add_argument("--out", default="runs/speedrun", help="output directory (default runs/speedrun)")
    p.add_argument("--budget", type=float, default=15.0, metavar="MINUTES",
                   help="total wall-clock minutes, everything included (default 15): sizes model, steps and data")
    p.add_argument("--recipe", choices=RECIPES, default="jais",
                   help="jais: bilingual model from scratch; adapted: English base + Arabic vocabulary extension")
    p.add_argument("--dpo", action="store_true", help="add a DPO stage after SFT (QA preference pairs)")
    p.add_argument("--ci", action="store_true", help="tiny CI-sized run (fixed small sizes; ignores --budget sizing)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage (run again to continue)")
    p.add_argument("--fresh", action="store_true", help="ignore what an earlier run left in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from dhad.cli import CLIError
    cfg = SpeedrunConfig(data=args.data, out=args.out, budget=args.budget, recipe=args.recipe, dpo=args.dpo,
                         ci=args.ci, device=args.device, seed=args.seed, until=args.until, fresh=args.fresh,
                         progress=not args.no_progress)
    try:
        res = run_speedrun(cfg)
    except SpeedrunInterrupted as e:
        print(f"dhad speedrun: interrupted: {e}", file=sys.stderr)
        return 130
    except SpeedrunError as e:
        raise CLIError(str(e)) from None
    chk = res.get("check")
    if chk is not None and not chk.get("passed"):
        print("warning: the script check failed (see the report)", file=sys.stderr)
    return 0
