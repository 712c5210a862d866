"""What ``ModelRunner.execute`` returns, and the prompt logprobs of a prefill step.

The runner turns only each sequence's last new position into logits for the
sampler. Prompt logprobs need the others too: the logprob of prompt token j
(j >= 1) is read from the logits at position j - 1. ``plan_prompt_logprobs``
says which positions, for the sequences that ask (``SamplingParams.prompt_logprobs``
set, not computed yet, fed from position 0 this step); the runner turns them
into logits a chunk at a time so the [positions, vocab] logits stay small; a
batch where none asks costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

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


@dataclass
class PromptLogprobsPlan:
    """Which hidden rows of a step score which prompt tokens (built on rank 0 from the schedule).

    ``rows`` travel in ``ModelInput.prompt_rows``: every rank turns them into
    logits, ``PROMPT_LOGPROBS_CHUNK`` at a time (the vocabulary gather is a
    collective under TP); rank 0 passes each chunk to ``add_chunk``.
    """

    wanted: list[int]   # indices (in scheduled_seqs) of the sequences that get prompt logprobs now
    rows: list[int]     # hidden row scoring each of their prompt tokens 1..P-1
    targets: list[int]  # that prompt token
    ks: list[int]       # top-k asked for it
    entries: list[TokenLogprobs] = field(default_factory=list)

    def add_chunk(self, lo: int, logits: torch.Tensor) -> None:
        hi = lo + logits.shape[0]
        target = torch.tensor(self.targets[lo:hi], dtype=torch.long, device=logits.device)
        lp = compute_logprobs(logits, target, max(self.ks[lo:hi]))
        self.entries.extend(lp.to_dicts(self.targets[lo:hi], self.ks[lo:hi]))

    def result(self, out: "SchedulerOutput") -> list[Optional[list[Optional[TokenLogprobs]]]]:
        """Per scheduled sequence: None, or one entry per prompt token (the first None)."""
        result: list[Optional[list[Optional[TokenLogprobs]]]] = [None] * len(out.scheduled_seqs)
        pos = 0
        for i in self.wanted:
            n = out.scheduled_seqs[i].num_prompt_tokens - 1
            result[i] = [None, *self.entries[pos:pos + n]]
            pos += n
        return result


def plan_prompt_logprobs(out: "SchedulerOutput") -> Optional[PromptLogprobsPlan]:
    """The plan for the sequences that ask (``SamplingParams.prompt_logprobs`` set, not computed
    yet, fed from position 0 this step); None when none does (then nothing is computed)."""
    wanted = [i for i, (seq, c) in enumerate(zip(out.scheduled_seqs, out.context_lens))
              if seq.sampling_params.prompt_logprobs is not None and seq.prompt_logprobs is None and c == 0]
    if not wanted:
        return None
    starts = [0]
    for q in out.query_lens:
        starts.append(starts[-1] + q)
    plan = PromptLogprobsPlan(wanted, [], [], [])
    for i in wanted:
        seq = out.scheduled_seqs[i]
        num_prompt = seq.num_prompt_tokens
        plan.rows.extend(range(starts[i], starts[i] + num_prompt - 1))
        plan.targets.extend(seq.prompt_token_ids[1:])
        plan.ks.extend([seq.sampling_params.prompt_logprobs] * (num_prompt - 1))
    return plan
