"""The model runner: one scheduled batch in, one sampled token per sequence out.

    SchedulerOutput -> ModelInput (plain lists: input ids, positions, paged-KV
    layout, adapter per token, rows for prompt logprobs; built once, on rank 0)
    -> every rank: attention metadata, the token -> adapter mapping (one per
       step, shared by every LoRA layer), model forward inside the forward
       context, logits of each sequence's last new token (gathered over TP),
       then the prompt-logprobs rows' logits, a chunk at a time
    -> rank 0: Sampler (+ logprobs, prompt logprobs: vllm/worker/logprobs.py)

A decode step replays a captured CUDA graph instead of the eager forward when
``graphs`` (a ``DecodeGraphRunner``, vllm/worker/cuda_graphs.py) has one for it.

Async scheduling (``vllm.engine.async_scheduling``) uses ``launch`` instead of ``execute``: a
decode step whose tokens stay on the device (``DeviceTokens``), and whose input ids may come from
the previous step's tokens on the device, before the host has read them.

With tensor parallelism, ``peers`` (the other ranks, see ``vllm.executor``)
receive the same ``ModelInput`` before rank 0 runs its own forward; the layers'
collectives keep the ranks in step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from vllm.attention.metadata import build_metadata
from vllm.core.scheduler import SchedulerOutput
from vllm import envs
from vllm.engine.errors import FatalEngineError
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.sampler import Sampler
from vllm.platforms.host_copy import to_device
from vllm.structured_output.bitmask import grammar_bitmask
from vllm.worker.device_tokens import DeviceTokens
from vllm.worker.logprobs import PROMPT_LOGPROBS_CHUNK, ModelRunnerOutput, plan_prompt_logprobs

if TYPE_CHECKING:
    from vllm.worker.cuda_graphs import DecodeGraphRunner


@dataclass
class ModelInput:
    """One step's inputs for every rank (picklable: sent to the worker processes as is)."""

    input_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    slot_mapping: list[int]
    token_lora_ids: Optional[list[int]] = None  # lora_int_id (0 = none) per token; None without LoRA
    prompt_rows: list[int] = field(default_factory=list)  # hidden rows whose logits prompt logprobs need

    @classmethod
    def from_scheduler_output(cls, out: SchedulerOutput, block_size: int, lora: bool,
                              prompt_rows: Optional[list[int]] = None,
                              input_ids: Optional[list[int]] = None) -> "ModelInput":
        """``input_ids``: instead of the sequences' tokens (placeholders of a chained step, whose real
        ids are on the device)."""
        token_lora_ids = None
        if lora:
            token_lora_ids = out.lora_int_ids
            if out.query_lens and not min(out.query_lens) == max(out.query_lens) == 1:  # one id per new token
                token_lora_ids = [lid for lid, q in zip(token_lora_ids, out.query_lens) for _ in range(q)]
        return cls(out.input_token_ids() if input_ids is None else input_ids, out.positions(), list(out.query_lens), out.seq_lens, out.block_tables,
                   out.slot_mapping(block_size), token_lora_ids, list(prompt_rows or []))


