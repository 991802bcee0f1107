"""`dhad data prepare` as datatrove stages: byte-identical to the sequential reference (dhad.data.reference,
the single-process pipeline it replaced) for 1 task and for N tasks, near-dedup decisions equal to the
sequential Deduplicator's, kill -9 and resume, and the Slurm / Ray executors built from the example configs
(Slurm run through a fake sbatch, Ray task by task without a cluster)."""
from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from dhad.data import prepare as prep
from dhad.data import steps
from dhad.data.dedup import DedupConfig, Deduplicator, bucket_layout, bucket_values, exact_key, first_occurrence, signature
from dhad.data.reference import reference_prepare
from dhad.data.shards import ShardSet
from dhad.tokenizer import train_bpe

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "docs" / "examples"
WORDS = ("the of and to in that with have be city river market people history trade travel book student year "
         "great small old new north south mountain village road water light house garden school teacher morning "
         "evening story letter friend family summer winter green stone bridge").split()
AR = ("في من على إلى أن عن مع هذا هذه التي كان المدينة النهر السوق الناس التاريخ التجارة الكتاب الطالب السنة "
      "الجبل القرية الطريق الماء البيت الحديقة المدرسة المعلم الصباح المساء القصة الرسالة الصديق العائلة").split()


def doc(rng, words, n_sent):
    return " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 14))) + "." for _ in range(n_sent))


