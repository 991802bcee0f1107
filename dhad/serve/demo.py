"""A tiny bilingual demo chat model, trained in seconds on CPU, to try `dhad serve` / `dhad chat`
without downloading anything (and what the serving tests run end to end).

    dhad demo out/demo-chat      # then: dhad serve --model out/demo-chat   (or dhad chat)

It is the `tiny-jais` preset (ALiBi, SwiGLU, muP scalars: a Jais-family model in miniature) with a
512-token byte-level BPE and the Jais-family chat template, fitted for a few dozen steps on four
conversations (two Arabic, two English) rendered in that template. It memorises them: ask
"كيف أجهز كوب شاهي؟" and it answers in Arabic; that is all it knows. Deterministic for a seed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

PAIRS = (
    ("كيف أجهز كوب شاهي؟", "اغلي الماء، ثم ضع أوراق الشاي في الإبريق واتركه **خمس دقائق**."),
    ("مرحبا، من أنت؟", "أنا ضاد، نموذج لغوي صغير ثنائي اللغة يتحدث العربية والإنجليزية."),
    ("How do I prepare a cup of tea?", "Boil the water, then add the tea leaves and wait **five minutes**."),
    ("Hello, who are you?", "I am dhad, a small bilingual language model."),
)


def build_demo_model(out_dir, steps: int = 40, seed: int = 0) -> Path:
    """Train and save the demo model (atomically: a finished directory or none)."""
    import dhad
    from dhad import prompts
    from dhad.config import Config
    from dhad.model import Transformer
    from dhad.tokenizer import train_bpe

    out = Path(out_dir)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in PAIRS]
    texts = [prompts.render(c, "jais", add_generation_prompt=False) for c in convs]
    tok = train_bpe(texts * 8, vocab_size=512, chat_template="jais")
    eos = tok.eos_token_id
    cfg = Config.from_name("tiny-jais", vocab_size=tok.vocab_size, bos_token_id=eos, eos_token_id=eos,
                           pad_token_id=eos)
    model = Transformer(cfg).init_weights(seed=seed)
    # prompt (with the generation prompt) + " answer" + EOS, as the engine will see it
    seqs = [tok.encode(prompts.render(c[:1], "jais")) + tok.encode(" " + c[1]["content"]) + [eos] for c in convs]
    T = max(map(len, seqs))
    x = torch.tensor([s + [eos] * (T - len(s)) for s in seqs])
    y = torch.tensor([s[1:] + [-100] * (T - len(s) + 1) for s in seqs])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from more, and loses a lot on a busy machine
    try:
        torch.manual_seed(seed)
        model.train()
        for _ in range(steps):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                     ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        dhad.save_model(model, tmp, tokenizer=tok)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out

