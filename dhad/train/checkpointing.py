"""Training state: periodic and on SIGTERM/SIGINT, atomic, resumable on any number of processes.

Layout of a run directory::

    RUN/recipe.yaml                  the recipe as run (resolved)
    RUN/metrics.jsonl                one JSON record per logged step / evaluation
    RUN/checkpoints/step_00000100/   one complete training state:
        train_state/                 model + optimizer, sharded, via torch.distributed.checkpoint (DCP)
        rng/rank_00000.json          torch / numpy / python RNG states of each process
        meta.json                    step, data position (mixture state), tokens, plan, written last
    RUN/checkpoints/latest           name of the newest complete checkpoint
    RUN/model/                       the final dhad / Hugging Face model directory (+ tokenizer files)
    RUN/mixture.json                 tokens seen per stage and source

Atomicity: everything is written into `checkpoints/.tmp-step_N`, which rank 0 renames to `step_N`
only after every process has finished writing; `latest` is then replaced atomically. A run killed
at any point leaves the previous checkpoint intact and `latest` pointing at a complete one.

Training state lives beside the model directory, never inside it. DCP's `.metadata` file is
pickled by torch: these checkpoints are a run's own trusted state, not files to accept from others;
the shared artefact is `RUN/model` (safetensors).
"""
from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dhad.train.distributed import DistEnv, barrier, unwrap
from dhad.utils import atomic_write_json as _write_json_atomic


