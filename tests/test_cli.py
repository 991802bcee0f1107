"""The CLI layer: every command and sub-command answers --help; info, generate and demo run; the data
directory is found in one place."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dhad
from dhad.cli import COMMANDS, main
from dhad.config import Config
from dhad.model import Transformer

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "ذهب الولد إلى المدرسة في الصباح الباكر. " * 3,
         "Numbers 12345 and مرحبا بالعالم", "hello world, السلام عليكم"] * 20


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from dhad.tokenizer import train_bpe
    tok = train_bpe(TEXTS, vocab_size=400)
    cfg = Config.from_name("tiny-jais", vocab_size=tok.vocab_size)
    model = Transformer(cfg).init_weights(seed=0).eval()
    d = tmp_path_factory.mktemp("tiny")
    dhad.save_model(model, d, tokenizer=tok)
    return d


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: dhad " + command in capsys.readouterr().out


def _subcommands() -> list[tuple[str, str]]:
    """(command, sub-command) for every command that has sub-commands (tokenizer, adapt, data, eval)."""
    import argparse
    import importlib
    out = []
    for name, (module, _) in COMMANDS.items():
        p = argparse.ArgumentParser()
        importlib.import_module(module).add_arguments(p)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                out += [(name, sub) for sub in action.choices]
    return out


SUBCOMMANDS = _subcommands()


def test_the_commands_with_sub_commands_are_found():
    assert {(c, s) for c, s in SUBCOMMANDS} >= {("data", "translate"), ("data", "synth"), ("eval", "compare"),
                                                ("tokenizer", "extend"), ("adapt", "init"), ("eval", "mt-bench")}


@pytest.mark.parametrize("command,sub", SUBCOMMANDS, ids=[f"{c}-{s}" for c, s in SUBCOMMANDS])
def test_every_sub_command_has_help(command, sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, sub, "--help"])
    assert e.value.code == 0
    assert f"usage: dhad {command} {sub}" in capsys.readouterr().out


def test_dhad_lm_eval_is_lm_eval_with_dhad_registered(capsys):
    from lm_eval.api.registry import get_model

    from dhad.cli.lm_eval import main as lm_eval_main
    with pytest.raises(SystemExit) as e:
        lm_eval_main(["--help"])
    assert e.value.code == 0 and "lm-eval" in capsys.readouterr().out.lower()
    from dhad.evaluate.lm_eval_adapter import DhadLM
    assert get_model("dhad") is DhadLM


def test_data_dir_is_the_flag_else_the_environment(monkeypatch, tmp_path):
    from dhad.utils import data_dir
    monkeypatch.setenv("DHAD_DATA_DIR", str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env" and data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert data_dir("~/d") == Path.home() / "d"
    monkeypatch.setenv("DHAD_DATA_DIR", "")
    assert data_dir() is None and data_dir("") is None
    monkeypatch.delenv("DHAD_DATA_DIR")
    assert data_dir() is None


def test_one_place_reads_the_data_dir_variable():
    """$DHAD_DATA_DIR is read by dhad.utils.data_dir only; every other module asks it."""
    import ast
    root = Path(dhad.__file__).parent
    readers = {p.relative_to(root).as_posix() for p in root.rglob("*.py")
               for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
               if isinstance(node, ast.Constant) and node.value == "DHAD_DATA_DIR"}
    assert readers == {"utils.py"}


@pytest.mark.parametrize("command", ["train", "speedrun", "eval", "tokenizer"])
def test_commands_take_the_data_dir_from_the_environment(command, monkeypatch, tmp_path, capsys):
    """Without --data and without $DHAD_DATA_DIR each command says what is missing (train: it looks in the
    current directory); with the variable set it looks where it points."""
    args = {"train": ["train", "--recipe", "tiny-jais-family-pretrain"],
            "speedrun": ["speedrun", "--out", str(tmp_path / "run"), "--ci", "--until", "tokenizer"],
            "eval": ["eval", "--model", str(tmp_path), "--tasks", "acva"],
            "tokenizer": ["tokenizer", "train", "--vocab-size", "300", "--out", str(tmp_path / "tok")]}[command]
    monkeypatch.delenv("DHAD_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ("DHAD_DATA_DIR" in err) != (command == "train" and str(tmp_path / "tokenizer") in err), err
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("DHAD_DATA_DIR", str(missing))
    assert main(args) == 2
    assert str(missing) in capsys.readouterr().err


def test_python_dash_m_is_dhad():
    out = subprocess.run([sys.executable, "-m", "dhad", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "speedrun" in out.stdout


def test_info(tiny_dir, capsys):
    assert main(["info", "--model", str(tiny_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == Config.from_file(tiny_dir).num_params() and info["position"] == "alibi"
    assert main(["info", "--model", str(tiny_dir / "missing")]) == 2


def test_generate_greedy_matches_library(tiny_dir, capsys):
    from dhad.generate import generate_ids
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hello world", "--max-new-tokens", "12",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    model, tok = dhad.load_model(tiny_dir), dhad.load_tokenizer(tiny_dir)
    new = generate_ids(model, [tok.encode("hello world")], max_new_tokens=12)[0]
    assert got["text"] == tok.decode(new, skip_special_tokens=True)
    # the cache path equals recomputing the whole sequence each step
    ids = torch.tensor([tok.encode("hello world")])
    ref = []
    with torch.no_grad():
        for _ in range(len(new)):
            t = int(model(ids)[0, -1].argmax())
            ref.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
    assert new == ref


def test_generate_sampled_is_seeded(tiny_dir, capsys):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "مرحبا", "--max-new-tokens", "10", "--do-sample",
            "--temperature", "0.9", "--seed", "7", "--json"]
    main(args)
    a = json.loads(capsys.readouterr().out)["text"]
    main(args)
    b = json.loads(capsys.readouterr().out)["text"]
    assert a == b


def test_generate_chat_and_errors(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--chat", "--max-new-tokens", "4"]) == 0
    assert main(["generate", "--model", str(tiny_dir)]) == 2
    assert "give --prompt" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--temperature", "-1", "--do-sample"]) == 2


def test_demo_builds_the_demo_model(demo_dir, tmp_path, capsys):
    """`dhad demo OUT` writes the same model as the library call the serve and chat tests use (same seed)."""
    from safetensors.torch import load_file
    assert main(["demo", str(tmp_path / "demo")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "demo")
    ours, ref = load_file(tmp_path / "demo" / "model.safetensors"), load_file(demo_dir / "model.safetensors")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert main(["demo", str(tmp_path / "x"), "--steps", "0"]) == 2
