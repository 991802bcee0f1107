"""Training on the real corpus (../shared/data/corpus) with tiny models: the loss falls, adapt stage 1
leaves the backbone bit-identical, an interrupted run resumes to the same loss sequence, SIGTERM leaves a
usable checkpoint, SFT counts exactly the assistant tokens, bad data gives clear errors, plots render."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dhad.config import Config
from dhad.data.shards import Example, ShardError, ShardWriter, pack_examples
from dhad.model import Transformer
from dhad.train.loop import TrainError, train
from dhad.train.recipe import parse_recipe

pytestmark = [pytest.mark.data, pytest.mark.one_thread]  # every test here trains on ../shared/data/corpus
REPO = Path(__file__).resolve().parents[1]
VOCAB = 512


@pytest.fixture(scope="session")
def corpus(shared_data, tmp_path_factory):
    """English (Shakespeare) and Arabic (Wikipedia paragraphs) pretrain shards + SFT shards made from the
    corpus with a 512-token BPE trained here; train and validation splits."""
    from dhad.tokenizer import read_texts, train_bpe
    c = shared_data / "corpus"
    out = tmp_path_factory.mktemp("train_corpus")
    en = list(itertools.islice(read_texts(c / "english" / "tinyshakespeare.txt"), 4000))
    ar = list(itertools.islice(read_texts(c / "arabic" / "wikipedia_paragraphs_xquad_arcd.jsonl"), 500))
    tok = train_bpe(en[:2000] + ar[:200], VOCAB)
    tok.save(out / "tokenizer")
    for name, lines, k in (("en", en, 20), ("ar", ar, 2)):
        docs = ["\n".join(lines[i:i + k]) for i in range(0, len(lines), k)]
        n_val = max(4, len(docs) // 20)
        for split, part in (("validation", docs[:n_val]), ("train", docs[n_val:])):
            with ShardWriter(out / name, split, "pretrain", vocab_size=VOCAB, eos_token_id=0,
                             tokenizer_hash=tok.hash()) as w:
                for d in part:
                    w.add(tok.encode(d), source=name)
    # SFT: instruction -> answer pairs from the parallel corpus ("translate" prompts), prompt masked.
    lines = (c / "parallel" / "tatoeba_en_ar_arbml.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(x) for x in lines[:400]]
    exs = []
    for r in rows:
        p, a = tok.encode(f"Translate to Arabic: {r['en']}\nAnswer:"), tok.encode(" " + r["ar"]) + [0]
        exs.append(Example(ids=p + a, mask=[0] * len(p) + [1] * len(a)))
    for split, part in (("validation", exs[:40]), ("train", exs[40:])):
        with ShardWriter(out / "sft", split, "sft", vocab_size=VOCAB, eos_token_id=0, seq_len=96, packed=True,
                         tokenizer_hash=tok.hash()) as w:
            for t, m, s in pack_examples(part, 96, 0):
                w.add(t, mask=m, segments=s)
    return out


def _recipe(**kw) -> dict:
    d = {"type": "pretrain", "seed": 3, "model": {"preset": "tiny-jais"}, "tokenizer": "tokenizer",
         "data": {"sources": {"en": "en", "ar": "ar"}},
         "stages": [{"name": "main", "mix": {"en": 2, "ar": 1}}],
         "optimizer": {"lr": 1e-2, "weight_decay": 0.1}, "schedule": {"warmup_steps": 5, "total_steps": 20, "min_lr": 1e-3},
         "batch": {"micro_batch_size": 4, "global_batch_size": 8, "seq_len": 64}, "precision": "fp32",
         "eval_every": 0, "eval_batches": 2, "peak_flops": 1e12}
    for k, v in kw.items():
        d[k] = v
    return d


def test_validation_loss_falls_on_the_corpus(corpus, tmp_path, capsys):
    res = train(parse_recipe(_recipe(
        schedule={"warmup_steps": 5, "total_steps": 80, "min_lr": 1e-3},
        stages=[{"name": "english", "tokens": 6000, "mix": {"en": 1}}, {"name": "bilingual", "mix": {"en": 1, "ar": 1}}],
        context=[{"seq_len": 32, "until_step": 20}, {"seq_len": 64}], eval_every=40, eval_batches=4)),
        run_dir=tmp_path / "run", data_root=corpus, progress=False)
    first, last = res.evals[0], res.evals[-1]
    with capsys.disabled():
        print(f"\n[tiny-jais on corpus] val loss {first['val_loss']:.3f} -> {last['val_loss']:.3f} "
              f"(en {first['val_loss_by_source']['en']:.3f} -> {last['val_loss_by_source']['en']:.3f}, "
              f"ar {first['val_loss_by_source']['ar']:.3f} -> {last['val_loss_by_source']['ar']:.3f}); "
              f"train loss {res.losses[0][1]:.3f} -> {res.losses[-1][1]:.3f}")
    assert first["step"] == 0 and last["step"] == 80
    assert first["val_loss"] > 6.0  # untrained: about ln(512) = 6.24
    assert last["val_loss"] < first["val_loss"] - 1.5
    assert all(v < first["val_loss_by_source"][k] - 1.0 for k, v in last["val_loss_by_source"].items())
    # the final model directory loads with the public API and has the tokenizer
    import dhad
    m = dhad.load_model(res.model_dir)
    tok = dhad.load_tokenizer(res.model_dir)
    x = torch.tensor([tok.encode("To be, or not to be")])
    torch.testing.assert_close(m(x), res.model.eval()(x), rtol=1e-5, atol=1e-5)
    # mixture accounting: the first stage saw only English, budgets honoured, totals = tokens trained
    mix = json.loads((res.run_dir / "mixture.json").read_text())["stages"]
    assert mix["english"]["ar"]["tokens"] == 0 and 6000 <= mix["english"]["en"]["tokens"] < 6000 + 8 * 32
    assert abs(mix["bilingual"]["en"]["seqs"] - mix["bilingual"]["ar"]["seqs"]) <= 1
    steps = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["event"] == "step"]
    assert sum(v["tokens"] for v in mix["total"].values()) == steps[-1]["tokens"]
    assert {"loss", "lr", "tokens_per_s", "mfu", "grad_norm", "seq_len", "stage"} <= set(steps[-1])
    for r in (steps[5], steps[-1]):  # MFU = model FLOPs/token (6N + attention) x tokens/s / peak (given: 1e12)
        flops = Config.from_name("tiny-jais").flops_per_token(r["seq_len"])
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / 1e12, rel=1e-9)
    assert [r["seq_len"] for r in steps[:21:20]] == [32, 64]  # progressive context extension
    # dhad plot renders the curves
    from dhad.cli import main
    assert main(["plot", str(res.run_dir)]) == 0
    for png in ("loss.png", "lr.png", "throughput.png"):
        assert (res.run_dir / png).stat().st_size > 5000


def test_adapt_stage1_leaves_backbone_bit_identical(corpus, tmp_path):
    r = _recipe(type="adapt", model={"preset": "tiny-llama"}, precision="bf16", schedule={"warmup_steps": 2},
                stages=[{"name": "embeddings", "tokens": 4 * 8 * 64, "mix": {"en": 1, "ar": 1}, "trainable": "embeddings"},
                        {"name": "all", "tokens": 2 * 8 * 64, "mix": {"en": 1, "ar": 1}, "trainable": "all"}])
    init = Transformer(Config.from_name("tiny-llama")).init_weights(3).state_dict()
    res = train(parse_recipe(r), run_dir=tmp_path / "a", data_root=corpus, stop_at=4, progress=False)
    assert res.interrupted and res.step == 4
    after1 = {k: v.detach().clone() for k, v in res.model.state_dict().items()}
    for k, v in init.items():
        if k.startswith(("wte.", "lm_head.")):
            assert not torch.equal(v, after1[k]), f"{k} did not train in stage 1"
        else:
            assert torch.equal(v, after1[k]), f"backbone weight {k} changed in stage 1"
    res2 = train(parse_recipe(r), run_dir=tmp_path / "a", data_root=corpus, resume=True, progress=False)
    assert res2.step == 6 and not res2.interrupted
    after2 = res2.model.state_dict()
    assert not torch.equal(after2["h.0.attn.qkv.weight"], init["h.0.attn.qkv.weight"])  # stage 2 trains all


def test_resume_gives_the_uninterrupted_loss_sequence(corpus, tmp_path):
    kw = dict(context=[{"seq_len": 32, "until_step": 6}, {"seq_len": 64}],
              stages=[{"name": "en", "tokens": 8 * 32 * 4, "mix": {"en": 1}}, {"name": "mix", "mix": {"en": 1, "ar": 3}}],
              schedule={"warmup_steps": 3, "total_steps": 12, "min_lr": 1e-3})
    full = train(parse_recipe(_recipe(**kw)), run_dir=tmp_path / "full", data_root=corpus, progress=False)
    part = train(parse_recipe(_recipe(**kw)), run_dir=tmp_path / "part", data_root=corpus, stop_at=5, progress=False)
    assert part.interrupted and part.step == 5 and part.checkpoint.name == "step_00000005"
    rest = train(parse_recipe(_recipe(**kw)), run_dir=tmp_path / "part", data_root=corpus, resume=True, progress=False)
    assert [s for s, _ in part.losses + rest.losses] == list(range(1, 13))
    assert [x for _, x in part.losses + rest.losses] == [x for _, x in full.losses]  # bit for bit
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, rest.model.state_dict()[k]), k
    assert rest.mixture == full.mixture
    # metrics.jsonl of the resumed run holds each step once
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["event"] == "step"]
    assert steps == list(range(1, 13))
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train(parse_recipe(_recipe(**kw)), run_dir=tmp_path / "part", data_root=corpus, progress=False)


def _step_records(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["event"] == "step"], recs


def test_a_corrupt_checkpoint_falls_back_to_the_one_before(corpus, tmp_path, capsys):
    """The newest checkpoint's DCP shard is garbage: resume warns naming the file, sets that checkpoint
    aside (.corrupt-step_N, kept) and continues from the one before -- the same losses as an
    uninterrupted run, each step once in metrics.jsonl."""
    kw = dict(schedule={"warmup_steps": 2, "total_steps": 8, "min_lr": 1e-3}, checkpoint_every=2)
    full = train(parse_recipe(_recipe(**kw)), run_dir=tmp_path / "full", data_root=corpus, progress=False,
                 save_final=False)
    part = train(parse_recipe(_recipe(**kw)), run_dir=tmp_path / "part", data_root=corpus, stop_at=6, progress=False)
    cks = tmp_path / "part" / "checkpoints"
    assert sorted(p.name for p in cks.glob("step_*")) == ["step_00000004", "step_00000006"]
    shard = next((cks / "step_00000006" / "train_state").glob("*.distcp"))
    shard.write_bytes(b"\x00garbage" * 100)
    capsys.readouterr()
    rest = train(parse_recipe(_recipe(**kw)), run_dir=tmp_path / "part", data_root=corpus, resume=True,
                 progress=False, save_final=False)
    out = capsys.readouterr().out
    assert "warning: cannot resume from" in out and "step_00000006/train_state: cannot read" in out
    assert "moved it to .corrupt-step_00000006" in out
    assert (cks / ".corrupt-step_00000006" / "train_state" / shard.name).read_bytes() == b"\x00garbage" * 100
    assert [s for s, _ in rest.losses] == [5, 6, 7, 8]
    assert part.losses[:4] + rest.losses == full.losses  # bit for bit
    steps, _ = _step_records(tmp_path / "part")
    assert [r["step"] for r in steps] == list(range(1, 9))


def test_unreadable_or_foreign_checkpoints_name_the_file(corpus, tmp_path, capsys):
    """Only checkpoint has a garbage RNG file: `dhad train --resume` exits 2 naming rng/rank_00000.json,
    with a hint and no traceback. A readable checkpoint of another model is an error, not set aside."""
    from dhad.cli import main as dhad_main
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(schedule={"warmup_steps": 1, "total_steps": 4, "min_lr": 1e-3})))
    train(recipe, run_dir=tmp_path / "run", data_root=corpus, stop_at=2, progress=False)
    ck = tmp_path / "run" / "checkpoints" / "step_00000002"
    rng = ck / "rng" / "rank_00000.json"
    good = rng.read_text()
    rng.write_text('{"torch": "not base64", "python": "(1, 2)"}')
    capsys.readouterr()
    args = ["train", "--recipe", str(recipe), "--data", str(corpus), "--out", str(tmp_path / "run"), "--resume",
            "--no-progress"]
    assert dhad_main(args) == 2
    err = capsys.readouterr().err
    assert "step_00000002/rng/rank_00000.json: not a saved RNG state" in err
    assert "no readable checkpoint" in err and "start a new run" in err and "Traceback" not in err
    aside = ck.with_name(".corrupt-step_00000002")
    assert (aside / "rng" / "rank_00000.json").is_file() and not ck.exists()
    aside.rename(ck)
    rng.write_text(good)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(_recipe(model={"preset": "tiny-llama"},
                                            schedule={"warmup_steps": 1, "total_steps": 4, "min_lr": 1e-3})))
    with pytest.raises(TrainError, match=r"step_00000002 was saved for another model \(.*saved vs .* here\)"):
        train(other, run_dir=tmp_path / "run", data_root=corpus, resume=True, progress=False)
    assert ck.is_dir()  # a foreign checkpoint is not corrupt: left where it was
    res = train(recipe, run_dir=tmp_path / "run", data_root=corpus, resume=True, progress=False, save_final=False)
    assert [s for s, _ in res.losses] == [3, 4]


def test_a_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(corpus, tmp_path):
    """A run killed before its first checkpoint leaves metrics.jsonl but nothing to resume: the rerun
    starts over, and its metrics hold one start event and each step once."""
    import shutil
    kw = dict(schedule={"warmup_steps": 1, "total_steps": 4, "min_lr": 1e-3})
    train(parse_recipe(_recipe(**kw)), run_dir=tmp_path / "run", data_root=corpus, stop_at=2, progress=False)
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if killed (SIGKILL) before any checkpoint
    res = train(parse_recipe(_recipe(**kw)), run_dir=tmp_path / "run", data_root=corpus, progress=False,
                save_final=False)
    steps, recs = _step_records(tmp_path / "run")
    assert [r["event"] for r in recs].count("start") == 1
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [(r["step"], r["loss"]) for r in steps] == res.losses


def test_eval_sequences_make_val_loss_independent_of_micro_batch(corpus, tmp_path):
    """eval_sequences fixes the validation set, so runs with other micro batch sizes (same global
    batch) report the same val_loss; eval_batches alone scales the set with the micro batch."""
    kw = dict(schedule={"warmup_steps": 1, "total_steps": 2, "min_lr": 1e-3}, eval_every=2)
    evals = {}
    for mbs in (2, 4):
        r = _recipe(**kw, eval_sequences=6, batch={"micro_batch_size": mbs, "global_batch_size": 8, "seq_len": 64})
        evals[mbs] = train(parse_recipe(r), run_dir=tmp_path / f"m{mbs}", data_root=corpus, progress=False,
                           save_final=False).evals
    assert [e["step"] for e in evals[2]] == [0, 2] == [e["step"] for e in evals[4]]
    assert evals[2][0]["val_loss"] == pytest.approx(evals[4][0]["val_loss"], rel=1e-6)   # same model, same rows
    assert evals[2][-1]["val_loss"] == pytest.approx(evals[4][-1]["val_loss"], rel=1e-4)  # same run (accumulation)
    with pytest.raises(Exception, match="eval_sequences: must be >= 0"):
        parse_recipe(_recipe(eval_sequences=-1))


def test_time_budget_checkpoints_and_resumes(corpus, tmp_path):
    """--max-seconds: the step that ends past the budget checkpoints and stops; --resume continues the
    same run to the end (losses equal an uninterrupted run's)."""
    from dhad.cli import main as dhad_main
    kw = dict(schedule={"warmup_steps": 2, "total_steps": 8, "min_lr": 1e-3})
    full = train(parse_recipe(_recipe(**kw)), run_dir=tmp_path / "full", data_root=corpus, progress=False,
                 save_final=False)
    part = train(parse_recipe(_recipe(**kw)), run_dir=tmp_path / "part", data_root=corpus, progress=False,
                 max_seconds=0.0)
    assert part.interrupted and part.timed_out and part.signal is None and part.step == 1
    assert part.checkpoint.name == "step_00000001" and part.model_dir is None
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(**kw)))
    assert dhad_main(["train", "--recipe", str(recipe), "--data", str(corpus), "--out", str(tmp_path / "part"),
                      "--resume", "--max-seconds", "600", "--no-progress"]) == 0
    steps = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in steps if r["event"] == "step"]
    assert losses == full.losses


