"""What ``ModelRunner.execute`` returns, and the prompt logprobs of a prefill step.

The runner turns only each sequence's last new position into logits for the
sampler. Prompt logprobs need the others too: the logprob of prompt token j
(j >= 1) is read from the logits at position j - 1. ``prompt_logprobs`` computes
them for the sequences that ask (``SamplingParams.prompt_logprobs`` set, not
computed yet, fed from position 0 this step), a chunk of positions at a time so
the [positions, vocab] logits stay small; a batch where none asks costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from vllm.model_executor.layers.sampler import compute_logprobs
from vllm.sequence import TokenLogprobs

if TYPE_CHECKING:
    from vllm.core.scheduler import SchedulerOutput

# Prompt positions turned into logits at once (bounds the [rows, vocab] float32 buffer).
PROMPT_LOGPROBS_CHUNK = 512


@dataclass
class ModelRunnerOutput:
    """One step's result, lists parallel to ``SchedulerOutput.scheduled_seqs``.

    sampled_token_ids: one token per sequence.
    logprobs: None when no sequence asked; else per sequence its sampled
        token's ``{token_id: Logprob}`` (with the top-k), or None.
    prompt_logprobs: None when no sequence asked this step; else per sequence
        None or one entry per prompt token, the first being None.
    """

    sampled_token_ids: list[int]
    logprobs: Optional[list[Optional[TokenLogprobs]]] = None
    prompt_logprobs: Optional[list[Optional[list[Optional[TokenLogprobs]]]]] = None


def prompt_logprobs(model: nn.Module, hidden: torch.Tensor,
                    out: "SchedulerOutput") -> Optional[list[Optional[list[Optional[TokenLogprobs]]]]]:
    """Prompt logprobs of the step's sequences (see the module docstring).

    hidden: [num_batched_tokens, hidden_size], the model output for every new
    token of the batch in order; ``model.compute_logits`` turns rows into logits.
    """
    wanted = [i for i, (seq, c) in enumerate(zip(out.scheduled_seqs, out.context_lens))
              if seq.sampling_params.prompt_logprobs is not None and seq.prompt_logprobs is None and c == 0]
    if not wanted:
        return None
    starts = [0]
    for q in out.query_lens:
        starts.append(starts[-1] + q)
    rows: list[int] = []     # hidden row scoring each prompt token 1..P-1
    targets: list[int] = []  # that prompt token
    ks: list[int] = []
    for i in wanted:
        seq = out.scheduled_seqs[i]
        num_prompt = seq.num_prompt_tokens
        rows.extend(range(starts[i], starts[i] + num_prompt - 1))
        targets.extend(seq.prompt_token_ids[1:])
        ks.extend([seq.sampling_params.prompt_logprobs] * (num_prompt - 1))
    entries: list[TokenLogprobs] = []
    for lo in range(0, len(rows), PROMPT_LOGPROBS_CHUNK):
        hi = lo + PROMPT_LOGPROBS_CHUNK
        idx = torch.tensor(rows[lo:hi], dtype=torch.long, device=hidden.device)
        logits = model.compute_logits(hidden.index_select(0, idx))
        target = torch.tensor(targets[lo:hi], dtype=torch.long, device=logits.device)
        lp = compute_logprobs(logits, target, max(ks[lo:hi]))
        entries.extend(lp.to_dicts(targets[lo:hi], ks[lo:hi]))
    result: list[Optional[list[Optional[TokenLogprobs]]]] = [None] * len(out.scheduled_seqs)
    pos = 0
    for i in wanted:
        n = out.scheduled_seqs[i].num_prompt_tokens - 1
        result[i] = [None, *entries[pos:pos + n]]
        pos += n
    return result
