"""Many processes: `torchrun` with 2 CPU processes (gloo) and DDP or FSDP2 gives the losses of the
1-process run with the same global batch; a checkpoint of any strategy (1 process, DDP, sharded FSDP)
resumes under any other and continues the same run. The recipe switches from a frozen backbone to full
training mid-run (adapt), so DDP's rebuild and FSDP2's per-step requires_grad are covered too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dhad.data.shards import ShardWriter
from dhad.train.loop import train

pytestmark = [pytest.mark.slow, pytest.mark.one_thread]  # torchrun starts 2 fresh Python processes per test
REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    for name, hi in (("en", 300), ("ar", 512)):  # two sources with different token statistics
        for split, n_docs in (("train", 60), ("validation", 8)):
            with ShardWriter(root / name, split, "pretrain", vocab_size=512, eos_token_id=0) as w:
                for _ in range(n_docs):
                    # low-entropy documents (repeated short patterns) so the loss moves in a few steps
                    pat = rng.integers(1, hi, size=int(rng.integers(3, 8)))
                    w.add(np.tile(pat, int(rng.integers(4, 12))))
    recipe = {"type": "adapt", "seed": 11, "model": {"preset": "tiny-jais"},
              "data": {"sources": {"en": "en", "ar": "ar"}},
              "stages": [{"name": "embeddings", "tokens": 2 * 8 * 32, "mix": {"en": 1, "ar": 1}, "trainable": "embeddings"},
                         {"name": "all", "tokens": 4 * 8 * 32, "mix": {"en": 1, "ar": 2}, "trainable": "all"}],
              # fused=False: FSDP's DTensors take foreach, so 1 and 2 processes run the same kernel
              "optimizer": {"lr": 1e-2, "weight_decay": 0.1, "fused": False},
              "schedule": {"warmup_steps": 2, "min_lr": 1e-3},
              "batch": {"micro_batch_size": 2, "global_batch_size": 8, "seq_len": 32},
              "precision": "fp32", "eval_batches": 2, "peak_flops": 1e12}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    ref = train(path, run_dir=root / "ref", data_root=root, progress=False)
    assert [s for s, _ in ref.losses] == [1, 2, 3, 4, 5, 6]
    return root, path, ref


def _torchrun(root, path, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dhad", "train", "--recipe", str(path), "--data", str(root), "--out", str(out), "--no-progress",
           *extra]  # global batch 8: 1 process x 2 x 4 accumulation == 2 processes x 2 x 2 accumulation
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return recs


def _losses(recs):
    return [(r["step"], r["loss"]) for r in recs if r["event"] == "step"]


def _close(a, b):
    assert [s for s, _ in a] == [s for s, _ in b]
    np.testing.assert_allclose([x for _, x in a], [x for _, x in b], rtol=TOL, atol=0)


def test_ddp_two_processes_equal_one_process(setup):
    root, path, ref = setup
    recs = _torchrun(root, path, root / "ddp", "--set", "distributed=ddp")
    start = next(r for r in recs if r["event"] == "start")
    assert start["world_size"] == 2 and start["strategy"] == "ddp"
    _close(_losses(recs), ref.losses)
    ev = [r for r in recs if r["event"] == "eval"][-1]
    assert ev["val_loss"] == pytest.approx(ref.evals[-1]["val_loss"], rel=TOL)
    a, b = load_file(root / "ddp" / "model" / "model.safetensors"), load_file(ref.model_dir / "model.safetensors")
    for k in b:  # Adam divides by sqrt(v): a coordinate whose gradient is ~0 turns summation-order noise
        torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=1e-3)  # into up to lr per step (1e-2)


# Several `train(..., resume=True)` calls in one 2-process launch (the process group is the driver's):
# one launch per pair of segments instead of one per segment.
DRIVER = """
import sys
from pathlib import Path
import torch.distributed as dist
from dhad.train.loop import train
dist.init_process_group("gloo")
recipe, data, out, *segments = sys.argv[1:]
for seg in segments:  # STRATEGY:STOP_AT (STOP_AT 0: to the end)
    strategy, stop = seg.split(":")
    train(recipe, resume=(Path(out) / "checkpoints").is_dir(), run_dir=out, data_root=data,
          stop_at=int(stop) or None, progress=False, overrides=[f"distributed={strategy}"])
