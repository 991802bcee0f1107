"""`dhad speedrun`: build, evaluate and serve a small bilingual chat model with one command.

    dhad speedrun                          # 15 minutes, everything included: runs/speedrun/{final,report.md}
    dhad speedrun --budget 60 --out runs/big
    dhad speedrun --recipe adapted         # the Jais-adapted path: English base + vocabulary extension
    dhad speedrun --ci                     # CI-sized (a minute and a half), same stages and artifacts

    from dhad.speedrun import SpeedrunConfig, run_speedrun
    res = run_speedrun(SpeedrunConfig(data="../shared/data", budget=15))

Stages (each writes `OUT/stages/NN-<name>.json` with its outputs, planned and used seconds once done):

    plan       measure training throughput (threads, fp32 vs bf16, a ladder of sizes); pick size, precision
    tokenizer  bilingual byte-level BPE + an English-only one trained the same way; fertility per language
               (adapted: + the English base extended with the bilingual tokenizer's Arabic tokens)
    data       sample the corpus (dhad.data.sample), clean/filter/dedup/tokenize/shard it per language with a
               held-out split (dhad.data.prepare); SFT shards (dhad.data.sft: packed, prompt-masked)
    donor      (adapted) a small bilingual model: its embeddings seed the projected init of new tokens
    pretrain   the trainer (dhad.train.loop) on a Jais-family-style model from scratch, until its share of
               the budget is spent (adapted: a Llama-style English-only base)
    adapt      (adapted) extend + projected init (dhad.adapt), then embeddings only, then everything
    baseline   a Kneser-Ney n-gram model on exactly the tokens pretraining read (dhad.evaluate.ngram)
    sft        instruction tuning on bilingual instruction data, until its share is spent
    dpo        (--dpo) preference alignment on QA preference pairs
    check      ask the final model (and the model before SFT) in Arabic and English through `dhad serve`'s
               /score endpoint (greedy); the final model must answer in the script it was asked in
    eval       held-out bits per byte (dhad.evaluate.bpb) of the untrained, pretrained and final models; the
               cards' benchmarks with a --limit scaled to the time left
    report     report.md, report.json + PNGs (loss, throughput, eval, fertility)

The package, one module per concern: `common` (options, errors, stage list), `plan` (sizes, probe,
timetable), `prepare` (tokenizer and data stages), `training` (clock-driven training stages),
`evaluation` (baseline, check, eval), `report`, `run` (the clock and the bookkeeping), `cli`.
Only library calls: the trainer, data pipeline, tokenizer, adaptation, evaluation and server are the
project's own modules; nothing here trains, evaluates or serves by itself. See docs/speedrun.md.
"""
from dhad.speedrun.common import RECIPES, SpeedrunConfig, SpeedrunError, SpeedrunInterrupted, stage_names
from dhad.speedrun.run import run_speedrun

__all__ = ["RECIPES", "SpeedrunConfig", "SpeedrunError", "SpeedrunInterrupted", "run_speedrun", "stage_names"]
