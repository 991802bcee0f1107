"""Serving: `dhad.serve.app.create_app` wires the routes (`routes_openai`: the OpenAI API, `routes_score`: the
card's /score, `routes_web`: the web chat and /health) over `dhad.serve.service` (validate, render and tokenise
off the event loop, submit, stream), with one error path (`dhad.serve.errors`) and bounded request costs
(`dhad.serve.limits`). `dhad.serve.backend` (engine + tokenizer + chat format) is shared with `dhad chat`,
`dhad.serve.filters` is the optional bilingual content filter and `dhad.serve.demo` a tiny model to try it.
See docs/serving.md."""
