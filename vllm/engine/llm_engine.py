"""The engine: requests in, ``RequestOutput``s out, one ``step()`` at a time.

    add_request -> Sequences (n per request) -> Scheduler.waiting
    step():  Scheduler.schedule -> (LoRA: the batch's adapters are in the CPU cache)
             -> ModelRunner.execute (rank 0; with tensor parallelism the other
                ranks run the same step, see vllm.executor) -> Scheduler.postprocess
             -> Detokenizer (stop strings) -> RequestOutputs

Failures (see ``vllm.engine.errors``): a bad request is refused by ``add_request``
(ValueError, ``vllm.engine.input_checks``); an exception while a step is computed
fails only the requests that caused it (``vllm.engine.fault_isolation``), which
finish with ``RequestOutput.error``; their KV blocks are freed and the engine goes on.
Adapters: ``vllm.engine.lora_registry`` (what unloading one in use means).
Async scheduling (``EngineArgs.async_scheduling``): decode steps are queued one ahead of the
host's reading of their tokens, same outputs (``vllm.engine.async_scheduling``).
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Iterable, Optional, Union

import torch

from vllm.core.block_manager import BlockManager
from vllm.core.scheduler import Scheduler, SchedulerOutput
from vllm.config.generation import load_generation_defaults
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.async_scheduling import AsyncScheduling
from vllm.engine.errors import describe, is_fatal
from vllm.engine.fault_isolation import execute_isolated, sub_batch
from vllm.engine.input_checks import (PromptType, RequestLimits, cache_salt, check_request, prompt_ids,
                                     truncate_prompt)
from vllm.engine.lora_registry import LoRARegistry
from vllm.executor import create_executor
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.sequence import Sequence, SequenceStatus
from vllm.structured_output.backend import GrammarCompiler
from vllm.transformers_utils.detokenizer import Detokenizer
from vllm.transformers_utils.hub import resolve_model_path
from vllm.transformers_utils.tokenizer import get_tokenizer

logger = init_logger(__name__)

__all__ = ["LLMEngine", "PromptType"]


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        (self.model_config, self.cache_config, self.scheduler_config,
         self.lora_config) = args.create_configs()
        torch.manual_seed(args.seed)
        tokenizer_path = self.model_config.model  # the model's folder (a hub id already resolved)
        if args.tokenizer:
            tokenizer_path = resolve_model_path(args.tokenizer, args.tokenizer_revision or args.revision,
                                                what="tokenizer")
        logger.info("loading tokenizer from %s", tokenizer_path)
        self.tokenizer = get_tokenizer(tokenizer_path, trust_remote_code=args.trust_remote_code)
        self.generation_defaults = load_generation_defaults(self.model_config.model, args.generation_config)
        if self.generation_defaults.sampling:
            logger.warning("default sampling parameters come from %s/generation_config.json: %s (they apply to "
                           "what a request does not set; --generation-config vllm / generation_config='vllm' "
                           "ignores them)", self.generation_defaults.source, self.generation_defaults.sampling)
        self.executor = create_executor(args)
        driver = self.executor.driver  # rank 0: its model shard, KV cache and runner (which samples)
        self.device = driver.device
        self.model = driver.model
        self.kv_caches = driver.kv_caches
        self.runner = driver.runner
        self.lora_manager = self.executor.lora_manager
        self.scheduler = Scheduler(self.scheduler_config,
                                   BlockManager(self.executor.num_blocks, self.cache_config.block_size,
                                                enable_prefix_caching=self.cache_config.enable_prefix_caching))
        self.detokenizer = Detokenizer(self.tokenizer)
        self._seq_ids = itertools.count()
        self._requests: dict[str, list[Sequence]] = {}
        self._errors: dict[str, str] = {}  # request id -> why it failed (until its output is returned)
        self.loras = LoRARegistry(self.lora_manager)
        self._limits = RequestLimits(self.model_config.vocab_size, self.model_config.max_model_len,
                                     self.scheduler_config.max_num_seqs)
        self._extra_eos = self._generation_eos_ids()
        # structured output: grammars compiled per constraint for this tokenizer (llguidance loads on first use)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
        self.async_scheduling: Optional[AsyncScheduling] = None
        if self._wants_async_scheduling(args):
            self.async_scheduling = AsyncScheduling(self.scheduler, self.runner, self.loras, self.device)
        logger.info("engine ready: max_model_len=%d, max_num_seqs=%d, tensor_parallel_size=%d, prefix caching %s, "
                    "LoRA %s, async scheduling %s", self.model_config.max_model_len, self.scheduler_config.max_num_seqs,
                    args.tensor_parallel_size, "on" if self.cache_config.enable_prefix_caching else "off",
                    f"on (max_loras={self.lora_config.max_loras}, max_lora_rank={self.lora_config.max_lora_rank})"
                    if self.lora_config else "off", "on" if self.async_scheduling else "off")

    def _wants_async_scheduling(self, args: EngineArgs) -> bool:
        """``async_scheduling``: True / False as asked; None (the default) = on with one CUDA GPU, as vLLM
        has done by default since 0.14, off on CPU.  Not supported with tensor_parallel_size > 1 yet: asked
        for there, a warning and synchronous steps."""
        if args.tensor_parallel_size > 1:
            if args.async_scheduling:
                logger.warning("async_scheduling is not supported with tensor_parallel_size > 1 yet: steps run "
                               "synchronously")
            return False
        if args.async_scheduling is None:
            return torch.device(self.device).type == "cuda"
        return bool(args.async_scheduling)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor-parallel engine (also done when it is garbage-collected)."""
        self.executor.shutdown()

    def _generation_eos_ids(self) -> set[int]:
        """EOS ids besides the tokenizer's: generation_config.json's, else config.json's (as vLLM)."""
        eos = self.generation_defaults.eos_token_ids
        if eos is None:
            eos = self.model_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return ids - {self.tokenizer.eos_token_id}

    # ---- adapters --------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load (and validate) an adapter into the CPU cache; errors leave the engine as it was.

        Refused (ValueError) while an adapter of the same ``lora_int_id`` that was unloaded
        still serves requests added before (see ``remove_lora``)."""
        return self.loras.add(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Unload an adapter; False if it was not loaded.

        From now on, requests for it are refused (ValueError: not loaded) until it is added
        again.  Requests added before finish on the weights they started with: the adapter
        stays in the CPU cache, unevictable, until the last of them finishes, and is dropped
        then.  An unloaded adapter is never read from its folder again behind the user's
        back: only an explicit ``add_lora``, or a new request that carries its
        ``LoRARequest`` after the old requests finished, loads it (from the folder, afresh).
        To serve new weights under the same name at once, add them under a new lora_int_id.
        """
        if self.lora_manager is None:
            return False
        return self.loras.remove(lora_int_id)

    # ---- requests ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams] = None,
                    lora_request: Optional[LoRARequest] = None, arrival_time: Optional[float] = None) -> None:
        """Queue a request; a bad one raises a clear ValueError and leaves the others untouched.

        ``prompt``: a string (tokenized here), a list of token ids, or a dict with
        'prompt_token_ids' (and optionally the 'prompt' text) or 'prompt'."""
        if not isinstance(request_id, str) or request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use" if isinstance(request_id, str)
                             else f"request ids are strings, got {type(request_id).__name__}")
        params = params or SamplingParams()
        text, token_ids = self.process_prompt(request_id, prompt, params)
        salt = cache_salt(prompt)
        if lora_request is not None:
            self.add_lora(lora_request)
        if self._extra_eos and not params.ignore_eos:
            params = params.clone()
            params.stop_token_ids = sorted(set(params.stop_token_ids) | self._extra_eos)
        now = time.time() if arrival_time is None else arrival_time
        cache_key = self.loras.cache_key(lora_request)  # names this load of the adapter (prefix caching)
        if salt is not None:  # blocks are shared only among requests with this salt (and adapter)
            cache_key = f"{cache_key}\x00salt:{salt}"
        seqs = [Sequence(next(self._seq_ids), request_id, token_ids, params, index=i, prompt=text,
                         lora_request=lora_request, eos_token_id=self.tokenizer.eos_token_id, arrival_time=now,
                         cache_key=cache_key)
                for i in range(params.n)]
        if params.structured_outputs is not None:
            for seq in seqs:  # one matcher per sample, copied from the cached compiled grammar
                seq.grammar = self.grammars.new_state(params.structured_outputs)
        self._requests[request_id] = seqs
        self.loras.acquire(lora_request)
        self.scheduler.add_seqs(seqs)

    def process_prompt(self, request_id: str, prompt: PromptType, params: SamplingParams
                       ) -> tuple[Optional[str], list[int]]:
        """Tokenize and check a request against the model: (text or None, token ids), or a ValueError.

        Thread-safe (reads the tokenizer and fixed limits only): ``AsyncLLMEngine`` calls it off
        the engine thread, so a huge prompt is tokenized and refused without holding up steps."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = prompt_ids(prompt, self.tokenizer)
        kept = truncate_prompt(token_ids, params.truncate_prompt_tokens, self._limits.max_model_len)
        if len(kept) < len(token_ids):  # the text no longer matches the ids: outputs carry the ids only
            text, token_ids = None, kept
        params.update_from_tokenizer(self.tokenizer)  # bad_words -> token ids
        check_request(request_id, token_ids, params, self._limits)
        if params.structured_outputs is not None:  # compiled (and cached) here, off the engine thread
            try:
                self.grammars.compile(params.structured_outputs)
            except ValueError as e:
                raise ValueError(f"request {request_id!r}: {e}") from None
        return text, token_ids

    def abort_request(self, request_id: Union[str, Iterable[str]]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.scheduler.abort_request(ids)
        for rid in ids:
            self._forget(rid)

    def _forget(self, request_id: str) -> None:
        """The request leaves the engine: its adapter is released (dropped if unloaded meanwhile)."""
        seqs = self._requests.pop(request_id, None)
        self._errors.pop(request_id, None)
        if seqs is not None:
            self.loras.release(seqs[0].lora_request)

    def _fail(self, request_id: str, error: str) -> None:
        """Finish the request's unfinished sequences as aborted (blocks freed), with ``error`` reported."""
        seqs = self._requests.get(request_id)
        if seqs is None:
            return
        self._errors.setdefault(request_id, error)
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.finish_seq(seq, SequenceStatus.FINISHED_ABORTED)

    def prefix_cache_counts(self) -> tuple[int, int]:
        """(queried, hit) prompt tokens of the prefix cache since the start (0, 0 when it is off)."""
        stats = self.scheduler.prefix_cache_stats
        return stats.queries, stats.hits

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (the blocks of running sequences stay theirs, unregistered)."""
        self.scheduler.block_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        """True while a request is unfinished or a step's outputs are still to be returned (async scheduling)."""
        return self.scheduler.has_unfinished() or (self.async_scheduling is not None
                                                   and self.async_scheduling.pending is not None)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def get_request_counts(self) -> tuple[int, int]:
        """(running, waiting) requests: a request runs when any of its sequences does."""
        running = len({seq.request_id for seq in self.scheduler.running})
        return running, len(self._requests) - running

    # ---- one step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and run one batch; the ``RequestOutput``s of the requests it touched.

        An exception while the batch is computed fails only the requests that cause it
        (they finish with ``RequestOutput.error``); fatal ones (``is_fatal``) are raised.
        With async scheduling, a call may queue the next batch (the next decode batch, or a prefill of
        waiting prompts) before it returns this one's outputs; a call returns one batch's outputs, in
        order (two when a prefill scheduled meanwhile could not be queued and ran after it)."""
        chain = self.async_scheduling
        if chain is not None and chain.pending is not None:
            return self._advance_chain(set())
        touched: set[str] = set()
        out = self._schedule(self.scheduler.schedule, touched)
        if out is None:
            return self._outputs(touched)
        touched |= {s.request_id for s in out.scheduled_seqs}
        if not out.is_empty:
            if chain is not None and chain.start(out):
                return self._advance_chain(touched)
            self._run_batch(out)
        return self._outputs(touched | self._errors.keys())

    def _advance_chain(self, touched: set[str]) -> list[RequestOutput]:
        """Async scheduling: queue the next batch (after a prefill, the waiting prompts that fit; after a
        decode step, the next decode batch if the chain may go on), then record the pending one's tokens.
        A prefill batch that cannot be queued runs synchronously after that."""
        chain = self.async_scheduling
        prefill = None
        if chain.pending.out.is_prefill and chain.prefill_may_come():  # (after a decode step: synchronously)
            prefill = self._schedule(self.scheduler.schedule_prefills, touched)
            if prefill is not None and prefill.is_empty:
                prefill = None
        parts, failed = chain.advance(self.runner.execute, prefill)
        touched |= {s.request_id for part, _ in parts for s in part.scheduled_seqs} | failed.keys()
        self._record(parts, failed)
        if prefill is not None and (chain.pending is None or chain.pending.out is not prefill):
            touched |= {s.request_id for s in prefill.scheduled_seqs}
            self._run_batch(prefill)
        return self._outputs(touched | self._errors.keys())

    def _schedule(self, schedule: Callable[[], SchedulerOutput], touched: set[str]) -> Optional[SchedulerOutput]:
        """``schedule()``'s batch without the requests whose adapter is missing (they fail); their ids and
        the ignored sequences' go into ``touched`` (the scheduled ones' when their tokens are recorded).
        None when the scheduler raised: its state is unknown, so every request fails."""
        try:
            out = schedule()
        except Exception as exc:  # a scheduler bug
            if is_fatal(exc):
                raise
            logger.exception("the scheduler failed; failing all %d unfinished requests", len(self._requests))
            for rid in list(self._requests):
                self._fail(rid, f"the engine's scheduler failed ({describe(exc)})")
            touched |= set(self._requests)
            return None
        touched |= {s.request_id for s in out.ignored_seqs}
        missing = self.loras.check_batch(out)
        for rid, error in missing.items():
            logger.error("request %s: %s", rid, error)
            self._fail(rid, error)
        if missing:
            out = sub_batch(out, [i for i, s in enumerate(out.scheduled_seqs) if not s.is_finished])
        return out

    def _run_batch(self, out: SchedulerOutput) -> None:
        """Execute (fault-isolated), postprocess and detokenize; failing requests are failed."""
        self._record(*execute_isolated(self.runner.execute, out, self.device))

    def _record(self, parts: list, failed: dict[str, Exception]) -> None:
        """Postprocess and detokenize the (batch, result) parts; the ``failed`` requests (and those whose
        bookkeeping raises) are failed."""
        for rid, exc in failed.items():
            self._fail(rid, f"the request failed while the engine computed it ({describe(exc)})")
        errors: list = []
        for part, result in parts:
            self.scheduler.postprocess(part.scheduled_seqs, result.sampled_token_ids, result.logprobs,
                                       result.prompt_logprobs, errors=errors)
        for seq, exc in errors:
            logger.error("request %s failed in postprocessing: %r", seq.request_id, exc, exc_info=exc)
            self._fail(seq.request_id, f"the request failed while its tokens were recorded ({describe(exc)})")
        for part, _ in parts:
            for seq in part.scheduled_seqs:
                if seq.request_id in self._errors or _text_can_wait(seq):
                    continue
                try:
                    stop = self.detokenizer.decode_sequence_inplace(seq)
                except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                    logger.error("request %s failed in detokenization: %r", seq.request_id, exc, exc_info=exc)
                    self._fail(seq.request_id, f"the request failed while its text was decoded ({describe(exc)})")
                    continue
                if stop is not None:
                    self.scheduler.finish_seq(seq, SequenceStatus.FINISHED_STOPPED, stop)

    def _outputs(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        outputs = []
        for rid in request_ids:
            seqs = self._requests.get(rid)
            if seqs is None:
                continue
            finished = all(s.is_finished for s in seqs)
            if seqs[0].sampling_params.output_kind == RequestOutputKind.FINAL_ONLY and not finished:
                continue
            ro = RequestOutput.from_seqs(seqs)
            if finished:
                ro.error = self._errors.get(rid)
                self._forget(rid)
            outputs.append(ro)
        return outputs


def _text_can_wait(seq: Sequence) -> bool:
    """Whether this step may skip the sequence's detokenization: nobody reads its text before it
    finishes (``FINAL_ONLY``) and no stop string needs it.  The incremental decode then covers
    all the new tokens at once when the sequence finishes (same text: it is windowed, not per token)."""
    params = seq.sampling_params
    return (params.output_kind == RequestOutputKind.FINAL_ONLY and not params.stop and not seq.is_finished
            and not params.logprobs and params.prompt_logprobs is None)
