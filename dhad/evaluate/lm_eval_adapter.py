"""dhad models inside lm-evaluation-harness: `--model dhad --model_args pretrained=DIR`.

lm-eval 0.4.x finds models only in its registry (`lm_eval.api.registry.model_registry`); it does not
read package entry points, so the `dhad` name exists once this module is imported. Two ways that work:

    python -m dhad.evaluate.lm_eval_adapter run --model dhad --model_args pretrained=DIR --tasks hellaswag
        (imports this module, then runs lm-eval's own CLI with the same arguments)

    import dhad.evaluate.lm_eval_adapter, lm_eval
    lm_eval.simple_evaluate(model="dhad", model_args={"pretrained": DIR}, tasks=[...])

Requests are served by dhad's `Scorer` (requests with the same context tokens form one token tree:
the context runs once), `loglikelihood_rolling` uses the harness's own rolling windows, and `generate_until` decodes
with `dhad.generate.generate_ids` (KV cache) and cuts at the stop strings like the `hf` backend.
Model arguments: pretrained (or model), dtype, device, batch_size (rows per forward),
batch_tokens, max_length, download (True: `pretrained` is a Hugging Face repo id to fetch).
"""
from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401  (lm-eval's own models first: an empty registry would hold only ours)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


class DhadLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, dtype: str = "float32",
                 device: str | None = "cpu", batch_size: int | str | None = 64, max_batch_size: int | None = None,
                 batch_tokens: int = 16384, max_length: int | None = None, max_gen_toks: int = 256,
                 download: bool | str = False, **kwargs):
        super().__init__()
        import torch

        import dhad
        from dhad.evaluate.scoring import Scorer

        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI asks for cuda by default; say so and run where we can
            import logging
            logging.getLogger(__name__).warning("dhad: %s requested but CUDA is not available; using cpu", device)
            device = "cpu"

        if isinstance(model, str) and pretrained is None:  # model_args model=DIR
            pretrained, model = model, None
        if model is None:
            if pretrained is None:
                raise ValueError("dhad: pass model_args pretrained=DIR (a dhad / Hugging Face model directory)")
            from dhad.checkpoint import resolve_model_dir
            # model_args download=True fetches a Hub repo id (the missing-directory error suggests it)
            path = resolve_model_dir(pretrained, download=str(download).lower() in ("1", "true", "yes"))
            model = dhad.load_model(path, dtype=dtype, device=device or "cpu")
            tokenizer = tokenizer or dhad.load_tokenizer(path)
        elif tokenizer is None:
            raise ValueError("dhad: a model object needs tokenizer=")
        self.model, self.tokenizer = model, tokenizer
        rows = 64 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(model, tokenizer, max_length=max_length, batch_tokens=int(batch_tokens), max_rows=rows)
        self._max_gen_toks = int(max_gen_toks)
        self.backend = "causal"

    # -- tokenization (the harness's conventions; BOS as the tokenizer config says) -----------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.scorer.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=True if add_special_tokens is None else add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- requests ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        groups: dict[tuple, list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            groups.setdefault(tuple(ctx), []).append(i)
        order = list(groups.values())
        token_groups = [[(list(requests[i][1]), list(requests[i][2])) for i in idx] for idx in order]
        bar = None
        if not disable_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(requests), desc="dhad loglikelihood")
        scored = self.scorer.loglikelihood_tokens(token_groups, progress=bar)
        if bar is not None:
            bar.close()
        out: list = [None] * len(requests)
        for idx, res in zip(order, scored):
            for i, r in zip(idx, res):
                out[i] = r
                self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append([(list(ctx), list(cont))])
                owner.append(i)
        scored = self.scorer.loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for i, res in zip(owner, scored):
            totals[i] += res[0][0]
        for req, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, t)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        from dhad.generate import SamplingParams, generate_ids

        out = []
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        for req in requests:
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), self._max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_gen = kw.pop("max_gen_toks")
            ids = self.tok_encode(context)[-(self.max_length - max_gen):]
            do_sample = bool(kw.get("do_sample", False))
            params = SamplingParams(max_new_tokens=max_gen, do_sample=do_sample,
                                    temperature=float(kw.get("temperature") or 1.0) if do_sample else 1.0,
                                    top_p=float(kw.get("top_p", 1.0)), stop_strings=tuple(until))
            new = generate_ids(self.model, [ids], params, tokenizer=self.tokenizer)[0]
            s = self.tok_decode(new)
            for term in until:  # the hf backend cuts at every stop sequence
                if term:
                    s = s.split(term)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), s)
            out.append(s)
        return out


def main(argv: list[str] | None = None) -> int:
    """`python -m dhad.evaluate.lm_eval_adapter <lm_eval arguments>`: lm-eval's CLI with `dhad` registered."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["lm_eval"] + argv
    cli_evaluate()
    return 0


if __name__ == "__main__":
    # Run the importable module (not this __main__ copy) so `dhad` is registered exactly once.
    from dhad.evaluate import lm_eval_adapter as _adapter  # noqa: PLW0406 - on purpose, see above

    sys.exit(_adapter.main())
else:
    register_model("dhad")(DhadLM)
