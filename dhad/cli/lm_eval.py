"""`dhad-lm-eval <lm_eval arguments>`: lm-evaluation-harness's own command line with the `dhad` model
registered (dhad.evaluate.lm_eval_adapter), e.g.

    dhad-lm-eval run --model dhad --model_args pretrained=DIR --tasks hellaswag --batch_size 64
    python -m dhad.cli.lm_eval run ...      (the same)
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import dhad.evaluate.lm_eval_adapter  # noqa: F401 - registers `--model dhad`
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["lm_eval"] + argv
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