class CheckpointError(RuntimeError):
    """A training checkpoint that cannot be read: names the file."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint of another model (tensor names or shapes differ from this run's)."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------
# RNG

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def rng_state() -> dict:
    st = {"torch": _b64(torch.get_rng_state()), "python": repr(random.getstate())}
    ns = np.random.get_state()
    st["numpy"] = [ns[0], base64.b64encode(ns[1].tobytes()).decode(), int(ns[2]), int(ns[3]), float(ns[4])]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = _b64(torch.cuda.get_rng_state())
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(st["torch"]), dtype=np.uint8).copy()))
    import ast
    v, internal, gauss = ast.literal_eval(st["python"])  # plain tuple of ints: no eval of code
    random.setstate((v, tuple(internal), gauss))
    n = st["numpy"]
    np.random.set_state((n[0], np.frombuffer(base64.b64decode(n[1]), dtype=np.uint32).copy(), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(st["cuda"]), dtype=np.uint8).copy()))


# ---------------------------------------------------------------------------------------------
# Save / load

def save_checkpoint(run_dir: Path, step: int, model, optimizer, meta: dict, env: DistEnv, keep: int = 2,
                    trainable_only: bool = False) -> Path:
    """Write the training state after `step` optimizer updates; collective (every rank calls it).
    trainable_only (LoRA runs): the model state holds only the parameters that train -- the frozen base
    is the run's starting point, rebuilt from the recipe on resume, and is not written again."""
    ck = Path(run_dir) / "checkpoints"
    final = ck / step_name(step)
    tmp = ck / f".tmp-{step_name(step)}"
    if env.is_main:
        ck.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    barrier(env)
    m = unwrap(model)
    # Which parameters have optimizer state (a frozen stage leaves some without): load needs the same set.
    with_state = [n for n, p in m.named_parameters() if p in optimizer.state]
    msd, osd = get_state_dict(m, optimizer, options=StateDictOptions(ignore_frozen_params=trainable_only))
    with warnings.catch_warnings():  # single-process DCP warns that it is single-process
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "train_state"))
    _write_json_atomic(tmp / "rng" / f"rank_{env.rank:05d}.json", rng_state())
    barrier(env)
    if env.is_main:
        _write_json_atomic(tmp / "meta.json", {**meta, "step": step, "world_size": env.world_size,
                                               "optim_params": with_state})
        if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
            old = ck / f".old-{step_name(step)}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        (ck / ".latest.tmp").write_text(step_name(step) + "\n")
        os.replace(ck / ".latest.tmp", ck / "latest")
        done = sorted(p for p in ck.glob("step_*") if (p / "meta.json").is_file())
        for old in done[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """A run's complete checkpoints, newest first: the one `latest` names, then the others by step."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    done = sorted((p for p in ck.glob("step_*") if (p / "meta.json").is_file()), reverse=True)
    ptr = ck / "latest"
    if ptr.is_file():
        p = ck / ptr.read_text().strip()
        if p in done:
            done.remove(p)
            done.insert(0, p)
    return done


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (follows `latest`, else scans), or None."""
    done = complete_checkpoints(run_dir)
    return done[0] if done else None


def set_aside(path: Path, env: DistEnv) -> Path:
    """Move an unreadable checkpoint out of the way, kept for inspection: checkpoints/.corrupt-step_N
    (collective; no longer a candidate for resuming, and never pruned as an old checkpoint)."""
    path = Path(path)
    aside = path.with_name(f".corrupt-{path.name}")
    if env.is_main:
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(path, aside)
    barrier(env)
    return aside


KERNEL_KEYS = ("fused", "foreach", "capturable", "differentiable")  # how AdamW runs, not what it computes


def load_checkpoint(path: Path, model, optimizer, env: DistEnv, trainable_only: bool = False) -> dict:
    """Restore model, optimizer and this rank's RNG from `path`; returns its meta.json.
    trainable_only: the checkpoint holds the trainable parameters alone (see `save_checkpoint`)."""
    path = Path(path)
    meta_p = path / "meta.json"
    if not meta_p.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_p}: invalid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_p}: expected a JSON object, got {type(meta).__name__}")
    if not (path / "train_state" / ".metadata").is_file():
        raise CheckpointError(f"{path}/train_state: missing DCP metadata (incomplete checkpoint)")
    m = unwrap(model)
    # get_state_dict() creates empty optimizer state for the parameters that require grad; make that
    # exactly the set that had state when saved (a checkpoint from a frozen-backbone stage has none for
    # the backbone, a later one has it for all), then restore the caller's requires_grad flags.
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    # Loading puts the saved param_groups back, and with them the saving run's AdamW kernel choice
    # (fused for plain tensors, foreach for FSDP's DTensors): keep this run's (an FSDP checkpoint
    # resumed on one process would otherwise run foreach while the loop hands the step a fused-only
    # grad_scale).
    kernel = {k: optimizer.defaults[k] for k in KERNEL_KEYS if k in optimizer.defaults}
    had = meta.get("optim_params")
    if had is not None and not (isinstance(had, list) and all(isinstance(n, str) for n in had)):
        raise CheckpointError(f"{meta_p}: optim_params is not a list of parameter names")
    if had is not None:
        for n, p in m.named_parameters():
            p.requires_grad_(n in set(had))
    try:
        opts = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
        msd, osd = get_state_dict(m, optimizer, options=opts)
        _check_same_model(path / "train_state", msd)
        sd = {"model": msd, "optim": osd}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            try:
                dcp.load(sd, checkpoint_id=str(path / "train_state"))
            except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - zip reader, unpickler, ...
                raise CheckpointError(f"{path / 'train_state'}: cannot read the model/optimizer state "
                                      f"(corrupt or truncated file?): {_short(e)}") from None
        set_state_dict(m, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=opts)
    finally:
        for g in optimizer.param_groups:  # the kernel is this run's choice, not the saving run's
            g.update(kernel)
        for n, p in m.named_parameters():
            p.requires_grad_(flags[n])
    rng = path / "rng" / f"rank_{env.rank:05d}.json"
    if rng.is_file():  # absent when resuming on more processes than saved: that rank keeps its seed
        try:
            set_rng_state(json.loads(rng.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, IndexError, SyntaxError) as e:
            raise CheckpointError(f"{rng}: not a saved RNG state ({type(e).__name__}: {e})") from None
    return meta


def _check_same_model(state_dir: Path, model_sd: dict) -> None:
    """The saved model tensors are this model's, by name and shape (DCP's `.metadata` describes them)."""
    try:
        saved = dcp.FileSystemReader(str(state_dir)).read_metadata().state_dict_metadata
    except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - a pickle: any error means unreadable
        raise CheckpointError(f"{state_dir / '.metadata'}: cannot read (corrupt or truncated?): {_short(e)}") from None
    have = {f"model.{n}": tuple(t.shape) for n, t in model_sd.items()}
    was = {k: tuple(v.size) for k, v in saved.items() if k.startswith("model.") and hasattr(v, "size")}
    if have != was:
        diff = sorted(set(have) ^ set(was))[:3] or [k for k in have if have[k] != was[k]][:3]
        detail = ", ".join(f"{k[6:]} {was.get(k, 'missing')} saved vs {have.get(k, 'missing')} here" for k in diff)
        raise CheckpointMismatch(f"{state_dir.parent} was saved for another model ({detail}); resume with the "
                                 "recipe that wrote it, or start a new run")


def _short(e: BaseException, limit: int = 300) -> str:
    """One line for an exception; DCP's CheckpointException holds each failed rank's (exception, traceback)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, f = next(iter(failures.items()))
        inner = f[0] if isinstance(f, tuple) and f else f
        e = inner if isinstance(inner, BaseException) else e
        msg = f"rank {rank}: {type(e).__name__}: {e}"
    else:
        msg = f"{type(e).__name__}: {e}"
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[:limit] + " ..."


# ---------------------------------------------------------------------------------------------
# Signals

class StopSignal:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step (then checkpoints and
    exits). A second SIGINT while stopping aborts at once (KeyboardInterrupt)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signum: int | None = None
        self._old = {}
        self._signals = signals

    def __enter__(self):
        import threading
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for s in self._signals:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def stop(self) -> bool:
        return self.signum is not None

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False
