"""Incremental detokenization and stop strings, on a char-level tokenizer built here."""
import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from vllm.sampling_params import SamplingParams
from vllm.sequence import Sequence, SequenceStatus
from vllm.transformers_utils.detokenizer import Detokenizer, find_stop_string
from vllm.transformers_utils.tokenizer import get_tokenizer


def char_tokenizer():
    """One token per ASCII character; other characters fall back to one token per
    UTF-8 byte (so 'é' is 2 tokens and '€' 3). <eos> is special."""
    vocab = {"<unk>": 0, "<eos>": 1}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?#\n":
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


TOK = char_tokenizer()


def stream(text, prompt="Q: ", eos=False, **params):
    """Feed ``text`` token by token as a model would; return (seq, stop, texts seen)."""
    ids = TOK.encode(text, add_special_tokens=False) + ([TOK.eos_token_id] if eos else [])
    seq = Sequence(0, "r", TOK.encode(prompt, add_special_tokens=False), SamplingParams(**params),
                   eos_token_id=TOK.eos_token_id)
    detok = Detokenizer(TOK)
    seen = []
    for i, t in enumerate(ids):
        seq.append_token_id(t)
        if t == TOK.eos_token_id or t in seq.sampling_params.stop_token_ids:
            seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, (None if t == TOK.eos_token_id else t)
        elif i == len(ids) - 1:
            seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
        stop = detok.decode_sequence_inplace(seq)
        seen.append(seq.output_text)
        if stop is not None or seq.is_finished:
            return seq, stop, seen
    return seq, None, seen


def test_incremental_text_equals_full_decode_with_multibyte_chars():
    text = "héllo wörld €5 ok"
    seq, stop, seen = stream(text)
    assert stop is None and seq.output_text == text
    assert all("\ufffd" not in s for s in seen)  # never shows half a character
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))


def test_eos_text_is_dropped():
    seq, stop, _ = stream("abc", eos=True, skip_special_tokens=False)
    assert seq.output_text == "abc" and stop is None
    seq, _, _ = stream("abc", eos=True, skip_special_tokens=False, include_stop_str_in_output=True)
    assert seq.output_text == "abc<eos>"


def test_stop_token_text_dropped_unless_included():
    hash_id = TOK.convert_tokens_to_ids("#")
    seq, _, _ = stream("ab#cd", stop_token_ids=[hash_id])
    assert seq.output_text == "ab"
    seq, _, _ = stream("ab#cd", stop_token_ids=[hash_id], include_stop_str_in_output=True)
    assert seq.output_text == "ab#"


def test_stop_string_truncates():
    seq, stop, _ = stream("hello STOP world", stop=["STOP"])
    assert stop == "STOP" and seq.output_text == "hello "
    seq, stop, _ = stream("hello STOP world", stop=["STOP"], include_stop_str_in_output=True)
    assert stop == "STOP" and seq.output_text == "hello STOP"


def test_earliest_stop_string_wins_and_spans_steps():
    seq, stop, _ = stream("one two three", stop=["three", "two"])
    assert stop == "two" and seq.output_text == "one "
    # A stop string that ends in a multi-byte character, split over tokens.
    seq, stop, _ = stream("price 5€ done", stop=["5€"])
    assert stop == "5€" and seq.output_text == "price "


def test_stop_string_in_the_prompt_does_not_fire():
    seq, stop, _ = stream("abc", prompt="STOP ", stop=["STOP"])
    assert stop is None and seq.output_text == "abc"


def test_min_tokens_defers_stop_strings():
    seq, stop, _ = stream("ab ab ab", stop=["ab"], min_tokens=4)
    assert stop == "ab" and seq.output_text == "ab "


def test_find_stop_string_only_searches_new_text():
    assert find_stop_string("xxabyy", ["ab"], new_from=3) == ("ab", 2)
    assert find_stop_string("abxxyy", ["ab"], new_from=3) is None


def test_get_tokenizer_round_trip_and_errors(tmp_path):
    TOK.save_pretrained(tmp_path / "tok")
    tok = get_tokenizer(str(tmp_path / "tok"))
    assert tok.decode(tok.encode("héllo", add_special_tokens=False)) == "héllo"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        get_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="could not load the tokenizer"):
        get_tokenizer(str(tmp_path / "broken"))


def test_backend_decode_equals_transformers_decode():
    """The detokenizer calls a plain fast tokenizer's Rust backend directly; same text as
    transformers' decode, special tokens skipped or kept, byte-fallback pieces included."""
    from vllm.transformers_utils.detokenizer import _backend_decoder

    detok = Detokenizer(TOK)
    assert detok._backend is not None
    ids = TOK.encode("Hi, é and € #1!", add_special_tokens=False) + [TOK.eos_token_id]
    for skip in (True, False):
        for lo in range(len(ids)):
            want = TOK.decode(ids[lo:], skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert detok._decode(ids[lo:], skip) == want

    class Custom(type(TOK)):  # a tokenizer with its own decode keeps going through transformers
        def _decode(self, *args, **kwargs):
            return "custom"

    assert _backend_decoder(Custom(tokenizer_object=TOK.backend_tokenizer)) is None
