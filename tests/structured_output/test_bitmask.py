"""The batched grammar mask: llguidance's packed rows vs a per-token reference, and the one-op masking
vs a per-row loop over the vocabulary."""
import os

import pytest
import torch

from vllm.structured_output.backend import GrammarCompiler
from vllm.structured_output.bitmask import (GrammarDeadEnd, apply_token_bitmask_, fill_bitmask, grammar_bitmask,
                                            unpack_bitmask)
from vllm.structured_output.params import StructuredOutputsParams
from vllm.transformers_utils.tokenizer import get_tokenizer

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_model")


def _reference_apply(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Token by token: bit t % 32 of word t // 32 says whether token t stays."""
    out = logits.clone()
    for r, row in enumerate(rows):
        for t in range(logits.shape[1]):
            word = int(bitmask[r, t // 32]) & 0xFFFFFFFF if t // 32 < bitmask.shape[1] else 0
            if not (word >> (t % 32)) & 1:
                out[row, t] = float("-inf")
    return out


@pytest.mark.parametrize("vocab,rows", [(57, [0, 2, 3]), (100, [1]), (64, [0, 1, 2, 3, 4]), (97, [])])
def test_apply_matches_per_row_reference(vocab, rows):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), words), generator=g, dtype=torch.int64).to(torch.int32)
    expected = _reference_apply(logits, bitmask, rows)
    got = logits.clone()
    apply_token_bitmask_(got, bitmask, torch.tensor(rows, dtype=torch.int64))
    assert torch.equal(got, expected)
    if rows == list(range(5)):  # rows=None: every row
        got = logits.clone()
        apply_token_bitmask_(got, bitmask)
        assert torch.equal(got, expected)


def test_narrow_bitmask_disallows_the_ids_past_it():
    allowed = unpack_bitmask(torch.full((2, 1), -1, dtype=torch.int32), 40)
    assert allowed[:, :32].all() and not allowed[:, 32:].any()


@pytest.fixture(scope="module")
def compiler():
    tok = get_tokenizer(DEMO)
    return GrammarCompiler(tok, 57)


def _allowed_by_consuming(state, vocab: int) -> set[int]:
    """Independent reference: the tokens a copy of the matcher consumes without error."""
    out = set()
    for t in range(vocab):
        m = state.matcher.deep_copy()
        if m.consume_token(t) and not m.is_error():
            out.add(t)
    return out


def test_fill_matches_the_matcher_token_by_token(compiler):
    states = [compiler.new_state(StructuredOutputsParams(regex=r"ab=[A-C]+")),
              compiler.new_state(StructuredOutputsParams(choice=["yes", "no"]))]
    states[0].sync([5, 6, 4])  # "ab=": A-C next
    states[1].sync([])
    bitmask = fill_bitmask(states, 57, torch.device("cpu"))
    assert bitmask.shape == (2, 2) and bitmask.dtype == torch.int32
    allowed = unpack_bitmask(bitmask, 57)
    for r, state in enumerate(states):
        assert set(allowed[r].nonzero().flatten().tolist()) == _allowed_by_consuming(state, 57)
    assert set(allowed[0].nonzero().flatten().tolist()) == {31, 32, 33}  # A, B, C
    assert set(allowed[1].nonzero().flatten().tolist()) == {29, 18}  # y, n


def test_eos_only_when_the_grammar_accepts(compiler):
    state = compiler.new_state(StructuredOutputsParams(regex=r"ab"))
    eos = 2
    state.sync([5])
    assert not unpack_bitmask(fill_bitmask([state], 57, torch.device("cpu")), 57)[0, eos]
    state.sync([5, 6])
    allowed = unpack_bitmask(fill_bitmask([state], 57, torch.device("cpu")), 57)[0]
    assert allowed.nonzero().flatten().tolist() == [eos]


class _Seq:
    def __init__(self, grammar, outputs):
        self.grammar, self.output_token_ids = grammar, outputs


def test_grammar_bitmask_rows_and_dead_end(compiler):
    g = compiler.new_state(StructuredOutputsParams(regex=r"[a-c]+"))
    rows, bitmask = grammar_bitmask([_Seq(None, []), _Seq(g, [5]), _Seq(None, [])], 57, torch.device("cpu"))
    assert rows.tolist() == [1] and bitmask.shape == (1, 2)
    assert grammar_bitmask([_Seq(None, [])], 57, torch.device("cpu")) is None
    # a grammar that the vocabulary cannot continue: "a" then a digit (no digits in the demo vocabulary)
    dead = compiler.new_state(StructuredOutputsParams(regex=r"a[0-9]"))
    with pytest.raises(GrammarDeadEnd, match="allows no token"):
        grammar_bitmask([_Seq(dead, [5])], 57, torch.device("cpu"))