def nudge(text, k):
    """``text`` with word k replaced: a near duplicate (Jaccard of 5-grams ~0.85 for these lengths)."""
    w = text.split()
    w[k] = "bridge" if w[k] != "bridge" else "stone"
    return " ".join(w)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three sources in four files, with bad rows, exact duplicates (also across files), a near-duplicate
    chain a ~ b ~ c (b and c in another file than a: other tasks), long documents cut in pieces."""
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("pipe")
    en = [doc(rng, WORDS, rng.randint(4, 9)) for _ in range(96)]
    ar = [doc(rng, AR, rng.randint(4, 9)) for _ in range(50)]
    a = next(t for t in en[10:60] if len(t) < 500)    # not cut by max_doc_chars=600
    b = nudge(a, 10)
    c = nudge(b, 40)
    (root / "english").mkdir()
    rows = [json.dumps({"text": t}) for t in en[:60]]
    rows[7:7] = ['{"text": "unterminated', json.dumps({"text": en[0]}), "", json.dumps({"text": 12345}),
                 json.dumps({"text": "too short"}), json.dumps({"text": en[1].upper()})]
    (root / "english" / "web.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    more = [json.dumps({"text": t}) for t in en[60:80]] + [json.dumps({"text": x}) for x in (b, en[5], c)]
    more.append(json.dumps({"text": "\n\n".join(en[90:96])}))          # long: cut into pieces
    (root / "english" / "web2.jsonl").write_bytes(("\n".join(more) + "\n").encode() + b'{"text": "bad \xff"}\n')
    (root / "arabic").mkdir()
    (root / "arabic" / "news.txt").write_text("\n\n".join(ar + [ar[2]]) + "\n", encoding="utf-8")
    (root / "code").mkdir()
    (root / "code" / "snippets.csv").write_text("id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(en[80:90])),
                                                encoding="utf-8")
    tok = root.parent / (root.name + "_tok")
    train_bpe(en + ar, 400).save(tok)
    return {"root": root, "tok": str(tok), "chain": (a, b, c)}


def cfg(corpus, out, **kw):
    kw.setdefault("workers", 1)
    return prep.PrepareConfig(inputs=[str(corpus["root"]), str(corpus["root"] / "gone.jsonl")],
                              data_root=str(corpus["root"]), tokenizer=corpus["tok"], out=str(out), progress=False,
                              val_fraction=0.15, max_doc_chars=600, **kw)


def output_bytes(out) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for split in ("train", "validation")
            for p in sorted((Path(out) / split).iterdir())}


def same_report(a: dict, b: dict) -> None:
    for k in ("inputs", "documents", "by_source", "cleaning", "mixture", "mixture_excluded_sources", "splits"):
        assert a[k] == b[k], k
    assert dict(a["rules"]) == dict(b["rules"])


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    return out, reference_prepare(cfg(corpus, out))


def test_one_task_and_n_tasks_write_the_reference_bytes(corpus, reference, tmp_path, monkeypatch):
    ref_out, ref = reference
    assert ref["rules"]["exact_duplicate"]["docs"] == 4 and ref["rules"]["near_duplicate"]["docs"] >= 1
    assert ref["documents"] > ref["inputs"]["records"]                  # the long one was cut
    assert ref["inputs"]["skipped"] == {"malformed_json": 1, "empty": 1, "not_text": 1, "invalid_utf8": 1,
                                        "missing_file": 1}
    expect = output_bytes(ref_out)
    one = prep.prepare(cfg(corpus, tmp_path / "one", tasks=1))
    assert output_bytes(tmp_path / "one") == expect
    same_report(one, ref)
    # 5 tasks with web.jsonl cut into byte ranges (tasks start mid-file); the chain a ~ b ~ c spans tasks
    monkeypatch.setattr(prep, "MIN_UNIT_BYTES", 1000)
    p = prep.plan(cfg(corpus, tmp_path / "n", tasks=5))
    assert any(len(u) == 3 for u in p.units) and len(set(p.bounds)) > 3
    many = prep.prepare(cfg(corpus, tmp_path / "n", tasks=5))
    assert output_bytes(tmp_path / "n") == expect
    same_report(many, ref)
    assert many["inputs"]["skipped_examples"] == ref["inputs"]["skipped_examples"]  # where, in input order


def test_mixture_and_dedup_switches_match_the_reference(corpus, tmp_path):
    for kw in ({"mix": {"english": 3, "arabic": 1}, "total_tokens": 30_000, "seed": 3},
               {"dedup": DedupConfig(near=False)}, {"dedup": DedupConfig(exact=False, near=False)}):
        ref = reference_prepare(cfg(corpus, tmp_path / "ref", **kw))
        new = prep.prepare(cfg(corpus, tmp_path / "new", tasks=3, **kw))
        assert output_bytes(tmp_path / "new") == output_bytes(tmp_path / "ref"), kw
        same_report(new, ref)


def test_report_holds_datatrove_stats(corpus, reference, tmp_path):
    _, ref = reference
    rep = prep.prepare(cfg(corpus, tmp_path / "o", tasks=2))
    stages = rep["datatrove"]
    assert set(stages) == {"process", "buckets", "dedup"}

    def stat(stage, step, label):   # datatrove writes a counter as its total, or {"total": ...}
        x = next(s for s in stages[stage] if step in s["name"])["stats"].get(label, 0)
        return x["total"] if isinstance(x, dict) else x

    filtered = {r: v["docs"] for r, v in rep["rules"].items() if r not in ("kept", "exact_duplicate", "near_duplicate")}
    assert filtered and all(stat("process", "quality filters", f"dropped_{r}") == n for r, n in filtered.items())
    assert stat("dedup", "stage 3", "near_duplicate") == rep["rules"]["near_duplicate"]["docs"]
    assert stat("dedup", "stage 3", "exact_duplicate") == rep["rules"]["exact_duplicate"]["docs"]
    assert stat("process", "readers", "records") == rep["inputs"]["records"] == ref["inputs"]["records"]
    assert stat("process", "staged", "staged") == sum(v["docs"] for r, v in rep["rules"].items() if r not in filtered)


# ---------------------------------------------------------------------------------------------
# Near dedup: the bucket formulation equals the sequential LSH


def test_first_occurrence_over_buckets_equals_deduplicator():
    """Documents with near-duplicate chains and exact copies: datatrove-style buckets (documents sharing a
    bucket value, as chains) + first_occurrence == Deduplicator fed in order — and a cluster rule would
    differ on the chain (it drops c, the sequential rule keeps it)."""
    rng = random.Random(1)
    base = [doc(rng, WORDS, 6) for _ in range(40)]
    docs = list(base)
    for i in range(0, 40, 3):
        b = nudge(base[i], 12)
        docs += [b, nudge(b, 50), base[i].upper(), nudge(base[i], 30)]
    rng.shuffle(docs)
    cfg_ = DedupConfig()
    d = Deduplicator(cfg_)
    expect = {i: r for i, t in enumerate(docs) if (r := d.check(exact_key(t), signature(t, cfg_))) is not None}
    n, width, exact = bucket_layout(cfg_)
    vals = [bucket_values(t, cfg_).reshape(n, width) for t in docs]
    pairs = []
    for bucket in range(n):   # what datatrove's bucket stage writes: consecutive equal values, sorted
        order = sorted(range(len(docs)), key=lambda i: (tuple(vals[i][bucket]), i))
        pairs += [(bucket, a, b) for a, b in zip(order, order[1:]) if (vals[a][bucket] == vals[b][bucket]).all()]
    assert first_occurrence(pairs, exact) == expect
    assert "exact_duplicate" in expect.values() and "near_duplicate" in expect.values()


def test_chain_keeps_its_far_end(corpus, tmp_path):
    """a ~ b ~ c with a !~ c: the sequential rule drops b (near a) and keeps c (b was dropped, never a
    reference) — in the datatrove pipeline too, though a, b and c sit in different tasks."""
    a, b, c = corpus["chain"]
    cfg_ = DedupConfig()
    d = Deduplicator(cfg_)
    seq = [d.check(exact_key(t), signature(t, cfg_)) for t in (a, b, c)]
    assert seq == [None, "near_duplicate", None]
    rep = prep.prepare(cfg(corpus, tmp_path / "o", tasks=4))
    from dhad.tokenizer import load_tokenizer
    tok = load_tokenizer(corpus["tok"])
    kept = set()
    for split in ("train", "validation"):
        ss = ShardSet.open(tmp_path / "o", split)
        kept |= {tok.decode(ss.doc(i)[:-1].tolist()) for i in range(ss.n_docs)}
    from dhad.data.clean import clean_text
    assert clean_text(a)[0] in kept and clean_text(c)[0] in kept and clean_text(b)[0] not in kept
    assert rep["rules"]["near_duplicate"]["docs"] >= 1


# ---------------------------------------------------------------------------------------------
# kill -9 and resume

KILLER = textwrap.dedent("""
    import json, os, signal, sys
    from dhad.data import prepare as prep, steps, shards
    where, kw = sys.argv[1], json.loads(sys.argv[2])
    if where == "process":          # die in the middle of task 2 of the first stage
        orig = steps.Tokenize.run
        def run(self, data, rank=0, world_size=1):
            for i, d in enumerate(orig(self, data, rank, world_size)):
                if rank == 2 and i == 3:
                    os.killpg(0, signal.SIGKILL)   # the run and its helper processes (datatrove's manager)
                yield d
        steps.Tokenize.run = run
    else:                           # die in the merge, after train is published, before validation
        orig = shards.ShardWriter.close
        def close(self):
            if self.split == "validation":
                os.killpg(0, signal.SIGKILL)
            return orig(self)
        shards.ShardWriter.close = close
    prep.prepare(prep.PrepareConfig(**kw))
