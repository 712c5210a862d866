"""Tiny random MoE checkpoints with a character tokenizer, saved as a model folder."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.models.hf_checkpoints import make_checkpoint

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                "{% if add_generation_prompt %}assistant: {% endif %}"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One id per printable ASCII character (ids 32..126), <pad> = 0, <eos> = 1, within a 128 vocab."""
    vocab = {chr(i): i for i in range(32, 127)}
    vocab.update({"<pad>": 0, "<eos>": 1, "\n": 10})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model_dir(arch: str, folder) -> tuple[str, object, PreTrainedTokenizerFast]:
    """Save a tiny random ``arch`` model and the tokenizer in ``folder``; return (path, hf_model, tokenizer)."""
    hf = make_checkpoint(arch, str(folder))
    tok = char_tokenizer()
    tok.save_pretrained(str(folder))
    return str(folder), hf, tok