class ModelRunner:
    def __init__(self, model: nn.Module, *, block_size: int, device: torch.device,
                 lora_manager: Optional[Any] = None, peers: Optional[Any] = None,
                 graphs: Optional["DecodeGraphRunner"] = None) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.lora_manager = lora_manager
        self.peers = peers  # the other TP ranks: start_execute(ModelInput) / finish_execute()
        self.sampler = Sampler()
        self.graphs = graphs  # captured decode steps (None: always eager)

    def prepare_step(self, inp: ModelInput) -> Optional[tuple[int, bool]]:
        """The host work of a step before its forward: the LoRA token -> slot mapping (shared by every
        LoRA layer; nothing is redone when the batch's adapters are those of the previous step), and the
        CUDA graph to replay (None: eager)."""
        if self.lora_manager is not None:
            self.lora_manager.set_adapter_mapping(inp.token_lora_ids or [0] * len(inp.input_ids))
        return self.graphs.graph_key(inp) if self.graphs is not None else None

    @torch.inference_mode()
    def compute_logits(self, inp: ModelInput,
                       on_prompt_logits: Optional[Callable[[int, torch.Tensor], None]] = None,
                       input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Forward one step on this rank; [num_seqs, vocab] logits of each last new token (``LogitsProcessor``'s dtype).

        Then the logits of ``inp.prompt_rows``, PROMPT_LOGPROBS_CHUNK rows at a time, each
        chunk passed to ``on_prompt_logits(first_row_index, logits)`` (rank 0) or dropped.
        ``input_ids``: the step's ids already on the device (a chained step), used instead of
        ``inp.input_ids``.
        """
        key = self.prepare_step(inp)
        if key is not None:
            return self.graphs.run(inp, key, input_ids)
        dev = self.device
        if input_ids is None:
            input_ids = to_device(inp.input_ids, torch.long, dev)
        positions = to_device(inp.positions, torch.long, dev)
        meta = build_metadata(inp.query_lens, inp.seq_lens, inp.block_tables, self.block_size, dev,
                              slot_mapping=inp.slot_mapping)
        with set_forward_context(meta):
            hidden = self.model(input_ids, positions)
        last = meta.query_start_loc[1:].long() - 1
        logits = self.model.compute_logits(hidden[last])
        for lo in range(0, len(inp.prompt_rows), PROMPT_LOGPROBS_CHUNK):
            rows = to_device(inp.prompt_rows[lo:lo + PROMPT_LOGPROBS_CHUNK], torch.long, dev)
            chunk = self.model.compute_logits(hidden.index_select(0, rows))
            if on_prompt_logits is not None:
                on_prompt_logits(lo, chunk)
        return logits

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Run the batch; return one sampled token id per scheduled sequence (and logprobs when asked)."""
        if out.is_empty:
            return ModelRunnerOutput([])
        plan = plan_prompt_logprobs(out)
        inp = ModelInput.from_scheduler_output(out, self.block_size, self.lora_manager is not None,
                                               plan.rows if plan is not None else None)
        if self.peers is None:
            logits = self.compute_logits(inp, plan.add_chunk if plan is not None else None)
        else:
            self.peers.start_execute(inp)
            try:
                logits = self.compute_logits(inp, plan.add_chunk if plan is not None else None)
            except Exception as e:  # the other ranks wait in this step's collectives: no way back
                dead = self.peers.dead_ranks(wait_s=2.0) if hasattr(self.peers, "dead_ranks") else []
                if dead:
                    what = f"tensor-parallel worker {', '.join(dead)} died during the step"
                elif "timed out" in str(e).lower():
                    what = (f"a tensor-parallel collective timed out after {envs.VLLM_COLLECTIVE_TIMEOUT:g} s "
                            "(VLLM_COLLECTIVE_TIMEOUT): another rank is stuck")
                else:
                    what = f"rank 0 failed during a tensor-parallel forward ({e!r})"
                raise FatalEngineError(f"{what}; the ranks are out of step and this engine cannot go on - "
                                       "restart it") from e
            self.peers.finish_execute()
        seqs = out.scheduled_seqs
        sampled = self.sampler(logits, [s.sampling_params for s in seqs],
                               [s.get_generator(logits.device) for s in seqs],
                               [s.suppressed_token_ids() for s in seqs],
                               num_logprobs=[s.sampling_params.logprobs for s in seqs],
                               prompt_token_ids=[s.prompt_token_ids for s in seqs],
                               output_token_ids=[s.output_token_ids for s in seqs],
                               grammar_bitmask=grammar_bitmask(seqs, logits.shape[1], logits.device))
        logprobs = sampled.logprobs if any(lp is not None for lp in sampled.logprobs) else None
        return ModelRunnerOutput(sampled.token_ids.tolist(), logprobs,
                                 plan.result(out) if plan is not None else None)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, input_ids: Optional[torch.Tensor] = None,
               tokens_ahead: int = 0) -> DeviceTokens:
        """Queue a decode or prefill batch and its sampling; its tokens stay on the device (async
        scheduling).

        ``input_ids``: [num_seqs] int64 on the device, a decode step's input ids when the host does
        not have them yet (the previous step's tokens); ``tokens_ahead``: tokens each sequence
        has sampled but not recorded yet (1 then), which ``min_tokens`` counts.  Only for one
        rank, and only for sequences whose sampling does not read their generated tokens
        (no penalties, bad_words, grammar or logprobs; no prompt logprobs in a prefill: the engine
        checks, this raises)."""
        if self.peers is not None:
            raise RuntimeError("async scheduling runs on one rank only (tensor_parallel_size 1)")
        seqs = out.scheduled_seqs
        if out.is_prefill:
            if input_ids is not None or tokens_ahead:
                raise ValueError("a prefill's input ids are its prompts' (no input_ids, no tokens ahead)")
            if any(s.sampling_params.prompt_logprobs is not None for s in seqs):
                raise ValueError("launch cannot compute prompt logprobs")
        elif any(q != 1 for q in out.query_lens):
            raise ValueError("a decode step feeds one new token per sequence")
        if input_ids is not None and tuple(input_ids.shape) != (len(seqs),):
            raise ValueError(f"input_ids must hold one id per sequence ({len(seqs)}), got {tuple(input_ids.shape)}")
        if any(s.grammar is not None or s.sampling_params.logprobs is not None or s.sampling_params.needs_penalties
               or s.sampling_params.bad_words for s in seqs):
            raise ValueError("launch cannot sample sequences with a grammar, logprobs, penalties or bad_words")
        if not seqs:
            return DeviceTokens.start(torch.empty(0, dtype=torch.int64, device=self.device))
        inp = ModelInput.from_scheduler_output(out, self.block_size, self.lora_manager is not None,
                                               input_ids=None if input_ids is None else [0] * len(seqs))
        logits = self.compute_logits(inp, input_ids=input_ids)
        tokens = self.sampler(logits, [s.sampling_params for s in seqs],
                              [s.get_generator(logits.device) for s in seqs],
                              [s.suppressed_token_ids(tokens_ahead) for s in seqs])
        return DeviceTokens.start(tokens)