dist.destroy_process_group()
"""


def _torchrun_segments(root, path, out, *segments):
    driver = root / "resume_driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(driver),
           str(path), str(root), str(out), *segments]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_resume_across_strategies_in_every_direction(setup):
    """One run of 7 steps, each under another strategy: FSDP -> DDP -> FSDP -> 1 process -> DDP ->
    1 process -> FSDP, so every kind of checkpoint resumes under every other (all six directions),
    with the defaults' AdamW kernels (foreach on FSDP's DTensors, fused on plain tensors: the saved
    optimizer settings must not carry the saving run's kernel over) and the adapt stage switch in the
    middle. The losses are the uninterrupted 1-process run's to 1e-6 (fp32)."""
    root, path, _ = setup
    recipe = yaml.safe_load(path.read_text())
    recipe["optimizer"].pop("fused")
    recipe["stages"][1]["tokens"] = 5 * 8 * 32  # 2 + 5 steps
    p = root / "matrix.yaml"
    p.write_text(yaml.safe_dump(recipe))
    ref = train(p, run_dir=root / "matrix-ref", data_root=root, progress=False)
    out = root / "matrix"
    _torchrun_segments(root, p, out, "fsdp:1", "ddp:2", "fsdp:3")  # FSDP -> DDP -> FSDP (stage 2 from step 3)
    shards = list((out / "checkpoints" / "step_00000003" / "train_state").glob("*.distcp"))
    assert len(shards) == 2 and all(f.stat().st_size > 0 for f in shards)  # each rank wrote its shard
    train(p, run_dir=out, data_root=root, resume=True, stop_at=4, progress=False)  # FSDP -> 1
    _torchrun_segments(root, p, out, "ddp:5")  # 1 -> DDP
    train(p, run_dir=out, data_root=root, resume=True, stop_at=6, progress=False)  # DDP -> 1
    _torchrun_segments(root, p, out, "fsdp:0")  # 1 -> FSDP, to the end
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    runs = [(r["step"], r["world_size"], r["strategy"]) for r in recs if r["event"] in ("start", "resume")]
    assert runs == [(0, 2, "fsdp"), (1, 2, "ddp"), (2, 2, "fsdp"), (3, 1, "none"), (4, 2, "ddp"),
                    (5, 1, "none"), (6, 2, "fsdp")]
    got = _losses(recs)
    assert [s for s, _ in got] == [s for s, _ in ref.losses] == list(range(1, 8))
    np.testing.assert_allclose([x for _, x in got], [x for _, x in ref.losses], rtol=1e-6, atol=0)
    mix = json.loads((out / "mixture.json").read_text())
    assert mix["step"] == 7 and mix["stages"] == ref.mixture
    a, b = load_file(out / "model" / "model.safetensors"), load_file(ref.model_dir / "model.safetensors")
    for k in b:  # see test_ddp_two_processes_equal_one_process for why weights get a looser bound
        torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("source", ["preset", "init_from"])
def test_fsdp_meta_init_equals_one_process(setup, source):
    """model.meta_init: built on the meta device, sharded, then each rank fills only its shards (fresh
    seeded init, or tensor by tensor from a checkpoint): the same run as the whole-model build."""
    from dhad.checkpoint import save_model
    from dhad.config import Config
    from dhad.model import Transformer
    root, path, ref = setup
    recipe = yaml.safe_load(path.read_text())
    recipe["model"]["meta_init"] = True
    recipe["distributed"] = "fsdp"
    if source == "init_from":  # the preset's seeded init, saved as a checkpoint
        d = root / "init-tiny-jais"
        if not d.exists():
            save_model(Transformer(Config.from_name("tiny-jais")).init_weights(recipe["seed"]), d)
        recipe["model"] = {"init_from": str(d), "meta_init": True}
    p = root / f"meta-{source}.yaml"
    p.write_text(yaml.safe_dump(recipe))
    recs = _torchrun(root, p, root / f"meta-{source}")
    start = next(r for r in recs if r["event"] == "start")
    assert start["world_size"] == 2 and start["strategy"] == "fsdp" and start["meta_init"] is True
    assert start["params"] == ref.model.num_params()
    _close(_losses(recs), ref.losses)
    a, b = load_file(root / f"meta-{source}" / "model" / "model.safetensors"), load_file(ref.model_dir / "model.safetensors")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=1e-3)


def test_meta_init_needs_fsdp(setup, tmp_path):
    from dhad.train.recipe import RecipeError, load_recipe
    root, path, _ = setup
    recipe = yaml.safe_load(path.read_text())
    recipe["model"]["meta_init"] = True
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="meta_init: needs distributed: fsdp"):
        load_recipe(p)


def test_ddp_bf16_with_the_cpu_training_kernels_equals_one_process(setup):
    """bf16 autocast with the fused AdamW (the defaults): the CPU training paths -- attention with the
    probabilities held (here with ALiBi's additive mask), SwiGLU's one-tensor backward, clipping folded
    into the fused step -- under DDP give the 1-process run's losses and clipped gradient norms (bf16: 1e-3)."""
    root, path, _ = setup
    recipe = yaml.safe_load(path.read_text())
    recipe.update(type="pretrain", precision="bf16", clip_grad=0.5,
                  stages=[{"name": "all", "tokens": 4 * 8 * 32, "mix": {"en": 1, "ar": 2}}])
    recipe["optimizer"].pop("fused")
    p = root / "bf16.yaml"
    p.write_text(yaml.safe_dump(recipe))
    ref = train(p, run_dir=root / "bf16-ref", data_root=root, progress=False)
    recs = _torchrun(root, p, root / "bf16-ddp", "--set", "distributed=ddp")
    got = [r for r in recs if r["event"] == "step"]
    ref_steps = [json.loads(x) for x in (root / "bf16-ref" / "metrics.jsonl").read_text().splitlines()]
    ref_steps = [r for r in ref_steps if r["event"] == "step"]
    assert [r["step"] for r in got] == [r["step"] for r in ref_steps] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref_steps], rtol=1e-3)
    np.testing.assert_allclose([r["grad_norm"] for r in got], [r["grad_norm"] for r in ref_steps], rtol=1e-2)
    assert min(r["grad_norm"] for r in ref_steps) > 0.5  # clipping was active
