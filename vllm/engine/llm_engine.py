"""The engine: requests in, ``RequestOutput``s out, one ``step()`` at a time.

    add_request -> Sequences (n per request) -> Scheduler.waiting
    step():  Scheduler.schedule -> (LoRA: adapters of the batch loaded)
             -> ModelRunner.execute (rank 0; with tensor parallelism the other
                ranks run the same step, see vllm.executor) -> Scheduler.postprocess
             -> Detokenizer (stop strings) -> RequestOutputs
"""
from __future__ import annotations

import itertools
import time
from typing import Optional, Union

import torch

from vllm.core.block_manager import BlockManager
from vllm.core.scheduler import Scheduler, SchedulerOutput
from vllm.engine.arg_utils import EngineArgs
from vllm.executor import create_executor
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.sequence import Sequence, SequenceStatus
from vllm.transformers_utils.detokenizer import Detokenizer
from vllm.transformers_utils.tokenizer import get_tokenizer

logger = init_logger(__name__)

PromptType = Union[str, list[int], dict]


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        (self.model_config, self.cache_config, self.scheduler_config,
         self.lora_config) = args.create_configs()
        torch.manual_seed(args.seed)
        logger.info("loading tokenizer from %s", args.tokenizer or args.model)
        self.tokenizer = get_tokenizer(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
        self.executor = create_executor(args)
        driver = self.executor.driver  # rank 0: its model shard, KV cache and runner (which samples)
        self.device = driver.device
        self.model = driver.model
        self.kv_caches = driver.kv_caches
        self.runner = driver.runner
        self.lora_manager = self.executor.lora_manager
        self.scheduler = Scheduler(self.scheduler_config,
                                   BlockManager(self.executor.num_blocks, self.cache_config.block_size))
        self.detokenizer = Detokenizer(self.tokenizer)
        self._seq_ids = itertools.count()
        self._requests: dict[str, list[Sequence]] = {}
        self._lora_requests: dict[int, LoRARequest] = {}
        self._extra_eos = self._generation_eos_ids()
        logger.info("engine ready: max_model_len=%d, max_num_seqs=%d, tensor_parallel_size=%d, LoRA %s",
                    self.model_config.max_model_len, self.scheduler_config.max_num_seqs, args.tensor_parallel_size,
                    f"on (max_loras={self.lora_config.max_loras}, max_lora_rank={self.lora_config.max_lora_rank})"
                    if self.lora_config else "off")

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor-parallel engine (also done when it is garbage-collected)."""
        self.executor.shutdown()

    def _generation_eos_ids(self) -> set[int]:
        eos = self.model_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return ids - {self.tokenizer.eos_token_id}

    # ---- requests ------------------------------------------------------------------
    def _tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt must be a string, a list of token ids or a dict with 'prompt' or "
                        f"'prompt_token_ids', got {type(prompt).__name__}")

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load (and validate) an adapter into the CPU cache; errors leave the engine as it was."""
        if self.lora_manager is None:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r} requested but LoRA is not enabled; "
                             "start the engine with enable_lora=True")
        known = self._lora_requests.get(lora_request.lora_int_id)
        if known is not None and known.lora_path != lora_request.lora_path:
            raise ValueError(f"lora_int_id {lora_request.lora_int_id} already names adapter {known.lora_name!r} "
                             f"({known.lora_path}); give each adapter its own id")
        added = self.lora_manager.add_adapter(lora_request)
        self._lora_requests[lora_request.lora_int_id] = lora_request
        return added

    def remove_lora(self, lora_int_id: int) -> bool:
        if self.lora_manager is None:
            return False
        self._lora_requests.pop(lora_int_id, None)
        return self.lora_manager.remove_adapter(lora_int_id)

    def add_request(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams] = None,
                    lora_request: Optional[LoRARequest] = None, arrival_time: Optional[float] = None) -> None:
        """Queue a request; a bad one raises a clear error and leaves the others untouched."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = self._tokenize(prompt)
        if not token_ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        max_len = self.model_config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(f"request {request_id!r}: the prompt has {len(token_ids)} tokens, but max_model_len "
                             f"is {max_len}; shorten the prompt or raise max_model_len")
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"request {request_id!r}: token ids must be in [0, {vocab})")
        if lora_request is not None:
            self.add_lora(lora_request)
        if self._extra_eos and not params.ignore_eos:
            params = params.clone()
            params.stop_token_ids = sorted(set(params.stop_token_ids) | self._extra_eos)
        now = time.time() if arrival_time is None else arrival_time
        seqs = [Sequence(next(self._seq_ids), request_id, token_ids, params, index=i, prompt=text,
                         lora_request=lora_request, eos_token_id=self.tokenizer.eos_token_id, arrival_time=now)
                for i in range(params.n)]
        self._requests[request_id] = seqs
        self.scheduler.add_seqs(seqs)

    def abort_request(self, request_id: Union[str, list[str]]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.scheduler.abort_request(ids)
        for rid in ids:
            self._requests.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ---- one step ---------------------------------------------------------------------
    def _ensure_adapters(self, seqs: list[Sequence]) -> list[str]:
        """Adapters of the batch are in the CPU cache (reloaded if it evicted them).

        Returns the request ids whose adapter can no longer be loaded (e.g. its files
        were removed); the caller aborts them so the other requests keep running.
        """
        if self.lora_manager is None:
            return []
        failed = []
        # Pin the whole batch first, so that reloading one of its adapters never evicts another.
        self.lora_manager.pin_adapters({seq.lora_int_id for seq in seqs})
        for seq in seqs:
            req = seq.lora_request
            if req is not None and self.lora_manager.get_request(req.lora_int_id) is None:
                try:
                    self.lora_manager.add_adapter(req)
                except Exception as exc:  # noqa: BLE001 - reported per request, the engine keeps serving
                    logger.error("request %s: LoRA adapter %r could not be reloaded: %s", seq.request_id,
                                 req.lora_name, exc)
                    failed.append(seq.request_id)
        return failed

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        touched = {s.request_id for s in out.scheduled_seqs} | {s.request_id for s in out.ignored_seqs}
        failed = set(self._ensure_adapters(out.scheduled_seqs)) if not out.is_empty else set()
        if failed:  # abort those requests (reported as finished) and run the rest of the batch
            self.scheduler.abort_request(list(failed))
            keep = [i for i, seq in enumerate(out.scheduled_seqs) if seq.request_id not in failed]
            out = SchedulerOutput(scheduled_seqs=[out.scheduled_seqs[i] for i in keep],
                                  query_lens=[out.query_lens[i] for i in keep],
                                  context_lens=[out.context_lens[i] for i in keep], is_prefill=out.is_prefill,
                                  ignored_seqs=out.ignored_seqs, preempted_seqs=out.preempted_seqs)
        if not out.is_empty:
            result = self.runner.execute(out)
            self.scheduler.postprocess(out.scheduled_seqs, result.sampled_token_ids, result.logprobs,
                                       result.prompt_logprobs)
            for seq in out.scheduled_seqs:
                stop = self.detokenizer.decode_sequence_inplace(seq)
                if stop is not None:
                    self.scheduler.finish_seq(seq, SequenceStatus.FINISHED_STOPPED, stop)
        outputs = []
        for rid in touched:
            seqs = self._requests.get(rid)
            if seqs is None:
                continue
            if seqs[0].sampling_params.output_kind == RequestOutputKind.FINAL_ONLY and \
                    not all(s.is_finished for s in seqs):
                continue
            ro = RequestOutput.from_seqs(seqs)
            outputs.append(ro)
            if ro.finished:
                del self._requests[rid]
        return outputs
