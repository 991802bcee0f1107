"""What every speedrun module shares: options, errors, the stage list, data file names, small file helpers."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dhad.utils import atomic_write_text


class SpeedrunError(ValueError):
    """A speedrun that cannot run as asked (no data, mismatched output directory, ...)."""


class SpeedrunInterrupted(KeyboardInterrupt):
    """A training stage stopped on a signal after checkpointing; running again resumes it."""


RECIPES = ("jais", "adapted")


@dataclass
class SpeedrunConfig:
    data: str | None = None          # data root (corpus/, eval/, preference/); default $DHAD_DATA_DIR
    out: str = "runs/speedrun"
    budget: float = 15.0             # minutes, wall clock, everything included
    recipe: str = "jais"             # jais | adapted
    dpo: bool = False
    ci: bool = False
    device: str = "auto"             # auto | cpu | cuda
    seed: int = 1234
    until: str | None = None         # stop after this stage (its marker is written)
    fresh: bool = False              # forget earlier stage markers in OUT
    progress: bool = True
    # When the budget's clock started (time.time()); None: now. `dhad speedrun` passes the moment its
    # process started (or scripts/speedrun.sh's start), so interpreter start-up and imports count.
    started_at: float | None = None
    # Testing hook: stop the named training stage after this many optimizer steps, as a signal would
    # (the trainer checkpoints and the run ends with SpeedrunInterrupted).
    interrupt_at: tuple[str, int] | None = None

    def key(self) -> dict:
        """The options a stage's result depends on (a marker made with other options is not reused)."""
        return {"recipe": self.recipe, "budget": self.budget, "ci": self.ci, "seed": self.seed,
                "dpo": self.dpo, "data": str(Path(self.data).resolve()) if self.data else None}


def stage_names(recipe: str, dpo: bool) -> list[str]:
    """The stages of a recipe, in order. The n-gram baseline follows the last pretraining stage (it counts
    exactly the tokens pretraining read); the script check runs before evaluation, which fills the time
    left before the report with benchmark examples."""
    if recipe not in RECIPES:
        raise SpeedrunError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    train = ["pretrain", "baseline", "sft"] if recipe == "jais" else ["donor", "pretrain", "adapt", "baseline", "sft"]
    return ["plan", "tokenizer", "data"] + train + (["dpo"] if dpo else []) + ["check", "eval", "report"]


SFT_FILES = {  # the bilingual instruction data the README names (corpus/instruct)
    "arabic": ["arastories_msa.jsonl", "xquad_ar_qa.jsonl", "arcd_qa.jsonl", "arastories_egyptian.jsonl",
               "arastories_moroccan.jsonl"],
    "english": ["alpaca_en_demo_1k.jsonl", "selfinstruct_seed_tasks_en.jsonl",
                "selfinstruct_user_oriented_en.jsonl"],
}
PREF_FILES = {"arabic": ["derived/xquad_qa_pairs_ar.jsonl", "derived/arcd_qa_pairs_ar.jsonl"],
              "english": ["derived/xquad_qa_pairs_en.jsonl"]}
BENCH_TASKS = ("arabicmmlu", "acva", "hellaswag", "piqa")
LANGS = ("arabic", "english")
SCRIPT = {"arabic": "arabic", "english": "latin"}


def write_json(path: Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def copy_model_dir(src: Path, dst: Path) -> Path:
    """Copy a model directory atomically (a half-copied OUT/final never exists)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
    return dst


def resolve_data(data: str | None) -> Path:
    d = data or os.environ.get("DHAD_DATA_DIR")
    if not d:
        raise SpeedrunError("no data: pass --data DIR (holding corpus/arabic, corpus/english, corpus/instruct and "
                            "eval/) or set $DHAD_DATA_DIR; scripts/speedrun.sh uses ../shared/data")
    p = Path(d).expanduser()
    if not (p / "corpus").is_dir():
        raise SpeedrunError(f"--data {p}: no corpus/ directory in it (expected corpus/arabic, corpus/english, "
                            "corpus/instruct)")
    return p


def process_start_time() -> float:
    """Wall-clock time this process started (Linux /proc), so interpreter start and imports count too;
    elsewhere: now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        t = boot + ticks / os.sysconf("SC_CLK_TCK")
        return t if t <= time.time() else time.time()
    except Exception:  # noqa: BLE001 - not Linux: count from now
        return time.time()


def pick_device(device: str):
    import torch
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SpeedrunError("--device cuda: no CUDA device is available")
    return torch.device(device)
