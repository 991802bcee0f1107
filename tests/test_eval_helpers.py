"""Shared builders for the evaluation tests (no tests here).

`build_tiny_llama` writes a Hugging Face directory that both transformers (lm-eval's `hf` backend)
and `dhad.load_model` read: a random tiny `LlamaForCausalLM` and a byte-level BPE trained in the
test on real Arabic and English eval rows, whose tokenizer.json post-processor prepends <s> and whose
tokenizer_config says `add_bos_token` (the ALLaM / Llama convention), so BOS handling is exercised.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest


def training_texts(data: Path, n: int = 600) -> list[str]:
    files = ["exams_ar/acegpt_exam_test.jsonl", "acva/difficulty-easy-TF_test.jsonl", "arc_easy/arc_easy_test.jsonl",
             "piqa/piqa_validation.jsonl", "winogrande/winogrande_xl_validation.jsonl"]
    out = []
    for f in files:
        with open(data / "eval" / f, encoding="utf-8") as fh:
            out += list(itertools.islice(fh, n))
    return out


def build_tiny_llama(out_dir: Path, data: Path, *, hidden: int = 64, layers: int = 2, vocab: int = 4096,
                     max_pos: int = 4096, seed: int = 0, add_bos_key: bool = True) -> Path:
    """`add_bos_key=False`: tokenizer_config has no add_bos_token (Llama-3's layout): BOS comes from the
    tokenizer.json post-processor alone."""
    import torch
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM

    from dhad.tokenizer import train_bpe

    out_dir = Path(out_dir)
    tok = train_bpe(training_texts(data), vocab, special_tokens=["<|endoftext|>", "<s>", "</s>"], chat_template=None)
    tok.backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.config.update(bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<|endoftext|>",
                      model_max_length=max_pos)
    tok.config.pop("add_bos_token", None)
    if add_bos_key:
        tok.config["add_bos_token"] = True
    tok.save(out_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_pos, rms_norm_eps=1e-5, rope_theta=10000.0,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                      initializer_range=0.2)  # wide init: choices' log-likelihoods far apart vs fp noise
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def offline(monkeypatch):
    """Offline mode now, also when `datasets` / `huggingface_hub` were imported before (they read the
    variables at import; otherwise each load waits out its network retries)."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
