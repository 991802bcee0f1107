"""Clock-driven training (`schedule.seconds`): the warmup-stable-decay rate on the wall clock, a run that
ends on time with its model saved, and a resumed run that continues the same clock."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dhad.data.shards import ShardWriter
from dhad.train.loop import train
from dhad.train.recipe import RecipeError, parse_recipe
from dhad.train.schedule import lr_at_time

pytestmark = pytest.mark.one_thread
VOCAB = 256


def test_lr_at_time_warmup_stable_decay_by_hand():
    # peak 1.0, floor 0.1, 4 warmup steps, 100 s with the last 20 s decaying (linear)
    f = lambda step, t: lr_at_time(step, t, 100.0, 1.0, 4, 0.1, "linear", 0.2)  # noqa: E731
    assert f(0, 0.0) == pytest.approx(0.25)  # update 1 of 4
    assert f(3, 1.0) == pytest.approx(1.0)  # update 4: warmup done
    assert f(50, 79.9) == pytest.approx(1.0)  # stable until 80 s
    assert f(60, 90.0) == pytest.approx(0.55)  # half way down: 0.1 + 0.9 * 0.5
    assert f(70, 100.0) == pytest.approx(0.1)  # the floor at the end ...
    assert f(80, 130.0) == pytest.approx(0.1)  # ... and after it
    # cosine shape half way: 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55; a quarter: 0.1 + 0.45 * (1 + 0.7071)
    assert lr_at_time(60, 90.0, 100.0, 1.0, 0, 0.1, "cosine", 0.2) == pytest.approx(0.55)
    assert lr_at_time(60, 85.0, 100.0, 1.0, 0, 0.1, "cosine", 0.2) == pytest.approx(0.1 + 0.45 * (1 + 2 ** -0.5))
    # a slow machine still warming up when the decay window opens: the smaller of the two rates
    assert lr_at_time(1, 95.0, 100.0, 1.0, 10, 0.0, "linear", 0.2) == pytest.approx(0.2)  # ramp 0.2 < 0.25
    assert lr_at_time(8, 95.0, 100.0, 1.0, 10, 0.0, "linear", 0.2) == pytest.approx(0.25)
    assert lr_at_time(5, 99.0, 100.0, 1.0, 0, 0.0, "constant", 0.2) == 1.0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Random-token pretrain shards (train + validation): the clock, not the loss, is under test."""
    out = tmp_path_factory.mktemp("clock")
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("validation", 8)):
        with ShardWriter(out / "src", split, "pretrain", vocab_size=VOCAB, eos_token_id=0) as w:
            for _ in range(n):
                w.add(rng.integers(1, VOCAB, 60).tolist() + [0], source="src")
    return out


def _recipe(seconds, cap=100_000, **kw):
    d = {"type": "pretrain", "seed": 1, "model": {"preset": "tiny-jais", "overrides": {"vocab_size": VOCAB}},
         "data": {"sources": {"src": "src"}}, "stages": [{"name": "main", "mix": {"src": 1}}],
         "optimizer": {"lr": 1e-2}, "batch": {"micro_batch_size": 2, "global_batch_size": 2, "seq_len": 32},
         "schedule": {"warmup_steps": 2, "total_steps": cap, "min_lr": 1e-3, "decay": "linear",
                      "seconds": seconds, "decay_fraction": 0.5},
         "precision": "fp32", "eval_every": 0, "eval_batches": 0, "peak_flops": 1e12, "checkpoint_every": 0}
    d.update(kw)
    return parse_recipe(d)


def _steps(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x).get("event") == "step"]


def test_clock_driven_run_ends_on_time_with_the_model_saved(shards, tmp_path):
    res = train(_recipe(1.5), run_dir=tmp_path / "r", data_root=shards, progress=False)
    steps = _steps(tmp_path / "r")
    assert not res.interrupted and res.model_dir is not None and (res.model_dir / "model.safetensors").is_file()
    assert 3 < res.step < 100_000  # stopped by the clock, not by the step cap
    dt = max(b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:]))
    assert res.train_seconds == pytest.approx(1.5, abs=dt + 0.05)  # the step that ends nearest the budget
    assert steps[-1]["elapsed_s"] == pytest.approx(1.5, abs=dt + 0.05)
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == pytest.approx(5e-3) and max(lrs) == pytest.approx(1e-2)  # warmup then the peak
    # the last step started at most 1.5 steps before the end, inside the decay window (the last 0.75 s):
    # its rate is at most 1.5 steps' worth of the decay above the floor
    assert lrs[-1] <= 1e-3 + 9e-3 * min(1.0, 1.5 * dt / 0.75) + 1e-12
    assert all(b <= a + 1e-12 for a, b in zip(lrs[2:], lrs[3:]))  # stable then decaying, never up


def test_step_cap_still_ends_a_clock_driven_run(shards, tmp_path):
    res = train(_recipe(600.0, cap=3), run_dir=tmp_path / "r", data_root=shards, progress=False)
    assert res.step == 3 and not res.interrupted and res.model_dir is not None


def test_resumed_clock_driven_run_continues_the_clock(shards, tmp_path):
    part = train(_recipe(30.0), run_dir=tmp_path / "r", data_root=shards, progress=False, stop_at=3)
    assert part.interrupted and part.step == 3
    meta = json.loads((part.checkpoint / "meta.json").read_text())
    before = meta["train_seconds"]
    assert 0 < before < 30
    # resume with a budget already spent before the interruption: one more step at the floor, then the
    # clock says stop (a resumed run that restarted its clock would run at the peak rate for ~15 s)
    r = json.loads(json.dumps(_recipe(30.0).to_dict()))
    r["schedule"]["seconds"] = before / 2
    res = train(parse_recipe(r), run_dir=tmp_path / "r", data_root=shards, progress=False, resume=True)
    assert res.step == 4 and not res.interrupted and res.train_seconds > before
    assert _steps(tmp_path / "r")[-1]["lr"] == pytest.approx(1e-3)  # at the floor: the clock had run out


def test_bad_clock_settings_are_refused():
    with pytest.raises(RecipeError, match="schedule.seconds"):
        _recipe(0.0)
    with pytest.raises(RecipeError, match="decay_fraction"):
        _recipe(5.0, schedule={"total_steps": 5, "seconds": 5.0, "decay_fraction": 1.5})
    assert math.isfinite(_recipe(5.0).schedule.seconds)
