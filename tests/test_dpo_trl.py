"""DPO parity with TRL's DPOTrainer (the independent reference): same tiny Llama, same pairs, same β.

TRL gets the model directory and the raw strings and does its own tokenization, collation, forward and
loss; dhad gets `dhad.load_model` of the same directory and the pairs encoded by dhad's tokenizer (the
test first checks these ids are exactly TRL's). Per-pair losses and rewards are compared pair by pair
(TRL run on one-pair batches, so its batch means are per-pair values), and the gradient of the first
step on the whole batch, parameter by parameter (dhad's fused q|k|v and gate|up mapped back to HF names).
"""
from __future__ import annotations

import pytest
import torch

import datasets  # noqa: E402  (test extras: a missing one is an error, not a skip)
import transformers  # noqa: E402
import trl  # noqa: E402

import dhad
from dhad.checkpoint import hf_state_dict
from dhad.train.dpo import Pair, collate, preference_loss, sequence_logps

pytestmark = pytest.mark.one_thread  # tiny models: see conftest._one_thread

BETA = 0.1


N_PAIRS = 6

# Small, hand-written bilingual pairs in the shape of the shared derived QA pairs (prompt ends with the
# question, answers are short spans). Data in the repo stays tiny; the real files are used elsewhere.
RAW = [
    ("The Panthers defense gave up just 308 points.\nHow many points did the defense give up?\nA:", " 308", " Kawann Short"),
    ("Josh Norman had four interceptions in the season.\nHow many interceptions did Norman have?\nA:", " four", " 136 sacks"),
    ("ولد الإسكندر في مدينة بيلا عام 356 قبل الميلاد.\nأين ولد الإسكندر؟\nA:", " في مدينة بيلا", " عام 356"),
    ("Jebel Jais is the highest mountain in the UAE.\nWhat is the highest mountain in the UAE?\nA:", " Jebel Jais", " the UAE"),
    ("تقع جامعة القاهرة في الجيزة وتأسست عام 1908.\nمتى تأسست جامعة القاهرة؟\nA:", " عام 1908", " في الجيزة"),
    ("The AKS primality test runs in polynomial time.\nWhich test is polynomial?\nA:", " The AKS primality test", " time"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dhad.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("dpo_trl")
    texts = [p + c + r for p, c, r in RAW] * 4
    tok = train_bpe(texts, 300, chat_template=None)
    ref_dir, pol_dir = root / "ref", root / "policy"
    for d in (ref_dir, pol_dir):
        tok.save(d)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg)
    ref.save_pretrained(ref_dir)
    # The policy is the reference moved a little, as after some training: rewards are then far from 0.
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(pol_dir)
    hf_tok = AutoTokenizer.from_pretrained(pol_dir)
    eos = tok.eos_token_id
    pairs = []
    for i, (p, c, r) in enumerate(RAW):
        pids = tok.encode(p)
        pairs.append(Pair(i, pids, tok.encode(c) + [eos], tok.encode(r) + [eos]))
    return dict(root=root, ref_dir=ref_dir, pol_dir=pol_dir, hf_tok=hf_tok, pairs=pairs)


def _trainer(s, loss_type: str):
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(s["root"] / f"trl-{loss_type}"), per_device_train_batch_size=N_PAIRS,
                     max_steps=1, beta=BETA, loss_type=[loss_type], learning_rate=1e-3, report_to=[],
                     use_cpu=True, bf16=False, max_grad_norm=0.0, save_strategy="no", logging_steps=1, disable_tqdm=True,
                     dataloader_num_workers=0, seed=0, gradient_checkpointing=False)
    ds = datasets.Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in RAW])
    ref = LlamaForCausalLM.from_pretrained(s["ref_dir"], dtype=torch.float32)
    return DPOTrainer(model=str(s["pol_dir"]), ref_model=ref, args=args, train_dataset=ds,
                      processing_class=s["hf_tok"])


def _trl_per_pair(tr):
    """TRL's loss and rewards for each pair alone (a one-pair batch: the batch means are that pair's values)."""
    model = tr.model
    model.train()
    losses, chosen, rejected = [], [], []
    with torch.no_grad():
        for i in range(N_PAIRS):
            batch = tr.data_collator([tr.train_dataset[i]])
            tr._metrics["train"].clear()
            losses.append(float(tr.compute_loss(model, batch)))
            chosen.append(tr._metrics["train"]["rewards/chosen"][-1])
            rejected.append(tr._metrics["train"]["rewards/rejected"][-1])
    return torch.tensor(losses), torch.tensor(chosen), torch.tensor(rejected)


def _trl_first_step_grads(tr) -> dict[str, torch.Tensor]:
    """TRL's own `train()` for one step (one batch of all pairs, no clipping); the gradient is read just
    before its optimizer step."""
    from transformers import TrainerCallback

    grads = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            if not grads:
                grads.update({n: p.grad.detach().clone() for n, p in tr.model.named_parameters()})

    tr.add_callback(Grab())
    tr.train()
    return grads


def _dhad(s, loss_type: str, share_prompt: bool):
    pol = dhad.load_model(s["pol_dir"]).train()
    ref = dhad.load_model(s["ref_dir"])
    pairs = s["pairs"]
    b = collate(pairs, share_prompt)
    with torch.no_grad():
        r = sequence_logps(ref, b)
    lp = sequence_logps(pol, b)
    B = len(pairs)
    out = preference_loss(lp[:B], lp[B:], r[:B], r[B:], beta=BETA, loss=loss_type,
                          n_chosen=b["n_chosen"], n_rejected=b["n_rejected"])
    out.loss.backward()
    # map dhad's gradients to HF parameter names through the checkpoint key map
    grads = dhad.load_model(s["pol_dir"])
    for pg, p in zip(grads.parameters(), pol.parameters()):
        pg.data = p.grad.detach().clone()
    return out, dict(hf_state_dict(grads))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_matches_trl(setup, loss_type):
    s = setup
    tr = _trainer(s, loss_type)
    # the same pairs: dhad's token ids are exactly the ones TRL built from the strings
    for i, p in enumerate(s["pairs"]):
        row = tr.train_dataset[i]
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (p.prompt, p.chosen, p.rejected)
    trl_loss, trl_chosen, trl_rejected = _trl_per_pair(tr)
    trl_grads = _trl_first_step_grads(tr)
    assert trl_chosen.abs().max() > 0.05, "policy too close to the reference for a meaningful comparison"

    for share_prompt in (True, False):
        out, grads = _dhad(s, loss_type, share_prompt)
        torch.testing.assert_close(out.losses.detach(), trl_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.chosen_rewards, trl_chosen, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.rejected_rewards, trl_rejected, rtol=1e-5, atol=1e-5)
        assert set(grads) == set(trl_grads)
        for name, g in trl_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
