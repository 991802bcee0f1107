"""The speedrun's orchestration: the clock, the stage list, markers, resuming.

`run_speedrun(SpeedrunConfig(...))` runs (or resumes) every stage of a recipe in order. Each stage is a
function `(run, markers) -> outputs` in its own module (plan, prepare, training, evaluation, report);
this module only decides how many seconds each may use and keeps the bookkeeping:

- **The clock** starts at `started_at` (`dhad speedrun` passes the moment its process started, so the
  interpreter's start-up and imports count, or the moment scripts/speedrun.sh started; a library call
  without it starts the clock now). `left()` is what the budget still holds.
- **Planned seconds** (`allot`): a training stage gets its weight's share of what is left when it starts,
  after the reserve for the stages behind it (n-gram baseline, check, evaluation, report), and at least
  `MIN_TRAIN_SHARE` of its share of the whole budget; evaluation
  gets what is left less the report's reserve (its benchmarks fill it); the other stages are
  estimates. Each marker keeps the seconds planned at its start and the seconds used.
- **Resumable**: a stage whose marker exists (made with the same options) is reused; a training stage
  that was interrupted resumes from the trainer's last checkpoint (Ctrl-C checkpoints after the current
  step). When a stage is (re)computed, every later marker is dropped so nothing stale is reused.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from dhad.speedrun.common import SpeedrunConfig, SpeedrunError, pick_device, read_json, resolve_data, stage_names, \
    write_json
from dhad.speedrun.evaluation import stage_baseline, stage_check, stage_eval
from dhad.speedrun.plan import EXIT_S, MIN_TRAIN_SHARE, TRAIN_WEIGHTS, apply_threads, stage_estimate, stage_plan
from dhad.speedrun.prepare import stage_data, stage_tokenizer
from dhad.speedrun.report import stage_report
from dhad.speedrun.training import stage_adapt, stage_donor, stage_dpo, stage_pretrain, stage_sft

STAGES = {"plan": stage_plan, "tokenizer": stage_tokenizer, "data": stage_data, "donor": stage_donor,
          "pretrain": stage_pretrain, "adapt": stage_adapt, "baseline": stage_baseline, "sft": stage_sft,
          "dpo": stage_dpo, "check": stage_check, "eval": stage_eval, "report": stage_report}


class Run:
    """One speedrun: options, paths, the plan, the clock and the stage bookkeeping."""

    def __init__(self, cfg: SpeedrunConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.data = resolve_data(cfg.data)
        self.stages = stage_names(cfg.recipe, cfg.dpo)
        if cfg.until is not None and cfg.until not in self.stages:
            raise SpeedrunError(f"--until {cfg.until}: not a stage of this recipe ({', '.join(self.stages)})")
        if not cfg.budget > 0:
            raise SpeedrunError(f"--budget must be > 0 minutes, got {cfg.budget}")
        self.budget_s = 60.0 * cfg.budget
        self.origin = cfg.started_at if cfg.started_at is not None else time.time()
        self.wall0 = time.time()
        self.t0 = time.perf_counter()
        self.reused_s = 0.0  # seconds of stages done by earlier invocations
        self.plan: dict = {}
        self.computed: list[str] = []  # stages computed (not reused) by this invocation, in order
        self.planned: dict[str, float] = {}  # seconds planned for each stage computed here, at its start

    # -- paths ---------------------------------------------------------------------------------
    def p(self, *parts) -> Path:
        return self.out.joinpath(*parts)

    def marker_path(self, name: str) -> Path:
        return self.p("stages", f"{self.stages.index(name) + 1:02d}-{name}.json")

    def marker(self, name: str) -> dict | None:
        f = self.marker_path(name)
        return read_json(f) if f.is_file() else None

    # -- the clock -----------------------------------------------------------------------------
    def spent(self) -> float:
        """Seconds of the budget spent: this process so far plus stages reused from earlier invocations."""
        return time.time() - self.origin + self.reused_s

    def left(self) -> float:
        """Seconds the budget still holds for stages (the interpreter's exit kept aside)."""
        return self.budget_s - EXIT_S - self.spent()

    def allot(self, name: str) -> float:
        """Seconds stage `name` may use, decided when it starts (see the module docstring)."""
        after = self.stages[self.stages.index(name) + 1:]
        if name == "eval":
            return max(self.left() - sum(stage_estimate(s, self.budget_s) for s in after), 0.0)
        if name == "report":
            return max(self.left(), 0.0)
        w = TRAIN_WEIGHTS[self.cfg.recipe]
        if name not in w:
            return stage_estimate(name, self.budget_s)
        later_fixed = sum(stage_estimate(s, self.budget_s) for s in after if s not in w)
        todo = [s for s in [name] + after if s in w]
        share = max(0.0, self.left() - later_fixed) * w[name] / sum(w[s] for s in todo)
        # never less than MIN_TRAIN_SHARE of its share of the whole budget: when the stages before it
        # overran a tiny budget on a loaded machine, the run ends late rather than train nothing
        mine = self.budget_s * w[name] / sum(w[s] for s in self.stages if s in w)
        return max(share, MIN_TRAIN_SHARE * mine)

    def say(self, msg: str) -> None:
        print(f"[speedrun {self.spent():6.1f}s] {msg}", flush=True)

    @property
    def device(self):
        return pick_device(self.cfg.device)


def run_speedrun(cfg: SpeedrunConfig) -> dict:
    """Run (or resume) every stage; returns {"out", "stages": {name: marker}, "final", "check", "wall_s"}."""
    run = Run(cfg)
    run.out.mkdir(parents=True, exist_ok=True)
    key = cfg.key()
    if cfg.fresh:
        for d in ("stages", "recipes"):
            shutil.rmtree(run.p(d), ignore_errors=True)
    # a marker made with other options means OUT is another run: refuse rather than mix them
    for f in sorted(run.p("stages").glob("*.json")) if run.p("stages").is_dir() else []:
        m = read_json(f)
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
                run.plan = read_json(run.p("plan.json"))
                apply_threads(run.plan)
            run.say(f"stage {i + 1}/{len(run.stages)} {name}: done earlier ({m['seconds']:.1f}s), reused")
        else:
            if not redo:  # from here on everything is recomputed: later markers would be stale
                for later in run.stages[i:]:
                    run.marker_path(later).unlink(missing_ok=True)
                redo = True
            planned = run.allot(name)  # decided now, from what the budget holds
            run.planned[name] = planned
            run.say(f"stage {i + 1}/{len(run.stages)} {name}: running ({planned:.0f}s planned, "
                    f"{run.left():.0f}s of the budget left)")
            t = time.perf_counter()
            outputs = STAGES[name](run, markers)
            run.computed.append(name)
            dt = time.perf_counter() - t
            m = {"stage": name, "status": "done", "seconds": dt, "planned_seconds": planned,
                 "finished": time.time(), "key": key, "outputs": outputs}
            write_json(run.marker_path(name), m)
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
