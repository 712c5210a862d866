"""Token sampler: one next token per sequence from its last-position logits.

Per row, in vLLM's order (``logits_processors.py``): logit_bias added;
ids outside allowed_token_ids, banned bad_words tokens and suppressed ids
(min_tokens) -> -inf; repetition, frequency and presence penalties. Greedy rows
(temperature 0) then take the argmax; the others are divided by their
temperature, cut by min_p, to the top-k tokens, then to the smallest set of
most likely tokens whose probability reaches top_p (the most likely token
always stays), and sampled from the softmax. A seeded row draws from its own generator, once per step, with its
own ``torch.multinomial`` call, so its tokens do not depend on the other rows of
the batch; unseeded rows share one call on the default generator.

Logprobs (``forward(..., num_logprobs=...)``, ``compute_logprobs``) are those of
the model's raw distribution: the float32 log-softmax of the logits as the model
returned them, before min_tokens suppression, temperature and top-k / top-p (vLLM's
default, ``raw_logprobs``). They are computed only for the rows that ask for them.

Structured output (``grammar_bitmask``): the rows with a grammar have their disallowed tokens set to
-inf first, before everything above, as vLLM's model runner does before its sampler; so their
logprobs are those of the grammar-masked distribution (vLLM's behaviour: its "raw" logprobs are
computed from the logits the grammar already masked).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence as Seq

import torch
from torch import nn

from vllm.platforms.host_copy import to_device
from vllm.model_executor.layers.logits_processors import apply_min_p, apply_penalties, apply_token_constraints
from vllm.sampling_params import SamplingParams, SamplingType
from vllm.sequence import Logprob, TokenLogprobs
from vllm.structured_output.bitmask import apply_token_bitmask_


@dataclass
class LogprobsTensors:
    """Logprobs of N rows, each scoring one given token (the sampled one, or the
    next prompt token).

    token_logprobs: [N] float32, the given token's logprob.
    token_ranks: [N] int64, how many vocabulary entries have a logprob >= the
        given token's (1 = the most likely; ties count against it).
    top_ids, top_logprobs: [N, k] int64 / float32, the k most likely tokens, most
        likely first (k is capped at the vocabulary size).
    """

    token_logprobs: torch.Tensor
    token_ranks: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor

    def to_dicts(self, token_ids: Seq[int], num_logprobs: Seq[int]) -> list[TokenLogprobs]:
        """Per row ``{token_id: Logprob}``: the given token first, then the row's
        ``num_logprobs[i]`` most likely tokens in rank order (a top token that is
        the given one is not repeated). ``decoded_token`` is left None."""
        token_lp, ranks = self.token_logprobs.tolist(), self.token_ranks.tolist()
        top_ids, top_lp = self.top_ids.tolist(), self.top_logprobs.tolist()
        out = []
        for i, (tok, k) in enumerate(zip(token_ids, num_logprobs)):
            entry = {int(tok): Logprob(token_lp[i], ranks[i])}
            for r, (tid, lp) in enumerate(zip(top_ids[i][:k], top_lp[i][:k])):
                if tid not in entry:
                    entry[tid] = Logprob(lp, r + 1)
            out.append(entry)
        return out


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobsTensors:
    """Log-softmax of ``logits`` [N, V] (computed in float32) scored at
    ``token_ids`` [N], with the ``num_top`` most likely tokens of each row."""
    if logits.dim() != 2 or token_ids.shape != (logits.shape[0],):
        raise ValueError(f"compute_logprobs needs logits [N, V] and token_ids [N], got {tuple(logits.shape)} "
                         f"and {tuple(token_ids.shape)}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_lp = logprobs.gather(1, token_ids.long().view(-1, 1)).squeeze(1)
    ranks = (logprobs >= token_lp.unsqueeze(1)).sum(dim=-1)
    top_lp, top_ids = logprobs.topk(min(num_top, logprobs.shape[-1]), dim=-1)
    return LogprobsTensors(token_lp, ranks, top_ids, top_lp)


@dataclass
class SamplerOutput:
    """``Sampler.forward(..., num_logprobs=...)``: token ids [B] int64 and per row
    the ``{token_id: Logprob}`` of the sampled token and its top-k, or None for
    rows that did not ask."""

    token_ids: torch.Tensor
    logprobs: list[Optional[TokenLogprobs]]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p remove, row by row.

    logits: [B, V] float32 (already temperature-scaled); top_k: [B] int64, a
    value >= V (or 0) keeps everything; top_p: [B] float32 in (0, 1], 1 keeps
    everything. Returns a new tensor; ties at the k-th value are broken by sort order.
    """
    vocab = logits.shape[-1]
    k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    remove = rank >= k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Probability mass strictly before each token; the first token has 0 < top_p.
    mass_before = probs.cumsum(dim=-1) - probs
    remove_p = (mass_before > top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(remove_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _plain_greedy(params: Seq[SamplingParams], suppress_token_ids: Optional[Seq[Optional[Seq[int]]]]) -> bool:
    """Every row greedy, and nothing changes its logits first (no logit_bias, allowed_token_ids, bad_words,
    penalties or suppressed ids)."""
    if suppress_token_ids is not None and any(suppress_token_ids):
        return False
    return all(p.sampling_type == SamplingType.GREEDY and not p.logit_bias and p.allowed_token_ids is None
               and not p.bad_words and not p.needs_penalties for p in params)


class Sampler(nn.Module):
    """``forward(logits [B, V], params, generators) -> token ids [B] int64``;
    with ``num_logprobs=[...]`` it returns a ``SamplerOutput`` (tokens + logprobs)."""

    def forward(self, logits: torch.Tensor, params: Seq[SamplingParams],
                generators: Seq[Optional[torch.Generator]],
                suppress_token_ids: Optional[Seq[Optional[Seq[int]]]] = None,
                num_logprobs: Optional[Seq[Optional[int]]] = None,
                prompt_token_ids: Optional[Seq[Seq[int]]] = None,
                output_token_ids: Optional[Seq[Seq[int]]] = None,
                grammar_bitmask: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """Sample one token per row.

        logits: [B, V], any float dtype (computed in float32; not modified).
        params: B SamplingParams. generators: B entries, the row's own
            generator (on the logits' device) for seeded rows, None otherwise
            (a generator given to an unseeded or greedy row is ignored).
        suppress_token_ids: optional B entries of ids to forbid (e.g.
            ``seq.suppressed_token_ids()`` while min_tokens is not reached).
        num_logprobs: optional B entries, None or k >= 0 (e.g.
            ``params.logprobs``). When given, returns ``SamplerOutput`` whose
            ``logprobs[i]`` holds the sampled token and the k most likely ones
            of the raw logits (see the module docstring); None rows cost nothing.
        prompt_token_ids, output_token_ids: B entries each, the rows' prompt and
            generated ids; needed (ValueError otherwise) when a row has penalties
            or bad_words.
        grammar_bitmask: optional (rows [R] int64, bitmask [R, ceil(V/32)] int32), both on the logits'
            device (``vllm.structured_output.bitmask``): those rows may only take their allowed tokens.
        """
        if grammar_bitmask is not None:
            rows, bitmask = grammar_bitmask
            logits = logits.to(torch.float32, copy=True)
            apply_token_bitmask_(logits, bitmask, rows)
        tokens = self._sample(logits, params, generators, suppress_token_ids, prompt_token_ids, output_token_ids)
        if num_logprobs is None:
            return tokens
        if len(num_logprobs) != logits.shape[0]:
            raise ValueError(f"num_logprobs has {len(num_logprobs)} entries for {logits.shape[0]} rows")
        out: list[Optional[TokenLogprobs]] = [None] * logits.shape[0]
        rows = [i for i, k in enumerate(num_logprobs) if k is not None]
        if rows:
            ks = [num_logprobs[i] for i in rows]
            idx = torch.tensor(rows, dtype=torch.int64, device=logits.device)
            sampled = tokens.index_select(0, idx)
            lp = compute_logprobs(logits.index_select(0, idx), sampled, max(ks))
            for i, entry in zip(rows, lp.to_dicts(sampled.tolist(), ks)):
                out[i] = entry
        return SamplerOutput(tokens, out)

    def _sample(self, logits: torch.Tensor, params: Seq[SamplingParams],
                generators: Seq[Optional[torch.Generator]],
                suppress_token_ids: Optional[Seq[Optional[Seq[int]]]],
                prompt_token_ids: Optional[Seq[Seq[int]]] = None,
                output_token_ids: Optional[Seq[Seq[int]]] = None) -> torch.Tensor:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [num_seqs, vocab_size], got shape {tuple(logits.shape)}")
        num_rows, vocab = logits.shape
        if len(params) != num_rows or len(generators) != num_rows:
            raise ValueError(f"{num_rows} logit rows need as many SamplingParams and generators, got "
                             f"{len(params)} and {len(generators)}")
        if suppress_token_ids is not None and len(suppress_token_ids) != num_rows:
            raise ValueError(f"suppress_token_ids has {len(suppress_token_ids)} entries for {num_rows} rows")
        device = logits.device
        if num_rows and _plain_greedy(params, suppress_token_ids):
            # every row takes the argmax of its raw logits, in their own dtype (for 16-bit logits the same index as
            # in float32: the widening is exact and keeps the order), without the float32 copy below (the models'
            # float32 logits at batch 256 and a 152k vocabulary: 156 MB read and written, 75 us on an H200)
            return logits.argmax(dim=-1)
        logits = logits.to(torch.float32, copy=True)
        if num_rows == 0:
            return torch.empty(0, dtype=torch.int64, device=device)
        needs_history = any(p.needs_penalties or p.bad_words for p in params)
        if needs_history:
            for name, lists in (("prompt_token_ids", prompt_token_ids), ("output_token_ids", output_token_ids)):
                if lists is None or len(lists) != num_rows:
                    raise ValueError(f"rows with penalties or bad_words need {name} for each of the {num_rows} rows")
        empty: list[Seq[int]] = [()] * num_rows
        apply_token_constraints(logits, params, output_token_ids or empty, suppress_token_ids)
        apply_penalties(logits, params, prompt_token_ids or empty, output_token_ids or empty)

        out = logits.argmax(dim=-1)
        types = [p.sampling_type for p in params]
        rows = [i for i, t in enumerate(types) if t != SamplingType.GREEDY]
        if not rows:
            return out

        idx = to_device(rows, torch.int64, device)
        temperature = to_device([params[i].temperature for i in rows], torch.float32, device)
        scaled = logits.index_select(0, idx) / temperature.unsqueeze(1)
        if any(params[i].min_p > 0 for i in rows):
            min_p = to_device([params[i].min_p for i in rows], torch.float32, device)
            scaled = apply_min_p(scaled, min_p)
        if any(params[i].top_k > 0 or params[i].top_p < 1 for i in rows):
            # a top_k >= the vocabulary keeps everything: clamp first, so any Python int fits an int64
            top_k = to_device([min(params[i].top_k, vocab) for i in rows], torch.int64, device)
            top_p = to_device([params[i].top_p for i in rows], torch.float32, device)
            scaled = apply_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)

        sampled = torch.empty(len(rows), dtype=torch.int64, device=device)
        unseeded = [j for j, i in enumerate(rows) if types[i] == SamplingType.RANDOM]
        if unseeded:
            sel = to_device(unseeded, torch.int64, device)
            sampled[sel] = torch.multinomial(probs.index_select(0, sel), 1).squeeze(1)
        for j, i in enumerate(rows):
            if types[i] != SamplingType.RANDOM_SEED:
                continue
            gen = generators[i]
            if gen is None:
                raise ValueError(f"row {i} has seed {params[i].seed} but no generator; pass "
                                 "seq.get_generator(logits.device) for seeded sequences")
            if gen.device.type != device.type:
                raise ValueError(f"row {i}: generator is on {gen.device}, logits on {device}; "
                                 "create it with seq.get_generator(logits.device)")
            sampled[j] = torch.multinomial(probs[j], 1, generator=gen)[0]
        out[idx] = sampled
        return out
