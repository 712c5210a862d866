"""Train the tiny embedded demo MoE model and its two LoRA adapters (CPU, minutes).

Writes (default ``--out examples``):

    examples/demo_model/            Qwen3MoeForCausalLM + char tokenizer, as transformers saves it
    examples/demo_adapters/upper/   peft LoRA: answer in upper case   ("hello=" -> "HELLO")
    examples/demo_adapters/rot13/   peft LoRA: answer in rot13        ("hello=" -> "uryyb")

The base model copies its input ("hello=" -> "hello").  The files are left
exactly as ``save_pretrained`` of transformers 5.24 / peft 0.21.2 writes them
(only peft's boilerplate README.md model card is removed and
``base_model_name_or_path`` is set to a relative path), because the engine
loads them itself.

Usage::

    python examples/train_demo_model.py              # train + save + evaluate
    python examples/train_demo_model.py --eval-only  # evaluate the saved files
    python examples/train_demo_model.py --out /tmp/x # write elsewhere

The prompt format, tokenizer, model config, training recipe, adapter files and measured accuracy
are described in docs/demo_model.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import string
import sys
import time

import torch

# Nothing is fetched from a hub: peft looks up base_model_name_or_path when it saves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOWER = string.ascii_lowercase
UPPER = string.ascii_uppercase
MARK = "="
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MIN_LEN, MAX_LEN = 3, 10

TRAIN_SEED = 0
EVAL_SEED = 12345
N_EVAL = 200

CHAT_TEMPLATE = (
    "{%- set ns = namespace(text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.text = message['content'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.text -}}="
)

ROT13 = str.maketrans(
    LOWER + UPPER, LOWER[13:] + LOWER[:13] + UPPER[13:] + UPPER[:13]
)

TASKS = {
    "base": lambda s: s,
    "upper": lambda s: s.upper(),
    "rot13": lambda s: s.translate(ROT13),
}

# Adapter hyper-parameters (rank, alpha, steps, lr).
ADAPTERS = {
    "upper": dict(r=4, lora_alpha=16, steps=400, lr=3e-3),
    "rot13": dict(r=8, lora_alpha=16, steps=400, lr=3e-3),
}
BASE_STEPS = 1500
BASE_LR = 3e-3
BATCH = 128


def heldout_strings(n: int = N_EVAL, seed: int = EVAL_SEED) -> list[str]:
    """Deterministic held-out lowercase strings (never used in training)."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        s = "".join(rng.choice(LOWER) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


# --------------------------------------------------------------------------
# tokenizer


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [MARK] + list(LOWER) + list(UPPER))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=64,
        chat_template=CHAT_TEMPLATE,
    )
    assert hf.convert_tokens_to_ids(SPECIALS) == [PAD_ID, BOS_ID, EOS_ID, UNK_ID]
    return hf


def encode_chars(s: str) -> list[int]:
    """Token ids without a tokenizer object (same mapping as build_tokenizer)."""
    table = {c: i for i, c in enumerate(SPECIALS + [MARK] + list(LOWER) + list(UPPER))}
    return [table.get(c, UNK_ID) for c in s]


# --------------------------------------------------------------------------
# data


def make_batch(rng: random.Random, task: str, excluded: set[str], batch: int,
               mixed_case_frac: float = 0.0):
    """Right-padded (input_ids, labels); loss only on the answer and EOS.

    Right padding needs no attention mask: attention is causal, so real
    tokens never see the padding after them.
    """
    fn = TASKS[task]
    seqs, labs = [], []
    while len(seqs) < batch:
        alphabet = LOWER + UPPER if rng.random() < mixed_case_frac else LOWER
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
        if s in excluded:
            continue
        prompt = encode_chars(s + MARK)
        answer = encode_chars(fn(s)) + [EOS_ID]
        seqs.append(prompt + answer)
        labs.append([-100] * len(prompt) + answer)
    T = max(len(x) for x in seqs)
    ids = torch.full((batch, T), PAD_ID, dtype=torch.long)
    lab = torch.full((batch, T), -100, dtype=torch.long)
    for i, (x, y) in enumerate(zip(seqs, labs)):
        ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
    return ids, lab


