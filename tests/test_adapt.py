"""Vocabulary adaptation: linear-map fit, resize + init, the two-stage freezing API, and real tiny models."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import dhad
from dhad.adapt import (
    AdaptError,
    extend_model,
    fit_linear_map,
    fit_quality,
    freeze_for_stage,
    stage_param_groups,
    token_pairs,
)
from dhad.config import Config
from dhad.model import Transformer
from dhad.tokenizer import Tokenizer, extend_tokenizer, read_texts, train_bpe

EN = [
    "The student went to school in the morning and wrote the lesson in his notebook.",
    "The teacher said: read the book carefully, then write a summary of the first chapter.",
    "Al Ain is a city in the United Arab Emirates; the mountain road climbs for many miles.",
]
AR = [
    "ذهب الطالب إلى المدرسة صباحا وكتب الدرس في دفتره.",
    "قال المعلم للطلاب: اقرؤوا الكتاب بعناية، ثم اكتبوا ملخصا عن الفصل الأول.",
    "والكتاب والمكتبة والكاتب والمكتوب كلها من جذر كتب.",
]


@pytest.fixture(scope="module")
def toks():
    base = train_bpe(EN * 10, 330, min_frequency=1)
    donor = train_bpe((EN + AR) * 10, 520, min_frequency=1)
    ext, rep = extend_tokenizer(base, donor, 150)
    assert rep.added > 50
    return base, donor, ext


def _model(preset: str, vocab: int, seed: int = 0) -> Transformer:
    return Transformer(Config.from_name(preset, vocab_size=vocab, block_size=64)).init_weights(seed=seed)


# --- the linear map ---------------------------------------------------------------------------

def test_fit_recovers_a_known_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64)
    a = torch.randn(12, 20, generator=g, dtype=torch.float64)
    b = torch.randn(20, generator=g, dtype=torch.float64)
    y = x @ a + b + 1e-6 * torch.randn(400, 20, generator=g, dtype=torch.float64)
    m = fit_linear_map(x[:300], y[:300])
    torch.testing.assert_close(m.weight, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.bias, b, atol=1e-5, rtol=0)
    r2, cos = fit_quality(m, x[300:], y[300:])
    assert r2 > 1 - 1e-9 and cos > 1 - 1e-9
    # ridge shrinks the map; pure noise targets give R² ~ 0 on held-out rows
    assert fit_linear_map(x, y, ridge=1e4).weight.norm() < 0.5 * a.norm()
    noise = torch.randn(400, 20, generator=g, dtype=torch.float64)
    assert fit_quality(fit_linear_map(x[:300], noise[:300]), x[300:], noise[300:])[0] < 0.05


def test_fit_errors():
    with pytest.raises(AdaptError, match="at least 2 shared tokens"):
        fit_linear_map(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(AdaptError, match="paired rows"):
        fit_linear_map(torch.randn(5, 4), torch.randn(6, 4))


# --- resize + init ----------------------------------------------------------------------------

@pytest.mark.parametrize("base_preset", ["tiny-llama", "tiny-jais"])  # untied (Llama-2) and tied (Jais) bases
def test_projection_recovers_planted_embeddings(toks, base_preset):
    """Donor embeddings are an exact affine function of a hidden 'true' table Z; the base holds Z for its
    tokens. Projection init must then give the new tokens exactly their rows of Z."""
    base_tok, donor_tok, ext_tok = toks
    n_old, V = base_tok.vocab_size, ext_tok.vocab_size
    g = torch.Generator().manual_seed(1)
    model = _model(base_preset, n_old)
    E = model.config.n_embd
    z = torch.randn(V, E, generator=g)  # "true" input embeddings in the base's space
    zh = torch.randn(V, E, generator=g)  # "true" LM-head rows (untied base)
    with torch.no_grad():
        model.wte.weight.copy_(z[:n_old])
        if not model.config.tie_embeddings:
            model.lm_head.weight.copy_(zh[:n_old])
    donor = _model("tiny-llama", donor_tok.vocab_size)  # untied donor: both maps are exercised
    m_in, c_in = torch.randn(E, E, generator=g), torch.randn(E, generator=g)
    m_out, c_out = torch.randn(E, E, generator=g), torch.randn(E, generator=g)
    pairs = torch.tensor(token_pairs(ext_tok, donor_tok))  # (ext id, donor id)
    with torch.no_grad():
        donor.wte.weight[pairs[:, 1]] = (z[pairs[:, 0]] - c_in) @ torch.linalg.inv(m_in)
        donor.lm_head.weight[pairs[:, 1]] = (zh[pairs[:, 0]] - c_out) @ torch.linalg.inv(m_out)
    old = copy.deepcopy(model.state_dict())
    rep = extend_model(model, base_tok, ext_tok, donor, donor_tok, method="projection", center_head=False)
    new = list(range(n_old, V))
    assert model.config.vocab_size == V == model.wte.weight.shape[0] == model.lm_head.weight.shape[0]
    assert rep.n_new == len(new) == rep.n_new_from_donor
    torch.testing.assert_close(model.wte.weight[new], z[new], atol=1e-3, rtol=1e-3)
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.wte.weight
    else:
        torch.testing.assert_close(model.lm_head.weight[new], zh[new], atol=1e-3, rtol=1e-3)
    for m in rep.matrices:
        assert m.n_shared > 200 and m.heldout_r2 > 0.9999 and m.heldout_cosine > 0.9999
    for k, v in old.items():  # every old parameter and old row is bit-identical
        now = model.state_dict()[k]
        assert torch.equal(now[: v.shape[0]] if k in ("wte.weight", "lm_head.weight") else now, v), k


def test_mean_and_mean_cov_init(toks):
    base_tok, _, ext_tok = toks
    n_old, V = base_tok.vocab_size, ext_tok.vocab_size
    model = _model("tiny-llama", n_old)
    mu_in = model.wte.weight.detach().double().mean(0).float()
    mu_out = model.lm_head.weight.detach().double().mean(0).float()
    m = copy.deepcopy(model)
    extend_model(m, base_tok, ext_tok, method="auto")  # no donor -> mean
    assert torch.equal(m.wte.weight[n_old:], mu_in.expand(V - n_old, -1))
    assert torch.equal(m.lm_head.weight[n_old:], mu_out.expand(V - n_old, -1))
    m = copy.deepcopy(model)
    extend_model(m, base_tok, ext_tok, method="mean_cov", seed=3, pad_to_multiple_of=64)
    assert m.config.vocab_size % 64 == 0 and m.config.vocab_size >= V
    rows = m.wte.weight[n_old:].detach()
    assert rows.std(0).mean() > 0.5 * model.wte.weight.std(0).mean()  # rows differ, with the old spread
    assert (rows.mean(0) - mu_in).abs().max() < 4 * model.wte.weight.std() / math.sqrt(rows.shape[0]) * 3


def test_adapt_init_writes_a_model_dir(toks, tmp_path, capsys):
    base_tok, donor_tok, ext_tok = toks
    base = _model("tiny-llama", base_tok.vocab_size)
    donor = _model("tiny-jais", donor_tok.vocab_size, seed=1)
    dhad.save_model(base, tmp_path / "base", tokenizer=base_tok)
    dhad.save_model(donor, tmp_path / "donor", tokenizer=donor_tok)
    ext_tok.save(tmp_path / "ext")
    from dhad.cli import main

    assert main(["adapt", "init", "--base", str(tmp_path / "base"), "--donor", str(tmp_path / "donor"),
                 "--tokenizer", str(tmp_path / "ext"), "--out", str(tmp_path / "out")]) == 0
    assert "held-out" in capsys.readouterr().out
    out = dhad.load_model(tmp_path / "out")
    tok = dhad.load_tokenizer(tmp_path / "out")
    assert tok.vocab_size == ext_tok.vocab_size == out.config.vocab_size
    assert (tmp_path / "out" / "adapt_report.json").is_file()
    # same as the library call, and old-token logits of English text unchanged by the resize
    m = copy.deepcopy(base)
    extend_model(m, base_tok, ext_tok, donor, donor_tok)
    torch.testing.assert_close(out.wte.weight, m.wte.weight)
    ids = torch.tensor([base_tok.encode(EN[0])])
    with torch.no_grad():
        torch.testing.assert_close(out(ids)[..., : base_tok.vocab_size], base(ids), atol=1e-5, rtol=1e-5)
    # user errors -> exit 2 with a message
    assert main(["adapt", "init", "--base", str(tmp_path / "nope"), "--tokenizer", str(tmp_path / "ext"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_adapt_bad_inputs(toks):
    base_tok, donor_tok, ext_tok = toks
    base = _model("tiny-llama", base_tok.vocab_size)
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.WordLevel({"كتاب": 0, "مدرسة": 1}, unk_token="كتاب"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = Tokenizer(hf=hf, config={"unk_token": None, "bos_token": None, "eos_token": None, "pad_token": None})
    with pytest.raises(AdaptError, match="shares no tokens"):
        extend_model(copy.deepcopy(base), base_tok, ext_tok, _model("tiny-llama", 2), words, method="projection")
    with pytest.raises(AdaptError, match="not an extension"):
        extend_model(copy.deepcopy(base), base_tok, donor_tok)
    with pytest.raises(AdaptError, match="needs a donor"):
        extend_model(copy.deepcopy(base), base_tok, ext_tok, method="projection")
    with pytest.raises(AdaptError, match="adds no tokens"):
        extend_model(copy.deepcopy(base), base_tok, base_tok)


# --- freezing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-jais"])
@pytest.mark.parametrize("rows", [False, True])
def test_stage1_changes_only_the_intended_parameters(preset, rows):
    torch.manual_seed(0)
    model = _model(preset, 96)
    new_ids = list(range(64, 96))
    st = freeze_for_stage(model, 1, new_token_ids=new_ids if rows else None)
    assert set(st.trainable) <= {"wte.weight", "lm_head.weight"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(stage_param_groups(model, weight_decay=0.1), lr=1e-2)
    data = torch.randint(0, 96, (4, 17))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k in ("wte.weight", "lm_head.weight"):
            if rows:
                assert torch.equal(after[k][:64], v[:64]), k  # old rows: bit-identical
                assert not torch.equal(after[k][64:], v[64:]), k
            else:
                assert not torch.equal(after[k], v), k
        else:
            assert torch.equal(after[k], v), k  # backbone frozen
    # stage 2: everything trains, hooks gone
    freeze_for_stage(model, 2)
    assert all(p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(stage_param_groups(model), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(not torch.equal(after[k], before[k]) for k in before if not k.endswith("alibi_slopes")), \
        [k for k in before if torch.equal(after[k], before[k])]
    assert not torch.equal(after["wte.weight"][:64], before["wte.weight"][:64])


# --- real tiny models -------------------------------------------------------------------------

def _corpus(root: Path, lang: str, max_chars: int, skip: int = 0) -> list[str]:
    out = []
    for p in sorted((root / "corpus" / lang).iterdir()):
        n = 0
        for t in read_texts(p):
            if n >= skip + max_chars:
                break
            if n >= skip:
                out.append(t)
            n += len(t)
    return out


def _blocks(tok, texts, T):
    ids = []
    for x in tok.encode_batch(texts):
        ids += x + [tok.eos_token_id]
    ids = torch.tensor(ids)
    n = len(ids) // (T + 1)
    return ids[: n * (T + 1)].view(n, T + 1)


def _pretrain(cfg: Config, data: torch.Tensor, steps: int, lr: float = 3e-3, bs: int = 16) -> Transformer:
    """A minimal training loop (AdamW, warmup + cosine): enough to give the embeddings real structure."""
    model = Transformer(cfg).init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
        b = data[torch.randint(0, data.shape[0], (bs,), generator=g)]
        loss = torch.nn.functional.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.data
@pytest.mark.slow
def test_projection_beats_mean_on_real_tiny_models(shared_data):
    torch.manual_seed(0)
    # one thread: these tiny matmuls gain little from two, and a shared machine makes two threads spin
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _projection_vs_mean(shared_data)
    finally:
        torch.set_num_threads(threads)


def _projection_vs_mean(shared_data):
    en, ar = _corpus(shared_data, "english", 150_000), _corpus(shared_data, "arabic", 150_000)
    base_tok = train_bpe(en, 1024)  # English-only base (Llama-2's role)
    donor_tok = train_bpe(en + ar, 2048)  # bilingual donor (Jais's role)
    ext_tok, _ = extend_tokenizer(base_tok, donor_tok, 1024)
    T, steps = 64, 250
    base = _pretrain(Config.from_name("tiny-llama", vocab_size=base_tok.vocab_size, block_size=T),
                     _blocks(base_tok, en, T), steps)
    donor = _pretrain(Config.from_name("tiny-jais", vocab_size=donor_tok.vocab_size, block_size=T),
                      _blocks(donor_tok, en + ar, T), steps)
    held_out = _blocks(ext_tok, _corpus(shared_data, "arabic", 20_000, skip=200_000), T)

    @torch.no_grad()
    def arabic_loss(method):
        m = copy.deepcopy(base)
        rep = extend_model(m, base_tok, ext_tok, donor, donor_tok, method=method)
        x = held_out
        return torch.nn.functional.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item(), rep

    proj, rep = arabic_loss("projection")
    mean, _ = arabic_loss("mean")
    mean_cov, _ = arabic_loss("mean_cov")
    print(f"\nArabic loss right after extension ({held_out.numel():,} held-out tokens): projection {proj:.3f}, "
          f"mean {mean:.3f}, mean+cov {mean_cov:.3f}\n{rep.summary()}")
    assert proj < mean
    assert all(m.heldout_r2 > 0 for m in rep.matrices)


@pytest.mark.data
def test_adapt_init_on_the_real_llama2_base_keeps_english_logits(shared_data, fixtures_dir, tmp_path, capsys):
    """The Jais-adapted recipe end to end on the real 32k Llama-2-style tokenizer: Arabic tokens learned on the
    shared corpus (`dhad tokenizer extend --learn-from`), then `dhad adapt init` (projected init from a donor
    model) of a tiny Llama: on English text the logits of every old token are exactly the base model's."""
    from dhad.cli import main
    from dhad.tokenizer import learn_donor, load_tokenizer

    base_tok = load_tokenizer(fixtures_dir / "tokenizers" / "llama2-style")
    ar = [t for t in read_texts(shared_data / "corpus" / "arabic" / "saudinewsnet_2015-07-23_and_25.jsonl",
                                max_chars=1_000_000)]
    donor_tok = learn_donor(base_tok, ar, 1500)
    dhad.save_model(_model("tiny-llama", base_tok.vocab_size, seed=1), tmp_path / "base", tokenizer=base_tok)
    dhad.save_model(_model("tiny-llama", donor_tok.vocab_size, seed=2), tmp_path / "donor", tokenizer=donor_tok)
    ext, rep = extend_tokenizer(base_tok, donor_tok, 1500)
    ext.save(tmp_path / "ext")
    assert main(["adapt", "init", "--base", str(tmp_path / "base"), "--donor", str(tmp_path / "donor"),
                 "--tokenizer", str(tmp_path / "ext"), "--out", str(tmp_path / "adapted")]) == 0
    assert "projection init: vocab 32000 -> 33500" in capsys.readouterr().out
    base, adapted = dhad.load_model(tmp_path / "base"), dhad.load_model(tmp_path / "adapted")
    assert load_tokenizer(tmp_path / "adapted").vocab_size == adapted.config.vocab_size == 33500
    en = "The student went to school in the morning and wrote the lesson in his notebook."
    ids = base_tok.encode(en, add_special_tokens=True)
    assert ext.encode(en, add_special_tokens=True) == ids  # English: the same ids under both tokenizers
    with torch.no_grad():
        old, new = base(torch.tensor([ids])), adapted(torch.tensor([ids]))
    assert torch.equal(new[..., :32000], old)
    # and Arabic text uses the new ids, whose rows came through the map
    assert max(ext.encode(ar[0])) >= 32000 and not torch.equal(adapted.wte.weight[32000:], adapted.wte.weight[32000:33500].mean(0).expand(1500, -1))
