"""The model runner: one scheduled batch in, one sampled token per sequence out.

    SchedulerOutput -> input ids, positions, attention metadata (paged KV),
    the token -> adapter mapping (one per step, shared by every LoRA layer)
    -> model forward inside the forward context -> logits of each sequence's
    last new token -> Sampler (+ logprobs, prompt logprobs: vllm/worker/logprobs.py)
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from vllm.attention.metadata import build_metadata
from vllm.core.scheduler import SchedulerOutput
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.sampler import Sampler
from vllm.worker.logprobs import ModelRunnerOutput, prompt_logprobs


class ModelRunner:
    def __init__(self, model: nn.Module, *, block_size: int, device: torch.device,
                 lora_manager: Optional[Any] = None) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.lora_manager = lora_manager
        self.sampler = Sampler()

    def _lora_mapping(self, out: SchedulerOutput) -> None:
        if self.lora_manager is None:
            return
        per_token = [lid for lid, q in zip(out.lora_int_ids, out.query_lens) for _ in range(q)]
        self.lora_manager.set_adapter_mapping(per_token)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Run the batch; return one sampled token id per scheduled sequence (and logprobs when asked)."""
        if out.is_empty:
            return ModelRunnerOutput([])
        dev = self.device
        input_ids = torch.tensor(out.input_token_ids(), dtype=torch.long, device=dev)
        positions = torch.tensor(out.positions(), dtype=torch.long, device=dev)
        meta = build_metadata(out.query_lens, out.seq_lens, out.block_tables, self.block_size, dev,
                              slot_mapping=out.slot_mapping(self.block_size))
        self._lora_mapping(out)
        with set_forward_context(meta):
            hidden = self.model(input_ids, positions)
        last = meta.query_start_loc[1:].long() - 1
        logits = self.model.compute_logits(hidden[last])
        seqs = out.scheduled_seqs
        sampled = self.sampler(logits, [s.sampling_params for s in seqs],
                               [s.get_generator(logits.device) for s in seqs],
                               [s.suppressed_token_ids() for s in seqs],
                               num_logprobs=[s.sampling_params.logprobs for s in seqs])
        logprobs = sampled.logprobs if any(lp is not None for lp in sampled.logprobs) else None
        return ModelRunnerOutput(sampled.token_ids.tolist(), logprobs, prompt_logprobs(self.model, hidden, out))
