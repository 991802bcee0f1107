"""Many processes: `torchrun` with 2 CPU processes (gloo) and DDP or FSDP2 gives the losses of the
1-process run with the same global batch; a sharded FSDP checkpoint resumes on 1 process and continues
the same run. The recipe switches from a frozen backbone to full training mid-run (adapt), so DDP's
rebuild and FSDP2's per-step requires_grad are covered too."""
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


def test_fsdp_two_processes_equal_one_process_and_resume_on_one(setup):
    root, path, ref = setup
    recs = _torchrun(root, path, root / "fsdp", "--set", "distributed=fsdp", "--stop-at", "3")
    start = next(r for r in recs if r["event"] == "start")
    assert start["world_size"] == 2 and start["strategy"] == "fsdp"
    _close(_losses(recs), ref.losses[:3])
    # the sharded checkpoint (2 DCP shards) continues on a single process, same stream, same losses
    ck = root / "fsdp" / "checkpoints" / "step_00000003" / "train_state"
    assert len(list(ck.glob("*.distcp"))) == 2
    rest = train(path, run_dir=root / "fsdp", data_root=root, resume=True, progress=False)
    _close(rest.losses, ref.losses[3:])
    assert rest.mixture == ref.mixture
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(rest.model.state_dict()[k], v, rtol=1e-2, atol=1e-3)


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