def test_sigterm_leaves_a_usable_checkpoint(corpus, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(schedule={"warmup_steps": 2, "total_steps": 100000, "min_lr": 1e-3})))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dhad", "train", "--recipe", str(recipe), "--data", str(corpus),
                             "--out", str(run), "--no-progress"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.is_file() and metrics.read_text().count('"event": "step"') >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stdout.read().decode()}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out.decode()
    from dhad.train.checkpointing import latest_checkpoint
    ck = latest_checkpoint(run)
    assert ck is not None and (ck / "meta.json").is_file()
    step = json.loads((ck / "meta.json").read_text())["step"]
    assert step >= 3
    assert not list((run / "checkpoints").glob(".tmp-*"))  # nothing half-written left behind
    res = train(recipe, run_dir=run, data_root=corpus, resume=True, stop_at=step + 2, progress=False)
    assert [s for s, _ in res.losses] == [step + 1, step + 2]
    assert all(np.isfinite(x) and x < 6.5 for _, x in res.losses)


def test_sft_loss_counts_exactly_the_assistant_tokens(corpus, tmp_path):
    """The trainer's packed SFT loss equals the mean over examples run one by one through the model with
    the HF label convention (labels = token where mask, model shifts) — independent of packing code."""
    from dhad.data.shards import ShardSet, row_examples
    from dhad.train.objectives import get_objective
    obj = get_objective("sft")
    ss = ShardSet.open(corpus / "sft", "validation")
    rows = [ss.row(i) for i in range(3)]
    model = Transformer(Config.from_name("tiny-llama")).init_weights(1)
    with torch.no_grad():
        batch = obj.collate(rows, "cpu")
        s, n = obj.loss(model, batch)
        tot, cnt = 0.0, 0
        for t, m, seg in rows:
            for ex in row_examples(t, m, seg):
                ids = torch.tensor([ex.ids])
                labels = torch.where(torch.tensor([ex.mask]) == 1, ids, -100)
                logits = model(ids)
                lp = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100,
                                                       reduction="sum")
                tot += float(lp)
                cnt += int((labels[0, 1:] != -100).sum())
    assert int(n) == cnt == int(obj.count(batch))
    assert float(s) == pytest.approx(tot, rel=1e-5)
    # and a short SFT run learns
    res = train(parse_recipe(_recipe(type="sft", data={"sources": {"chat": "sft"}}, stages=[],
                                     batch={"micro_batch_size": 4, "global_batch_size": 8},
                                     schedule={"warmup_steps": 3, "total_steps": 25, "min_lr": 1e-3},
                                     eval_every=25, eval_batches=2)),
                run_dir=tmp_path / "sft", data_root=corpus, progress=False)
    assert res.evals[-1]["val_loss"] < res.evals[0]["val_loss"] - 1.0


