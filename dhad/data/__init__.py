"""Data: readers, Arabic-aware cleaning, quality filters, dedup, and token shards (pretrain, SFT, prefs).

    shards.py   ShardWriter / ShardSet / PrefsSet: the on-disk contract trainers read (memmaps + index.json)
    readers.py  jsonl / json / txt / csv / parquet / hf: streams of documents; bad rows counted, never fatal
    clean.py    Unicode normalization that keeps Arabic harakat order, controls, broken lines, boilerplate
    filters.py  Gopher/Jais-style quality rules (length, script, symbols, repetition, stop words)
    dedup.py    exact + MinHash-LSH near-duplicate removal
    encoder.py  the tokenizer as the pipeline uses it (piecewise encoding for exact chat loss masks)
    sample.py   sampling a corpus folder by characters (equal shares per file, held-out documents)
    steps.py    the pretraining pipeline as datatrove pipeline steps (read, clean, filter, tokenize, MinHash
                stages, merge into shards + report)
    prepare.py  `dhad data prepare`: plans the inputs, builds the stages on datatrove's local / Slurm / Ray
                executor and runs them; the report table
    mixture.py  mixture weights (card presets) -> per-source token quotas
    reference.py  the sequential single-process pipeline it replaced (tests and benchmarks only)
    sft.py      `dhad data sft`: chat/Alpaca rows -> packed or unpacked SFT rows with loss masks
    prefs.py    `dhad data prefs`: preference pairs -> (prompt, chosen, rejected) ids

This package never imports dhad.model, the engine or anything that drives a model (DESIGN.md: data flows
one way); translation and synthesis with a teacher model live above the engine, in dhad.synth. See
docs/data.md. The `dhad data ...` commands are dhad/cli/data.py.
"""
