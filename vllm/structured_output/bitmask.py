"""The step's grammar mask: one int32 bitmask [rows, ceil(V / 32)] filled on the CPU by llguidance for
the rows that have a grammar, copied to the logits' device once, and applied there by one batched op:
on CUDA one Triton launch (``_bitmask_kernel.py``), elsewhere torch ops.  llguidance's own
``apply_token_bitmask_inplace`` is a torch.compile'd expansion without a row index (rows without a
grammar would need a gather and a scatter around it), so it is not used.

Bit ``t % 32`` of word ``t // 32`` is 1 when token ``t`` is allowed (llguidance's layout); ids past
32 * words are not allowed.
"""
from __future__ import annotations

from typing import Optional, Sequence as Seq

import torch

try:  # see backend.py: only requests with a grammar need it
    import llguidance
    import llguidance.torch
except ImportError:  # pragma: no cover
    llguidance = None

from vllm.platforms.interface import triton_interpreting
from vllm.structured_output.backend import GrammarState
from vllm.triton_utils import HAS_TRITON

_executor: Optional[llguidance.LLExecutor] = None


class GrammarDeadEnd(ValueError):
    """Some sequences' grammars allow no token of the vocabulary now (the model's tokenizer cannot write
    what the grammar needs next); the engine fails those requests and the step goes on without them."""

    def __init__(self, states: Seq[GrammarState]) -> None:
        super().__init__("the request's grammar allows no token of this model's vocabulary at this point "
                         "(the tokenizer cannot write what it needs next); use a constraint the model's "
                         "vocabulary can express")
        self.states = list(states)


def _shared_executor() -> llguidance.LLExecutor:
    """llguidance's thread pool for filling many rows at once (created on first use)."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    return _executor


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_bitmask(states: Seq[GrammarState], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(states), ceil(V / 32)] int32 on ``device``: each row the next-token mask of one grammar."""
    cpu = torch.empty(len(states), bitmask_words(vocab_size), dtype=torch.int32,
                      pin_memory=device.type == "cuda")
    llguidance.torch.fill_next_token_bitmask_par(_shared_executor(), [(s.matcher, i) for i, s in enumerate(states)],
                                                 cpu)
    # llguidance leaves a matcher that nothing in the vocabulary can continue in its error state (and
    # its row allowing only EOS): fail those requests instead of ending their output mid-way
    dead = [s for s in states if s.matcher.is_error()]
    if dead or bool((cpu == 0).all(dim=1).any()):
        raise GrammarDeadEnd(dead)
    return cpu.to(device, non_blocking=True)


_LUT: dict[torch.device, torch.Tensor] = {}