""")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["process", "merge"])
def test_kill_9_then_rerun_skips_finished_tasks_and_writes_the_same_output(corpus, reference, tmp_path, where,
                                                                           monkeypatch):
    ref_out, _ = reference
    logs, out = tmp_path / "logs", tmp_path / "out"
    kw = dict(inputs=[str(corpus["root"]), str(corpus["root"] / "gone.jsonl")], data_root=str(corpus["root"]),
              tokenizer=corpus["tok"], out=str(out), progress=False, val_fraction=0.15, max_doc_chars=600,
              workers=1, tasks=4, logging_dir=str(logs))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "killed.log", "wb") as log:
        r = subprocess.run([sys.executable, "-c", KILLER, where, json.dumps(kw)], env=env, stdout=log, stderr=log,
                           timeout=300, start_new_session=True)
    assert r.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    done = sorted(p.name for p in (logs / "process" / "completions").iterdir())
    if where == "process":
        assert done == ["00000", "00001"] and not (out / "train").exists()
    else:
        assert done == ["00000", "00001", "00002", "00003"] and (out / "train").exists()
        assert not (out / "report.json").exists() and list(out.glob(".validation.tmp-*"))
    stamps = {p: p.stat().st_mtime_ns for p in (logs / "process" / "stats").iterdir()}
    ran = []
    orig = steps.ReadDocuments.run

    def spy(self, data=None, rank=0, world_size=1):
        ran.append(rank)
        return orig(self, data, rank, world_size)

    monkeypatch.setattr(steps.ReadDocuments, "run", spy)
    prep.prepare(prep.PrepareConfig(**kw))
    assert ran == ([2, 3] if where == "process" else [])        # finished tasks are not redone
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert output_bytes(out) == output_bytes(ref_out)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "train", "validation"]
    assert not (logs / "work").exists()                           # intermediate files go once the run is done


def test_logging_dir_of_a_finished_run_and_of_another_configuration(corpus, tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    first = prep.prepare(cfg(corpus, tmp_path / "a", tasks=2, logging_dir=str(logs), dedup=DedupConfig(near=False)))
    monkeypatch.setattr(steps.ReadDocuments, "run", None)       # nothing may run again
    assert prep.prepare(cfg(corpus, tmp_path / "a", tasks=2, logging_dir=str(logs),
                            dedup=DedupConfig(near=False))) == first
    monkeypatch.undo()
    with pytest.raises(ValueError, match="another configuration.*seed"):
        prep.prepare(cfg(corpus, tmp_path / "a", tasks=2, logging_dir=str(logs), seed=5,
                         dedup=DedupConfig(near=False)))


# ---------------------------------------------------------------------------------------------
# Executors

def example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))


def test_executors_are_built_from_the_example_configs(corpus, tmp_path):
    from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
    from datatrove.executor.ray import RayPipelineExecutor
    sl = prep.build_executors(cfg(corpus, tmp_path / "o", executor="slurm", tasks=3, workers=50,
                                  logging_dir=str(tmp_path / "logs"), executor_options=example("prepare-slurm.yaml")))
    assert [e.stage for e in sl] == ["process", "buckets", "dedup", "merge"]
    assert all(isinstance(e, SlurmPipelineExecutor) for e in sl)
    assert [e.tasks for e in sl] == [3, 10, 1, 1] and sl[0].workers == 50
    assert [e.depends for e in sl] == [None, *sl[:-1]]
    assert sl[0].partition == "cpu" and sl[0].time == "08:00:00" and sl[0].tasks_per_job == 4
    assert sl[2].mem_per_cpu_gb == 32 and sl[2].cpus_per_task == 2 and sl[0].mem_per_cpu_gb == 4
    assert sl[1].job_name == "dhad-prepare-buckets"
    assert sl[0].get_sbatch_args(2)["account"] == "my-account"
    assert str(sl[3].logging_dir.path).endswith("logs/merge")
    ry = prep.build_executors(cfg(corpus, tmp_path / "o", executor="ray", tasks=3, logging_dir=str(tmp_path / "rl"),
                                  executor_options=example("prepare-ray.yaml")))
    assert all(isinstance(e, RayPipelineExecutor) for e in ry) and [e.tasks for e in ry] == [3, 10, 1, 1]
    assert ry[2].mem_per_cpu_gb == 16 and ry[0].cpus_per_task == 1 and ry[1].depends is ry[0]
    lo = prep.build_executors(cfg(corpus, tmp_path / "o", tasks=3, workers=2), logging_dir=str(tmp_path / "ll"))
    assert all(isinstance(e, LocalPipelineExecutor) for e in lo)
    assert [(e.tasks, e.workers) for e in lo] == [(3, 2), (2, 2), (1, 1), (1, 1)]
    for bad, msg in (({"slurm": {"partition": "x"}}, "needs time"),
                     ({"slurm": {"partition": "x", "time": "1:00:00", "nodez": 1}}, "unknown option.*nodez"),
                     ({"stages": {"tokenize": {}}}, "unknown stage"), ({"sge": {}}, "unknown section")):
        with pytest.raises(prep.ExecutorError, match=msg):
            prep.build_executors(cfg(corpus, tmp_path / "o", executor="slurm", logging_dir=str(tmp_path / "x"),
                                     executor_options=bad))
    with pytest.raises(prep.ExecutorError, match="needs --logging-dir"):
        prep.build_executors(cfg(corpus, tmp_path / "o", executor="ray"))


def test_ray_stages_run_task_by_task_without_a_cluster(corpus, reference, tmp_path):
    """Ray's per-task path (RayPipelineExecutor._run_for_rank: its logging, stats and completions) run for
    every task in stage order, without Ray: the output is the reference's."""
    ref_out, _ = reference
    c = cfg(corpus, tmp_path / "o", executor="ray", tasks=3, logging_dir=str(tmp_path / "logs"),
            executor_options=example("prepare-ray.yaml"))
    for ex in prep.build_executors(c):
        for rank in range(ex.world_size):
            ex._run_for_rank(rank)
        assert len(ex.get_incomplete_ranks()) == 0
    assert output_bytes(tmp_path / "o") == output_bytes(ref_out)


