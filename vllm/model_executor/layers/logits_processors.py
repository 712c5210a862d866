"""The logits changes of ``SamplingParams`` that come before sampling, batched over the rows that ask.

In vLLM's order (``Sampler`` calls them):

1. ``apply_token_constraints``: ``logit_bias`` added, ids outside ``allowed_token_ids`` and
   banned ``bad_words`` tokens (plus min_tokens' suppressed ids) set to -inf;
2. ``apply_penalties``: repetition (prompt and output tokens), frequency and presence
   (output tokens);
3. after temperature, ``apply_min_p``.

Each builds its per-step tensors once for the rows that ask (scatters of padded id lists,
never a Python loop over the vocabulary); rows that ask nothing are not touched and cost
nothing. ``logits`` are float32 [B, V] and are modified in place.
"""
from __future__ import annotations

from typing import Optional, Sequence as Seq

import torch

from vllm.sampling_params import SamplingParams


def _padded(lists: Seq[Seq[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[len(lists), longest] int64, short rows filled with ``pad``."""
    width = max((len(x) for x in lists), default=0)
    return torch.tensor([list(x) + [pad] * (width - len(x)) for x in lists], dtype=torch.int64,
                        device=device).view(len(lists), width)


def banned_bad_word_tokens(params: SamplingParams, output_token_ids: Seq[int]) -> list[int]:
    """Last tokens of the bad words whose other tokens end the output (vLLM's rule: the match is
    against generated tokens only). Work per row: the number of bad-word tokens, not the vocabulary."""
    banned = []
    for word in params.bad_words_token_ids:
        prefix = word[:-1]
        if len(prefix) > len(output_token_ids):
            continue
        if not prefix or list(output_token_ids[-len(prefix):]) == prefix:
            banned.append(word[-1])
    return banned


def apply_token_constraints(logits: torch.Tensor, params: Seq[SamplingParams],
                            output_token_ids: Seq[Seq[int]],
                            suppress_token_ids: Optional[Seq[Optional[Seq[int]]]] = None) -> None:
    """logit_bias, allowed_token_ids, bad_words and the given suppressed ids, in place."""
    device = logits.device
    num_rows, vocab = logits.shape
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_vals: list[float] = []
    ban_rows: list[int] = []
    ban_ids: list[int] = []
    allowed_rows: list[int] = []
    allowed: list[list[int]] = []
    for row in range(num_rows):
        p = params[row]
        if p.logit_bias:
            bias_rows += [row] * len(p.logit_bias)
            bias_ids += list(p.logit_bias)
            bias_vals += list(p.logit_bias.values())
        banned = list(suppress_token_ids[row] or ()) if suppress_token_ids is not None else []
        if p.bad_words_token_ids:
            banned += banned_bad_word_tokens(p, output_token_ids[row])
        ban_rows += [row] * len(banned)
        ban_ids += banned
        if p.allowed_token_ids is not None:
            allowed_rows.append(row)
            allowed.append(p.allowed_token_ids)
    if bias_rows:
        index = (torch.tensor(bias_rows, device=device), torch.tensor(bias_ids, device=device))
        logits.index_put_(index, torch.tensor(bias_vals, dtype=logits.dtype, device=device), accumulate=True)
    if allowed_rows:
        rows = torch.tensor(allowed_rows, device=device)
        keep = torch.zeros(len(allowed_rows), vocab + 1, dtype=torch.bool, device=device)
        keep.scatter_(1, _padded(allowed, vocab, device), True)  # the pad column `vocab` is dropped
        sub = logits.index_select(0, rows).masked_fill_(~keep[:, :vocab], float("-inf"))
        logits.index_copy_(0, rows, sub)
    if ban_rows:
        index = (torch.tensor(ban_rows, device=device), torch.tensor(ban_ids, device=device))
        logits.index_put_(index, torch.tensor(float("-inf"), dtype=logits.dtype, device=device))


def apply_penalties(logits: torch.Tensor, params: Seq[SamplingParams], prompt_token_ids: Seq[Seq[int]],
                    output_token_ids: Seq[Seq[int]]) -> None:
    """Repetition, frequency and presence penalties of the rows that ask, in place.

    repetition_penalty r: for every token of the prompt or the output, logit / r if logit > 0 else
    logit * r. Then logit -= frequency_penalty * count + presence_penalty * (count > 0), where count
    is the token's number of occurrences in the output (as vLLM and OpenAI)."""
    rows = [i for i, p in enumerate(params) if p.needs_penalties]
    if not rows:
        return
    device = logits.device
    vocab = logits.shape[1]
    idx = torch.tensor(rows, device=device)
    sub = logits.index_select(0, idx)
    out_ids = _padded([output_token_ids[i] for i in rows], vocab, device)
    counts = torch.zeros(len(rows), vocab + 1, dtype=sub.dtype, device=device)
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=sub.dtype))
    counts = counts[:, :vocab]
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
    seen.scatter_(1, _padded([prompt_token_ids[i] for i in rows], vocab, device), True)
    seen = seen[:, :vocab] | (counts > 0)
    rep = torch.tensor([params[i].repetition_penalty for i in rows], dtype=sub.dtype, device=device).unsqueeze(1)
    freq = torch.tensor([params[i].frequency_penalty for i in rows], dtype=sub.dtype, device=device).unsqueeze(1)
    pres = torch.tensor([params[i].presence_penalty for i in rows], dtype=sub.dtype, device=device).unsqueeze(1)
    penalised = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalised, sub)
    sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
    logits.index_copy_(0, idx, sub)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens whose probability is below min_p times the row's most likely token's.

    logits: [R, V] float32 (temperature-scaled); min_p: [R] in [0, 1]. Returns a new tensor; the
    most likely token always stays."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))
