"""What happens at each optimizer step: learning rate, sequence length, batch shape, mixture stage.

Learning rate: linear warmup then cosine (or linear) decay to a floor. Steps are counted as the
cards count them, from 1: update k uses

    lr(k) = peak * k / warmup                                   for k <= warmup
    lr(k) = floor + (peak - floor) * 0.5 * (1 + cos(pi * p))    p = (k - warmup) / (total - warmup)

so the jais-adapted-70b-chat numbers read directly: "0 to 2e-5 over <= 380 warmup steps, cosine to
2e-6 at step 13,175" is lr(380) = 2e-5 and lr(13175) = 2e-6. The loop's 0-based step s is update s + 1.

Clock-driven (`schedule.seconds`, `lr_at_time`): warmup-stable-decay where the decay is placed on the
wall clock instead of a step count, so a run needs no step count in advance: warmup over the first
steps, the peak until (1 - decay_fraction) of the seconds have passed, then the decay shape to the
floor at `seconds`, when the loop ends the run. A fast machine trains more steps, a slow one fewer;
both end on time with the learning rate at its floor.

Plan: progressive context extension (phases ending at a step or a token count) and the mixture
stages (ending once their token budget is trained on) cut the run into segments of constant shape.
Tokens per step = global sequences x seq_len, so stage and phase boundaries are computed exactly,
in closed form, once, before training; every process computes the same plan. A stage ends at the
first step boundary where its tokens reach its budget (it may overshoot by less than one step;
what was actually trained is reported, never the budget).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from dhad.train.recipe import Recipe, RecipeError


def lr_at(step: int, peak: float, warmup: int, total: int, floor: float = 0.0, decay: str = "cosine") -> float:
    """Learning rate for 0-based optimizer step `step` (update number step + 1)."""
    k = step + 1
    if warmup > 0 and k <= warmup:
        return peak * k / warmup
    if decay == "constant" or total <= warmup:
        return peak
    p = min(1.0, max(0.0, (k - warmup) / (total - warmup)))
    if decay == "linear":
        return floor + (peak - floor) * (1.0 - p)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def lr_at_time(step: int, elapsed: float, seconds: float, peak: float, warmup: int, floor: float = 0.0,
               decay: str = "linear", decay_fraction: float = 0.2) -> float:
    """Learning rate for 0-based step `step` starting `elapsed` seconds into a run of `seconds` (WSD).

    The warmup ramp (by steps) and the time-driven decay both cap the rate (the smaller wins, so a
    slow machine that reaches the decay window before the end of warmup still ends at the floor)."""
    k = step + 1
    ramp = peak * k / warmup if warmup > 0 and k <= warmup else peak
    if decay == "constant":
        return ramp
    start = seconds * (1.0 - decay_fraction)
    p = min(1.0, max(0.0, (elapsed - start) / max(seconds - start, 1e-9)))
    if decay == "linear":
        timed = floor + (peak - floor) * (1.0 - p)
    else:
        timed = floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    return min(ramp, timed)


@dataclass(frozen=True)
class Segment:
    """Steps [start, end) with one sequence length, batch shape and stage."""
    start: int
    end: int
    stage: int  # index into recipe.stage_list
    phase: int  # index into recipe.context (0 when there is no context schedule)
    seq_len: int
    micro_batch_size: int
    grad_accum: int  # per process
    global_seqs: int  # sequences per optimizer step, all processes
    tokens_before: int  # tokens trained before `start` (whole run)
    stage_tokens_before: int  # tokens trained in this stage before `start`

    @property
    def tokens_per_step(self) -> int:
        return self.global_seqs * self.seq_len


class Plan:
    """The segments of a run. `plan.at(step)` -> Segment; `plan.total_steps`."""

    def __init__(self, segments: list[Segment], stage_names: list[str]):
        if not segments:
            raise RecipeError("the run has no steps")
        self.segments = segments
        self.stage_names = stage_names
        self._starts = [s.start for s in segments]

    @property
    def total_steps(self) -> int:
        return self.segments[-1].end

    def at(self, step: int) -> Segment:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the plan [0, {self.total_steps})")
        return self.segments[bisect.bisect_right(self._starts, step) - 1]

    def tokens_before(self, step: int) -> int:
        """Tokens trained before `step` (whole run)."""
        if step >= self.total_steps:
            last = self.segments[-1]
            return last.tokens_before + (last.end - last.start) * last.tokens_per_step
        s = self.at(step)
        return s.tokens_before + (step - s.start) * s.tokens_per_step

    @property
    def total_tokens(self) -> int:
        return self.tokens_before(self.total_steps)

    def summary(self) -> list[dict]:
        return [dict(steps=[s.start, s.end], stage=self.stage_names[s.stage], seq_len=s.seq_len,
                     global_seqs=s.global_seqs, micro_batch_size=s.micro_batch_size, grad_accum=s.grad_accum,
                     tokens=(s.end - s.start) * s.tokens_per_step) for s in self.segments]


def _batch_shape(recipe: Recipe, phase, world_size: int, seq_len_default: int | None):
    b = recipe.batch
    mb = (phase.micro_batch_size if phase and phase.micro_batch_size else None) or b.micro_batch_size
    gb = (phase.global_batch_size if phase and phase.global_batch_size else None)
    ga = (phase.grad_accum if phase and phase.grad_accum else None)
    if gb is None and ga is None:
        gb, ga = b.global_batch_size, b.grad_accum
    if gb is not None:
        if gb % (mb * world_size):
            raise RecipeError(f"global batch {gb} is not divisible by micro_batch_size {mb} x {world_size} "
                              f"process(es); change batch.global_batch_size or micro_batch_size")
        ga = gb // (mb * world_size)
    ga = ga or 1
    T = (phase.seq_len if phase else None) or b.seq_len or seq_len_default
    if not T:
        raise RecipeError("batch.seq_len: unknown sequence length")
    return T, mb, ga, mb * ga * world_size


def build_plan(recipe: Recipe, world_size: int = 1, seq_len_default: int | None = None) -> Plan:
    """Cut the run into constant-shape segments (see module docstring)."""
    stages = recipe.stage_list
    phases = recipe.context or [None]
    max_steps = recipe.schedule.total_steps
    segs: list[Segment] = []
    step, tokens, stage, stage_tokens, ph = 0, 0, 0, 0, 0
    while True:
        if max_steps is not None and step >= max_steps:
            break
        # advance the context phase past any that already ended
        while ph < len(phases) - 1 and phases[ph] is not None and (
                (phases[ph].until_step is not None and step >= phases[ph].until_step)
                or (phases[ph].until_tokens is not None and tokens >= phases[ph].until_tokens)):
            ph += 1
        budget = stages[stage].tokens
        if budget is not None and stage_tokens >= budget:
            if stage == len(stages) - 1:
                break  # last budget reached: the run ends
            stage, stage_tokens = stage + 1, 0
            continue
        phase = phases[ph]
        T, mb, ga, G = _batch_shape(recipe, phase, world_size, seq_len_default)
        tps = G * T
        n = math.inf
        if max_steps is not None:
            n = min(n, max_steps - step)
        if budget is not None:
            n = min(n, math.ceil((budget - stage_tokens) / tps))
        if phase is not None and ph < len(phases) - 1:
            if phase.until_step is not None:
                n = min(n, phase.until_step - step)
            if phase.until_tokens is not None:
                n = min(n, math.ceil((phase.until_tokens - tokens) / tps))
        if n is math.inf:
            raise RecipeError("the run never ends: set schedule.total_steps or a token budget on the last stage")
        n = max(int(n), 1)
        segs.append(Segment(start=step, end=step + n, stage=stage, phase=ph, seq_len=T, micro_batch_size=mb,
                            grad_accum=ga, global_seqs=G, tokens_before=tokens, stage_tokens_before=stage_tokens))
        step += n
        tokens += n * tps
        stage_tokens += n * tps
    # merge nothing: segments are already maximal for (stage, phase)
    return Plan(segs, [s.name or f"stage{i + 1}" for i, s in enumerate(stages)])
