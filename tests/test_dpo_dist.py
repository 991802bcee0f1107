"""DPO under many processes: `torchrun` with 2 CPU processes (gloo), DDP and FSDP2, gives the per-step
losses and reward metrics of the 1-process run with the same global batch (to 1e-5); the reference
log-probs are computed once, sharded over the ranks and gathered (the same table as 1 process); evaluation
rounds padded for the rank with fewer held-out batches count only the real pairs; an FSDP2 checkpoint
resumes on 1 process and continues the same run.

Launch helpers and the one-thread fixture are those of the pretrain/adapt test (tests/test_train_dist.py).
"""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_dpo import _random_pairs, _write_prefs
from test_train_dist import TOL, _close, _losses, _torchrun

from dhad.checkpoint import save_model
from dhad.config import Config
from dhad.model import Transformer
from dhad.train.loop import train

pytestmark = [pytest.mark.slow, pytest.mark.one_thread]  # torchrun starts 2 fresh Python processes per test

# Reward metrics start at ~1e-8 (policy == reference): compared with an absolute tolerance.
KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
        "logps/chosen", "logps/rejected", "kl")
EVAL_KEYS = ("val_loss", "eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margin",
             "eval/rewards/accuracy", "eval/logps/chosen", "eval/logps/rejected", "eval/kl",
             "eval/likelihood_accuracy")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-dist")
    save_model(Transformer(Config.from_name("tiny-llama", block_size=64)).init_weights(seed=0), root / "sft")
    _write_prefs(root / "prefs", "train", _random_pairs(40, 1))
    _write_prefs(root / "prefs", "validation", _random_pairs(10, 2))
    # global batch 8 pairs: 1 process x 2 x 4 accumulation == 2 processes x 2 x 2 accumulation.
    # Evaluation: 3 batches of 2 pairs, so rank 1 runs one padding batch in the second round.
    # Reference pass: 40 + 10 pairs in batches of 4 -> 10 + 3 batches over 2 ranks (one padded too).
    recipe = {"type": "dpo", "name": "dpo-dist", "seed": 7, "model": {"init_from": "sft"},
              "data": {"sources": {"syn": "prefs"}, "val_split": "validation"},
              "objective": {"beta": 0.1, "reference": "precomputed", "ref_batch_size": 4},
              "optimizer": {"lr": 3e-3, "weight_decay": 0.0, "fused": False},
              "schedule": {"total_steps": 4, "warmup_steps": 1},
              "batch": {"micro_batch_size": 2, "global_batch_size": 8, "seq_len": 32}, "precision": "fp32",
              "eval_every": 2, "eval_batches": 3, "checkpoint_every": 0, "log_every": 1, "peak_flops": 1e11}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    ref = train(path, run_dir=root / "ref", data_root=root, progress=False)
    assert [s for s, _ in ref.losses] == [1, 2, 3, 4]
    return root, path, ref, _records(root / "ref")


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _same_metrics(got, want, steps):
    """Step and eval records of two runs agree on every DPO metric (absolute 1e-5; losses also relative)."""
    for event, keys in (("step", KEYS), ("eval", EVAL_KEYS)):
        a = {r["step"]: r for r in got if r["event"] == event and r["step"] in steps}
        b = {r["step"]: r for r in want if r["event"] == event and r["step"] in steps}
        assert sorted(a) == sorted(b) and a, (event, sorted(a), sorted(b))
        for s in a:
            for k in keys:
                assert abs(a[s][k] - b[s][k]) < TOL, (event, s, k, a[s][k], b[s][k])
            if event == "eval":  # the padding batch of the rank with fewer batches is not counted
                assert a[s]["eval/pairs"] == b[s]["eval/pairs"] == 6


def test_ddp_two_processes_equal_one_process(setup):
    root, path, ref, want = setup
    recs = _torchrun(root, path, root / "ddp", "--set", "distributed=ddp")
    start = next(r for r in recs if r["event"] == "start")
    assert start["world_size"] == 2 and start["strategy"] == "ddp"
    _close(_losses(recs), ref.losses)
    _same_metrics(recs, want, {0, 1, 2, 3, 4})
    # same layout, same pairs per step: the same count of real tokens (prompt once + both answers)
    assert [r["tokens_processed"] for r in recs if r["event"] == "step"] == \
           [r["tokens_processed"] for r in want if r["event"] == "step"]
    # the reference pass was split over the ranks and gathered: the 1-process table, every pair filled
    for split in ("train", "validation"):
        a = load_file(root / "ddp" / "ref_logps" / f"{split}-syn.safetensors")["logps"]
        b = load_file(root / "ref" / "ref_logps" / f"{split}-syn.safetensors")["logps"]
        assert not torch.isnan(a).any() and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    a, b = load_file(root / "ddp" / "model" / "model.safetensors"), load_file(ref.model_dir / "model.safetensors")
    for k in b:  # measured max |diff| 5e-7 (DDP), 8e-6 (FSDP); Adam can turn summation-order noise on ~0
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)  # gradients into more (see test_train_dist)


def test_fsdp_frozen_reference_two_processes_then_resume_on_one(setup):
    root, path, ref, want = setup
    # frozen reference: the copy is FSDP-sharded too, so its forwards are collective like the policy's
    recs = _torchrun(root, path, root / "fsdp", "--set", "distributed=fsdp", "--set", "objective.reference=frozen",
                     "--stop-at", "2")
    start = next(r for r in recs if r["event"] == "start")
    assert start["world_size"] == 2 and start["strategy"] == "fsdp"
    _close(_losses(recs), ref.losses[:2])
    _same_metrics(recs, want, {0, 1, 2})  # grad_norm too: FSDP2 leaves the root unsharded after evaluation
    report = json.loads((root / "fsdp" / "dpo_report.json").read_text())
    # one plain forward per batch (the token tree), so FSDP2 runs the shared-prompt layout too
    assert report["layout"] == "tree" and report["reference"]["mode"] == "frozen"
    assert [r["tokens_processed"] for r in recs if r["event"] == "step"] == \
           [r["tokens_processed"] for r in want if r["event"] == "step" and r["step"] <= 2]
    ck = root / "fsdp" / "checkpoints" / "step_00000002" / "train_state"
    assert len(list(ck.glob("*.distcp"))) == 2
    # the sharded checkpoint continues on one process: same stream, same losses, same optimizer state
    rest = train(path, run_dir=root / "fsdp", data_root=root, resume=True, progress=False,
                 overrides=["objective.reference=frozen"])
    _close(rest.losses, ref.losses[2:])
    _same_metrics(_records(root / "fsdp"), want, {3, 4})
    got = rest.model.state_dict()
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-4)