def _disallowed_lut(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: bit j of byte b is 0 (the token is not allowed); one per device."""
    lut = _LUT.get(device)
    if lut is None:
        byte = torch.arange(256, dtype=torch.int32, device=device).unsqueeze(1)
        lut = _LUT[device] = ((byte >> torch.arange(8, dtype=torch.int32, device=device)) & 1) == 0
    return lut


def disallowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 -> [R, vocab_size] bool, True where the token is NOT allowed (ids past 32 * W included).

    One table lookup per byte of the mask (the int32 words read as little-endian bytes, as llguidance
    writes them), no [R, W, 32] integer intermediate."""
    rows, words = bitmask.shape
    flat = bitmask.contiguous().view(torch.uint8).flatten().int()
    out = _disallowed_lut(bitmask.device).index_select(0, flat).view(rows, words * 32)
    if out.shape[1] < vocab_size:
        pad = torch.ones(rows, vocab_size - out.shape[1], dtype=torch.bool, device=bitmask.device)
        out = torch.cat([out, pad], dim=1)
    return out[:, :vocab_size]


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 -> [R, vocab_size] bool (True: allowed)."""
    return ~disallowed_tokens(bitmask, vocab_size)


def _penalty_lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8] of 0 (bit set: allowed) or -inf (bit clear), one per (device, dtype)."""
    key = (device, dtype)
    lut = _LUT.get(key)
    if lut is None:
        lut = _LUT[key] = torch.zeros(256, 8, dtype=dtype, device=device).masked_fill_(
            _disallowed_lut(device), float("-inf"))
    return lut


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tokens per program of the Triton op: 128 words (4096 tokens), 37 blocks per row at V = 151936.
_WORDS_PER_BLOCK = 128


def _check_mask_args(logits: torch.Tensor, bitmask: torch.Tensor, rows: Optional[torch.Tensor]) -> None:
    """Shapes, dtypes and devices only (never the values: reading them would wait for the device)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if bitmask.dim() != 2 or bitmask.dtype != torch.int32:
        raise ValueError(f"the bitmask must be [rows, ceil(vocab / 32)] int32, got {tuple(bitmask.shape)} "
                         f"{bitmask.dtype}")
    if bitmask.device != logits.device:
        raise ValueError(f"the bitmask is on {bitmask.device} but the logits on {logits.device}: copy it there")
    if rows is None:
        if bitmask.shape[0] != logits.shape[0]:
            raise ValueError(f"without rows the bitmask needs one row per logits row: {bitmask.shape[0]} "
                             f"for {logits.shape[0]}")
        return
    if rows.dim() != 1 or rows.shape[0] != bitmask.shape[0] or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rows must be [{bitmask.shape[0]}] int32 or int64 (one per bitmask row), got "
                         f"{tuple(rows.shape)} {rows.dtype}")
    if rows.device != logits.device:
        raise ValueError(f"rows are on {rows.device} but the logits on {logits.device}: copy them there")


def _use_triton(logits: torch.Tensor, use_triton: Optional[bool]) -> bool:
    """Triton when asked (None: on CUDA with Triton installed) for a float dtype the kernel covers."""
    if use_triton is None:
        return logits.is_cuda and HAS_TRITON and logits.dtype in _FLOAT_DTYPES
    if use_triton and not logits.is_cuda and not triton_interpreting():
        raise ValueError("use_triton=True on a CPU tensor needs TRITON_INTERPRET=1")
    if use_triton and logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"the Triton mask op takes float32, bfloat16 or float16 logits, not {logits.dtype}")
    return use_triton


def _apply_token_bitmask_triton_(logits: torch.Tensor, bitmask: torch.Tensor, rows: Optional[torch.Tensor],
                                 words_per_block: int = _WORDS_PER_BLOCK) -> None:
    """One launch over (bitmask rows, vocabulary blocks of ``words_per_block`` * 32 tokens); graph-safe:
    no host sync, no allocation."""
    from vllm.structured_output._bitmask_kernel import _apply_bitmask_kernel

    n_rows, n_words = bitmask.shape
    vocab = logits.shape[1]
    if n_rows == 0 or vocab == 0:
        return
    blocks = -(-bitmask_words(vocab) // words_per_block)
    _apply_bitmask_kernel[(n_rows, blocks)](
        logits, bitmask, bitmask if rows is None else rows,
        logits.shape[0], vocab, n_words,
        logits.stride(0), logits.stride(1), bitmask.stride(0), bitmask.stride(1),
        HAS_ROWS=rows is not None, WORDS=words_per_block,
        num_warps=4,
    )


def _apply_token_bitmask_torch_(logits: torch.Tensor, bitmask: torch.Tensor, rows: Optional[torch.Tensor]) -> None:
    """One table lookup per mask byte gives 0 / -inf per token, added to the logits (3x faster than a
    boolean masked_fill on a CPU); logits are finite or -inf, so the sum is exact."""
    n_rows, words = bitmask.shape
    vocab = logits.shape[1]
    flat = bitmask.contiguous().view(torch.uint8).flatten().int()
    penalty = _penalty_lut(logits.device, logits.dtype).index_select(0, flat).view(n_rows, words * 32)
    if rows is not None:
        rows = rows.long()  # index_copy_ takes int64 only
    target = logits if rows is None else logits.index_select(0, rows)
    covered = min(vocab, words * 32)
    target[:, :covered].add_(penalty[:, :covered])
    if covered < vocab:  # ids past 32 * W are not allowed
        target[:, covered:] = float("-inf")
    if rows is not None:
        logits.index_copy_(0, rows, target)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor,
                         rows: Optional[torch.Tensor] = None, *, use_triton: Optional[bool] = None) -> None:
    """Set the disallowed tokens of ``logits`` [B, V] to -inf, in place.

    bitmask: [R, W] int32 on the logits' device; rows: [R] int32 / int64, the logits row of each bitmask
    row (None: R == B, row i for row i); they must lie in [0, B) (not checked: that would wait for the
    device). Rows not listed are untouched, allowed tokens keep their values bit for bit.
    On CUDA one Triton launch (``_bitmask_kernel.py``, no [R, V] intermediate, graph-safe); on a CPU
    torch ops (``use_triton=True`` runs the kernel there under TRITON_INTERPRET=1, for tests)."""
    _check_mask_args(logits, bitmask, rows)
    if _use_triton(logits, use_triton):
        _apply_token_bitmask_triton_(logits, bitmask, rows)
    else:
        _apply_token_bitmask_torch_(logits, bitmask, rows)


def grammar_bitmask(seqs: Seq, vocab_size: int, device: torch.device
                    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """For the sampler: (rows [R] int64, bitmask [R, W] int32) of the sequences that have a grammar
    (``seq.grammar``, brought in line with its outputs first), both on ``device``; None when none has."""
    rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
    if not rows:
        return None
    states = []
    for i in rows:
        seqs[i].grammar.sync(seqs[i].output_token_ids)
        states.append(seqs[i].grammar)
    return (torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True),
            fill_bitmask(states, vocab_size, device))
