"""Grammars through llguidance: compile once per (constraint, tokenizer), one matcher per sequence.

Why llguidance (not xgrammar, the other maintained choice): it installs as a small CPU wheel with
no CUDA build, accepts JSON schema, regex, choice and Lark / GBNF grammars through one API, computes
a token mask in microseconds without a per-grammar precompilation of the whole vocabulary, and its
matchers roll back (``rollback``), which keeps recompute preemption simple.

``GrammarCompiler`` (one per engine) turns ``StructuredOutputsParams`` into a validated grammar and
keeps the compiled matcher of each distinct constraint in an LRU cache; every sequence gets a
``deep_copy`` of it (cheap) wrapped in a ``GrammarState``. The engine's tokenizer is adapted once
(``llguidance.hf.from_tokenizer``; tokenizers whose decoder llguidance cannot read, e.g. a character
tokenizer with a Fuse decoder, go through ``TokenizerWrapper`` with each token's decoded bytes).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Optional, Sequence as Seq

try:  # a dependency; imported softly so that an install without it serves everything but grammars
    import llguidance
    import llguidance.hf
except ImportError:  # pragma: no cover - exercised by tests/structured_output/test_missing_library.py
    llguidance = None

from vllm.logger import init_logger
from vllm.structured_output.params import StructuredOutputsParams

logger = init_logger(__name__)

# Distinct compiled constraints kept per engine (each a matcher template; the oldest unused is dropped).
GRAMMAR_CACHE_SIZE = 256


class _DecodedVocab:
    """What ``llguidance.TokenizerWrapper`` needs, read from a Hugging Face tokenizer one token at a time;
    ids past the tokenizer up to the model's vocabulary are special tokens that no grammar allows."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tok = tokenizer
        self._unk = tokenizer.unk_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        present = set(tokenizer.get_vocab().values())
        size = max(vocab_size, max(present) + 1)
        special = set(tokenizer.all_special_ids) | (set(range(size)) - present)
        self.special_token_ids = sorted(special)
        self.tokens = [(tokenizer.convert_ids_to_tokens(i) if i in present else f"<|unused_{i}|>").encode()
                       if i in special else tokenizer.decode([i], skip_special_tokens=False).encode()
                       for i in range(size)]

    def __call__(self, text: Any) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("takes text")  # tells TokenizerWrapper to pass str, not bytes
        # a character the vocabulary lacks must not read as <unk>, or llguidance would offer <unk> for it
        return [t for t in self._tok.encode(text, add_special_tokens=False) if t != self._unk]


def ll_tokenizer(tokenizer: Any, vocab_size: int) -> llguidance.LLTokenizer:
    """The llguidance view of ``tokenizer`` over the model's ``vocab_size`` ids (expensive: build once)."""
    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    except ValueError as e:
        logger.info("llguidance cannot read this tokenizer directly (%s); using its decoded tokens", e)
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_DecodedVocab(tokenizer, vocab_size)),
                                      n_vocab=vocab_size)


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint (not validated yet); ValueError for an unreadable grammar."""
    kind = params.kind
    if kind in ("json", "json_object"):
        schema = params.json if kind == "json" else {"type": "object"}
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": not params.disable_any_whitespace})
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return llguidance.grammar_from("choice", params.choice)
    return llguidance.grammar_from("grammar", params.grammar)  # Lark, or GBNF converted to Lark


def _first_line(error: str, limit: int = 200) -> str:
    """llguidance's error without the parser-state dump that follows it."""
    text = (error or "rejected").strip().split("\n<state>")[0].strip()
    return text if len(text) <= limit else text[:limit] + "..."


class GrammarState:
    """One sequence's grammar: the matcher advanced by every sampled token.

    ``num_consumed`` is how many output tokens the matcher has taken; ``sync(output_token_ids)`` brings
    it back in line with the sequence (tokens consumed or rolled back) before a mask is computed, so a
    sequence whose outputs changed behind the matcher's back is never masked from a stale state."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher
        self.num_consumed = 0

    def accept(self, token_id: int) -> None:
        """Advance by one sampled token; ValueError if the grammar does not allow it (the request fails)."""
        if not self.matcher.consume_token(token_id):
            raise ValueError(f"token {token_id} is not allowed by the request's grammar here "
                             f"({_first_line(self.matcher.get_error())}); a sampling option that bans the only "
                             "allowed tokens (e.g. min_tokens while the grammar only allows EOS) does this")
        self.num_consumed += 1

    def sync(self, output_token_ids: Seq[int]) -> None:
        """Make the matcher reflect exactly ``output_token_ids``."""
        n = len(output_token_ids)
        if n < self.num_consumed:
            if not self.matcher.rollback(self.num_consumed - n):
                raise ValueError(f"could not roll the grammar back to {n} tokens "
                                 f"({_first_line(self.matcher.get_error())})")
            self.num_consumed = n
        for t in output_token_ids[self.num_consumed:]:
            self.accept(t)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and has taken its end (EOS), or can take nothing more."""
        return self.matcher.is_stopped()


def require_llguidance() -> None:
    if llguidance is None:
        raise ValueError("structured output needs the llguidance package, which is not installed here: "
                         "pip install 'llguidance>=1.9,<1.10' (a dependency of this project)")


class GrammarCompiler:
    """Compiles and caches the constraints of one tokenizer; thread-safe (requests are checked off the
    engine thread)."""

    def __init__(self, tokenizer: Any, vocab_size: int, cache_size: int = GRAMMAR_CACHE_SIZE) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll: Optional[llguidance.LLTokenizer] = None
        self._cache: OrderedDict[tuple, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.compiles = 0  # misses, for tests and logs

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                self._ll = ll_tokenizer(self._tokenizer, self.vocab_size)
            return self._ll

    def compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The template matcher of ``params`` (cached); ValueError saying what is wrong with it."""
        require_llguidance()
        key = params.cache_key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        tok = self.ll_tokenizer
        try:
            text = grammar_text(params)
        except ValueError as e:
            raise ValueError(f"structured outputs: the {params.kind} could not be read: {e}") from None
        matcher = llguidance.LLMatcher(tok, text, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured outputs: invalid {params.kind}: {_first_line(matcher.get_error(), 500)}")
        probe = matcher.deep_copy()  # a first mask: llguidance errors when nothing can start the output
        if not any(probe.compute_bitmask()) or probe.is_error():
            raise ValueError(f"structured outputs: no token of this model's vocabulary can start an output that "
                             f"the {params.kind} allows (the tokenizer lacks its first characters)")
        with self._lock:
            self.compiles += 1
            self._cache[key] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def new_state(self, params: StructuredOutputsParams) -> GrammarState:
        """A fresh matcher for one sequence."""
        return GrammarState(self.compile(params).deep_copy())