FAKE_SBATCH = """#!{python}
# sbatch stand-in: runs the array job at once (jobs are submitted dependencies first), prints the job id
import os, re, subprocess, sys
args = sys.argv[1:]
script = open(args[-1]).read()
n = int(open(os.environ["FAKE_SLURM_IDS"]).read() or 0) + 1 if os.path.exists(os.environ["FAKE_SLURM_IDS"]) else 1
open(os.environ["FAKE_SLURM_IDS"], "w").write(str(n))
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write(" ".join(args[:-1]) + "\\n" + script + "\\n---\\n")
if "merge_stats" not in script:
    env = dict(os.environ, SLURM_NODELIST="localhost", SLURM_JOB_ID=str(n))
    for a in args[:-1]:
        if a.startswith("--export=ALL,"):
            env.update(kv.split("=", 1) for kv in a[len("--export=ALL,"):].split(","))
    last = int(re.search(r"#SBATCH --array=0-(\\d+)", script).group(1))
    for i in range(last + 1):
        r = subprocess.run(["bash", args[-1]], env=dict(env, SLURM_ARRAY_TASK_ID=str(i)), capture_output=True)
        if r.returncode:
            sys.stderr.write(r.stdout.decode()[-3000:] + r.stderr.decode()[-3000:])
            sys.exit(1)
print(f"Submitted batch job {{n}}")
"""
FAKE_SRUN = "#!/bin/bash\nwhile [[ $1 == -* ]]; do if [[ $1 == -n ]]; then shift 2; else shift; fi; done\nexec \"$@\"\n"
FAKE_SCONTROL = "#!/bin/bash\necho localhost\n"