def lr_lambda(steps: int, warmup: int, floor: float = 0.1):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def train_loop(model, params, task, steps, lr, excluded, seed, *, mixed_case_frac=0.0,
               weight_decay=0.0, warmup=50, router_aux=False, log_every=100):
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup))
    model.train()
    t0 = time.time()
    for step in range(steps):
        ids, lab = make_batch(rng, task, excluded, BATCH, mixed_case_frac)
        kw = {"output_router_logits": True} if router_aux else {}
        out = model(input_ids=ids, labels=lab, **kw)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0 or step == 0:
            print(f"  [{task}] step {step + 1:5d}/{steps} loss {out.loss.item():.4f} "
                  f"lr {sched.get_last_lr()[0]:.2e} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return time.time() - t0


# --------------------------------------------------------------------------
# model


def build_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=len(SPECIALS) + 1 + 52,
        hidden_size=128,
        intermediate_size=256,  # dense MLP size; unused (every layer is MoE)
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        router_aux_loss_coef=1e-3,
        output_router_logits=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
    )


def lora_config(r: int, lora_alpha: int):
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        task_type="CAUSAL_LM",
    )


# --------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def generate_answers(model, strings: list[str]) -> list[str]:
    """Greedy transformers generate; strings of equal length share a batch (no padding)."""
    from collections import defaultdict

    by_len = defaultdict(list)
    for i, s in enumerate(strings):
        by_len[len(s)].append(i)
    out = [None] * len(strings)
    for L, idx in sorted(by_len.items()):
        ids = torch.tensor([encode_chars(strings[i] + MARK) for i in idx])
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_LEN + 2,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
        for row, i in zip(gen[:, ids.shape[1]:].tolist(), idx):
            if EOS_ID in row:
                row = row[: row.index(EOS_ID)]
            out[i] = decode_chars(row)
    return out


def decode_chars(ids: list[int]) -> str:
    table = SPECIALS + [MARK] + list(LOWER) + list(UPPER)
    return "".join(table[i] if i >= len(SPECIALS) else ("?" if i != PAD_ID else "") for i in ids)


def load_base(model_dir: str):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    m.eval()
    return m


def load_adapter(model_dir: str, adapter_dir: str):
    from peft import PeftModel

    m = PeftModel.from_pretrained(load_base(model_dir), adapter_dir)
    m.eval()
    return m


def zero_lora_b(model, part: str):
    """Switch off one part of an adapter ("experts" or "self_attn") by zeroing its B matrices."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and f".{part}." in n:
                p.zero_()
    return model


def evaluate(out_dir: str, strings: list[str], ablation: bool = True) -> dict:
    """Exact-match accuracy of every model (rows) against every task (columns).

    With ``ablation``, each adapter is also run with only its attention part
    (expert LoRA zeroed) and only its expert part, to show that both matter.
    """
    model_dir = os.path.join(out_dir, "demo_model")
    answers = {"base": generate_answers(load_base(model_dir), strings)}
    for name in ADAPTERS:
        adir = os.path.join(out_dir, "demo_adapters", name)
        answers[name] = generate_answers(load_adapter(model_dir, adir), strings)
        if ablation:
            answers[f"{name}/attn only"] = generate_answers(
                zero_lora_b(load_adapter(model_dir, adir), "experts"), strings)
            answers[f"{name}/experts only"] = generate_answers(
                zero_lora_b(load_adapter(model_dir, adir), "self_attn"), strings)
    acc = {
        m: {t: sum(a == TASKS[t](s) for a, s in zip(answers[m], strings)) / len(strings)
            for t in TASKS}
        for m in answers
    }
    print(f"\nExact match on {len(strings)} held-out strings "
          "(rows: model, columns: expected transformation)")
    print(f"  {'model':20s} " + " ".join(f"{t:>7s}" for t in TASKS))
    for m in answers:
        print(f"  {m:20s} " + " ".join(f"{100 * acc[m][t]:6.1f}%" for t in TASKS))
    print("  examples:")
    for i, s in enumerate(strings[:4]):
        print(f"    {s + MARK:12s}", " ".join(f"{m}={answers[m][i]!r}" for m in TASKS))
    for m in TASKS:
        misses = [(s, answers[m][i]) for i, s in enumerate(strings) if answers[m][i] != TASKS[m](s)]
        if misses:
            print(f"  {m} misses ({len(misses)}): {misses[:5]}")
    return acc


def check_tokenizer(model_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    for s in ["hello", "abcXYZ", "qwerty"]:
        ids = tok.encode(s + MARK)
        assert ids == encode_chars(s + MARK), (s, ids)
        assert tok.decode(ids + [EOS_ID, PAD_ID], skip_special_tokens=True) == s + MARK
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "hello=", repr(text)
    print(f"tokenizer ok: {type(tok).__name__}, vocab {len(tok)}, "
          f"bos/eos/pad/unk = {tok.bos_token_id}/{tok.eos_token_id}/{tok.pad_token_id}/{tok.unk_token_id}")


# --------------------------------------------------------------------------
# main


def relative_name(path: str) -> str:
    """A path relative to the repository root (or just the folder name)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rel = os.path.relpath(os.path.abspath(path), root)
    return os.path.basename(os.path.normpath(path)) if rel.startswith("..") else rel