def test_bad_data_gives_clear_errors(corpus, tmp_path):
    import shutil
    bad = tmp_path / "data"
    shutil.copytree(corpus, bad)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe()))
    # a missing shard directory
    shutil.rmtree(bad / "ar")
    with pytest.raises(TrainError, match=r"data.sources.ar: shard directory .*/ar does not exist"):
        train(recipe, run_dir=tmp_path / "r1", data_root=bad, progress=False)
    # a missing shard file
    shutil.copytree(corpus / "ar", bad / "ar")
    (bad / "en" / "train" / "tokens_00000.bin").unlink()
    with pytest.raises(ShardError, match=r"en/train/tokens_00000.bin: missing shard file"):
        train(recipe, run_dir=tmp_path / "r2", data_root=bad, progress=False)
    # a corrupt index, through the CLI: exit 2 and a one-line message naming the file
    shutil.rmtree(bad / "en")
    shutil.copytree(corpus / "en", bad / "en")
    (bad / "en" / "train" / "index.json").write_text('{"format": "dhad-shards-v1", "shards": [')
    proc = subprocess.run([sys.executable, "-m", "dhad", "train", "--recipe", str(recipe), "--data", str(bad),
                           "--out", str(tmp_path / "r3")], cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "en/train/index.json: invalid JSON" in proc.stderr and "Traceback" not in proc.stderr
    # a tokenizer that does not match the shards
    shutil.rmtree(bad / "en")
    shutil.copytree(corpus / "en", bad / "en")
    from dhad.tokenizer import train_bpe
    train_bpe(["something else entirely"] * 50, 300).save(bad / "tokenizer")
    with pytest.raises(TrainError, match="does not match the shards"):
        train(recipe, run_dir=tmp_path / "r4", data_root=bad, progress=False)
    # truncated shard file: the size check names it
    shutil.rmtree(bad / "tokenizer")
    shutil.copytree(corpus / "tokenizer", bad / "tokenizer")
    f = bad / "ar" / "train" / "tokens_00000.bin"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ShardError, match=r"tokens_00000.bin: 100 bytes, index says"):
        train(recipe, run_dir=tmp_path / "r5", data_root=bad, progress=False)