@pytest.mark.slow
def test_slurm_submission_through_a_fake_sbatch(corpus, reference, tmp_path, monkeypatch):
    """`dhad data prepare --executor slurm` with the example config: datatrove writes each stage's sbatch
    script and submits it with its dependency; a stand-in sbatch runs the arrays at once, so the pickled
    pipelines run exactly as on a cluster (srun, launch_pickled_pipeline, SLURM_ARRAY_TASK_ID) and write
    the reference's bytes."""
    from dhad.cli import main as dhad_main
    ref_out, _ = reference
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH.format(python=sys.executable)), ("srun", FAKE_SRUN),
                       ("scontrol", FAKE_SCONTROL)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(stat.S_IRWXU)
    opts = example("prepare-slurm.yaml")
    opts["slurm"].pop("venv_path")            # the nodes are this machine: this Python, this checkout
    opts["slurm"]["env_command"] = f"export PYTHONPATH={REPO}:$PYTHONPATH"
    opts["stages"]["buckets"]["tasks_per_job"] = 10
    conf = tmp_path / "slurm.yaml"
    conf.write_text(yaml.safe_dump(opts))
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_IDS", str(tmp_path / "ids"))
    monkeypatch.setenv("FAKE_SLURM_LOG", str(tmp_path / "sbatch.log"))
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = ["data", "prepare", "--data", str(corpus["root"]), str(corpus["root"] / "gone.jsonl"), "--tokenizer",
            corpus["tok"], "--out", str(out), "--val-fraction", "0.15", "--executor", "slurm", "--executor-config",
            str(conf), "--tasks", "3", "--logging-dir", str(logs), "--no-progress"]
    assert dhad_main(argv) == 0
    log = (tmp_path / "sbatch.log").read_text()
    assert log.count("launch_pickled_pipeline") == 4 and "--dependency=afterok:" in log
    assert "#SBATCH --partition=cpu" in log and "#SBATCH --account=my-account" in log
    assert "#SBATCH --mem-per-cpu=32G" in log                     # the dedup stage's override
    for stage in ("process", "buckets", "dedup", "merge"):
        assert (logs / stage / "launch_script.slurm").exists()
    local = tmp_path / "local"
    assert dhad_main([*argv[:7], "--out", str(local), "--val-fraction", "0.15", "--tasks", "1", "--workers", "1",
                      "--no-progress"]) == 0
    assert output_bytes(out) == output_bytes(local)
    assert prep.load_report(out)["splits"] == prep.load_report(local)["splits"]


