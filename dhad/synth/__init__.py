"""Data synthesis with a teacher model: machine translation and distilled / self-chat instruction data.

    backends.py   one async ``chat(messages)`` over an OpenAI-compatible endpoint or a dhad model in process
                  (through the batching engine): retries, concurrency limit, failures sorted by what to do
    translate.py  `dhad data translate`: chunk, translate, reassemble, quality rules, resumable JSONL output
    synth.py      `dhad data synth`: distillation and self-chat from seed prompts, filters, near-dedup
    cli.py        argument parsing for both (wired into `dhad data` by dhad/data/cli.py)

Layering: this package drives models, so it sits above generate/engine (beside serve and evaluate)
and below train. It reads and deduplicates with dhad.data; dhad.data never imports it. See
docs/data-synthesis.md.
"""