def train_all(out_dir: str, heldout: set[str]) -> dict:
    from peft import get_peft_model
    from transformers import GenerationConfig, Qwen3MoeForCausalLM

    times = {}
    model_dir = os.path.join(out_dir, "demo_model")
    os.makedirs(model_dir, exist_ok=True)

    tok = build_tokenizer()
    tok.save_pretrained(model_dir)
    # transformers 5 no longer writes special_tokens_map.json; older loaders read it.
    with open(os.path.join(model_dir, "special_tokens_map.json"), "w") as f:
        json.dump({k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")},
                  f, indent=2)
        f.write("\n")

    torch.manual_seed(TRAIN_SEED)
    cfg = build_config()
    model = Qwen3MoeForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"base model: {n_params / 1e6:.2f}M parameters; training copy task ({BASE_STEPS} steps)")
    times["base"] = train_loop(
        model, [p for p in model.parameters()], "base", BASE_STEPS, BASE_LR, heldout,
        TRAIN_SEED, mixed_case_frac=0.2, weight_decay=0.01, warmup=100, router_aux=True)
    model.save_pretrained(model_dir)

    for k, (name, hp) in enumerate(ADAPTERS.items()):
        torch.manual_seed(TRAIN_SEED + 1 + k)
        base = load_base(model_dir)
        peft_model = get_peft_model(base, lora_config(hp["r"], hp["lora_alpha"]))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        assert params and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
        print(f"adapter {name}: r={hp['r']} alpha={hp['lora_alpha']}, "
              f"{sum(p.numel() for p in params)} trainable parameters ({hp['steps']} steps)")
        times[name] = train_loop(peft_model, params, name, hp["steps"], hp["lr"], heldout,
                                 TRAIN_SEED + 1 + k, warmup=30)
        adir = os.path.join(out_dir, "demo_adapters", name)
        peft_model.peft_config["default"].base_model_name_or_path = relative_name(model_dir)
        peft_model.save_pretrained(adir)
        card = os.path.join(adir, "README.md")
        if os.path.exists(card):
            os.remove(card)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                    help="folder that gets demo_model/ and demo_adapters/ (default: examples/)")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the saved files")
    ap.add_argument("--n-eval", type=int, default=N_EVAL)
    ap.add_argument("--no-ablation", action="store_true",
                    help="skip the attention-only / experts-only adapter rows")
    args = ap.parse_args()

    torch.set_num_threads(2)
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0, c0 = time.time(), time.process_time()
    strings = heldout_strings(max(args.n_eval, N_EVAL))
    heldout = set(strings)
    strings = strings[: args.n_eval]
    if not args.eval_only:
        times = train_all(args.out, heldout)
        print("training time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    check_tokenizer(os.path.join(args.out, "demo_model"))
    acc = evaluate(args.out, strings, ablation=not args.no_ablation)
    print(f"total time {time.time() - t0:.0f}s wall, {time.process_time() - c0:.0f}s CPU")
    ok = all(acc[m][m] >= 0.95 for m in TASKS)
    # The adapters must visibly change behaviour: the base must not do their task.
    ok &= all(acc["base"][t] < 0.05 for t in ADAPTERS)
    print("PASS" if ok else "FAIL: accuracy below 95 % or the adapters do not change behaviour")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