def test_inputs_and_logging_dir_on_an_fsspec_filesystem(corpus, reference, tmp_path):
    """Inputs and the logging/work folder on fsspec's in-memory filesystem (as they would be on s3://):
    the same bytes as the reference."""
    import fsspec
    ref_out, _ = reference
    fs = fsspec.filesystem("memory")
    root = corpus["root"]
    for p in root.rglob("*"):
        if p.is_file():
            fs.pipe(f"/pipe-test/{p.relative_to(root)}", p.read_bytes())
    c = cfg(corpus, tmp_path / "o", tasks=3, logging_dir="memory://pipe-logs")
    c.inputs, c.data_root = ["memory://pipe-test", "memory://pipe-test/gone.jsonl"], None
    rep = prep.prepare(c)
    assert output_bytes(tmp_path / "o") == output_bytes(ref_out)
    assert rep["inputs"]["skipped_examples"]["missing_file"] == ["memory://pipe-test/gone.jsonl"]
    assert fs.exists("/pipe-logs/process/completions/00002") and not fs.exists("/pipe-logs/work")
    with pytest.raises(ValueError, match="local folder"):
        prep.prepare(cfg(corpus, "memory://out"))


def test_cli_errors_are_clear(corpus, tmp_path, capsys):
    from dhad.cli import main as dhad_main
    base = ["data", "prepare", "--data", str(corpus["root"]), "--tokenizer", corpus["tok"], "--no-progress"]
    cases = [
        (["--out", str(tmp_path / "a"), "--executor", "slurm", "--logging-dir", str(tmp_path / "l")], "needs partition and time"),
        (["--out", str(tmp_path / "b"), "--max-rows", "5", "--tasks", "3"], "one task"),
        (["--out", str(tmp_path / "c"), "--executor", "ray"], "needs --logging-dir"),
        (["--out", str(tmp_path / "d"), "--executor-config", str(tmp_path / "nope.yaml")], "nope.yaml"),
    ]
    for extra, msg in cases:
        assert dhad_main(base + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
        assert not Path(extra[1]).exists()


@pytest.mark.data
def test_shared_corpus_sample_one_and_n_tasks_equal_the_reference(shared_data, tmp_path, monkeypatch):
    """Real Arabic and English data (heads of four shared-corpus files: news and web JSON lines, diacritized
    text, poems), a real tokenizer: the reference's bytes from 1 task and from 4 tasks that cut the JSON-lines
    files into byte ranges. (The whole corpus was checked the same way once, see docs/data.md.)"""
    corpus, data = shared_data / "corpus", tmp_path / "data"
    for src, rel, n in (("arabic", "arabic/saudinewsnet_2015-07-23_and_25.jsonl", 30),
                        ("arabic", "arabic/tashkeela_fadel_val_test_diacritized.txt", 150),
                        ("arabic", "arabic/arbml_poems.txt", 300), ("english", "english/c4_demo_llamafactory.jsonl", 50)):
        with open(corpus / rel, "rb") as f:
            head = b"".join(line for line, _ in zip(f, range(n)))
        (data / src).mkdir(parents=True, exist_ok=True)
        (data / src / Path(rel).name).write_bytes(head)
    tok = shared_data.parent / "fixtures" / "tokenizers" / "llama2-style"
    if not tok.is_dir():
        pytest.skip(f"fixture tokenizer not found at {tok}")

    def c(out, **kw):
        return prep.PrepareConfig(inputs=[str(data)], data_root=str(data), tokenizer=str(tok), out=str(tmp_path / out),
                                  progress=False, workers=1, val_fraction=0.05, **kw)

    ref = reference_prepare(c("ref"))
    assert ref["rules"]["kept"]["docs"] > 60 and ref["by_source"]["english"]["docs_kept"] > 30
    expect = output_bytes(tmp_path / "ref")
    same_report(prep.prepare(c("one", tasks=1)), ref)
    assert output_bytes(tmp_path / "one") == expect
    monkeypatch.setattr(prep, "MIN_UNIT_BYTES", 10_000)
    assert sum(len(u) == 3 for u in prep.plan(c("n", tasks=4)).units) >= 4
    same_report(prep.prepare(c("n", tasks=4)), ref)
    assert output_bytes(tmp_path / "n") == expect