def test_tune_malloc_applies_glibc_settings_once_and_can_be_disabled():
    """`dhad train` on CPU keeps freed activation buffers' pages (dhad.utils.tune_malloc): every mallopt
    call must be accepted by glibc (a rejected value returns False), and DHAD_MALLOC_TUNING=0 skips it."""
    import platform
    code = "from dhad.utils import tune_malloc; print(tune_malloc(), tune_malloc())"
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ([str(on_glibc)] * 2)
    env = {**os.environ, "DHAD_MALLOC_TUNING": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["False", "False"]


def test_fused_clip_step_equals_clip_grad_norm_then_step():
    """train_step's clipping folded into the fused AdamW (`grad_scale`) and computed with dot products
    gives the same norm and the same parameters as clip_grad_norm_ followed by step, clipped or not."""
    from dhad.train.loop import _clip_into_fused_step
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(30, 20)), torch.nn.Parameter(torch.randn(7)),
           torch.nn.Parameter(torch.randn(20, 30).t())]  # a non-contiguous one takes the norm kernel
    got = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    for clip in (0.5, 1e6):
        o_ref, o_got = torch.optim.AdamW(ref, lr=1e-2, fused=True), torch.optim.AdamW(got, lr=1e-2, fused=True)
        for _ in range(3):
            for a, b in zip(ref, got):
                a.grad = torch.randn_like(a)
                b.grad = a.grad.clone()
            n_ref = float(torch.nn.utils.clip_grad_norm_(ref, clip))
            o_ref.step()
            n_got = _clip_into_fused_step(o_got, [p.grad for p in got], clip)
            assert n_got == pytest.approx(n_ref, rel=1e-6)
            assert not hasattr(o_got, "grad_scale")
            for a, b in zip(ref, got):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        assert n_ref > 0.5  # the first case clipped
