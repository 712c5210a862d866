"""CUDA-graph decode: one captured forward per padded batch size, replayed every decode step.

A decode step (one new token for every sequence) launches hundreds of small
kernels; replaying a captured graph costs one launch.  ``DecodeGraphRunner``,
owned by the ``ModelRunner``, keeps:

* ``DecodeBuffers``: static device buffers for everything a captured step reads
  (input ids, positions, KV slots, seq lens, block tables, query_start_loc).
  Each step's inputs are copied into them in place (three host->device copies);
  the LoRA token -> slot mapping lives in the Punica wrapper's persistent buffers,
  which ``LoRAModelManager.set_adapter_mapping`` updates in place as in eager mode.
* one graph per (padded batch size, LoRA) key.  Sizes come from a ladder
  (``capture_sizes``); a batch of n sequences runs the graph of the smallest size
  >= n.  Padding rows have slot -1 (nothing written to the KV cache), seq_len 1,
  no adapter, and their logits are dropped.
* LoRA: the Punica wrapper lets a layer skip its LoRA launches when no token of
  the step uses one of its adapters (a host-side decision).  A graph cannot take
  that decision per step, so there are two graphs per size: "no adapter in the
  batch" (captured with every token on the base model: every layer skips) and
  "some adapter" (captured with ``PunicaWrapperBase.run_all_lora_ops``: every
  LoRA layer launches its ops for all its slots; slots without weights have
  ``adapter_enabled`` 0 and contribute exactly zero).  Adapters are copied into
  their slots in place, so the graphs stay valid across loads, unloads and swaps.

Only decode steps replay (every query_len 1, no prompt logprobs, n <= the largest
size); prefills and bigger batches run eagerly.  Graphs are captured after the KV
cache exists, largest size first, sharing one memory pool; the logits of a replay
are a view of a static [max_size, vocab] buffer, valid until the next step.

What a captured step may not do: synchronise with the host or depend on host
values that change per step.  The decode path is built for that: the Triton paged
attention walks each sequence's context up to its seq_len read on the device, and
its grid comes from the padded batch size; ``moe_align_block_size`` and the MoE
LoRA alignment have worst-case output sizes; every tile / path choice (small-batch
vs sorted) depends on the padded token count only.  Allocations inside the capture
come from the graph's private pool (fixed addresses on replay).  Not supported
(the engine runs eagerly, with the reason logged): the torch attention backend,
MoE experts other than the Triton ones (bf16, int4, MXFP4), tensor parallelism.
A capture that fails (an op that synchronises or allocates outside the pool) is
logged as a warning and the engine serves eagerly instead of failing to start.

``emulate=True`` (CPU tests) keeps the whole host path - ladder, buffers, keys,
LoRA forcing - but "replays" by running the same forward eagerly over the static
buffers.
"""
from __future__ import annotations

import bisect
import gc
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import nn

from vllm.attention.metadata import AttentionMetadata
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger

if TYPE_CHECKING:
    from vllm.worker.model_runner import ModelInput

logger = init_logger(__name__)

# Largest batch captured by default (bigger decode batches run eagerly).
MAX_CAPTURE_SIZE = 512
_LADDER = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# MoE experts implementations whose apply() is free of host synchronisation.
_GRAPH_SAFE_EXPERTS = ("TritonExperts", "MarlinExperts", "UnfusedOAITritonExperts")


def capture_sizes(max_num_seqs: int, sizes: Optional[Sequence[int]] = None,
                  max_size: int = MAX_CAPTURE_SIZE) -> list[int]:
    """The batch sizes to capture, ascending.

    Default: the ladder 1, 2, 4, 8, 16, 24, ... 64, 80, ... 256, 320, ... up to
    min(max_num_seqs, max_size), plus max_num_seqs itself when it is below max_size
    and not on the ladder (so every decode batch fits a graph).  ``sizes`` replaces
    the ladder (entries above max_num_seqs are dropped).
    """
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    if sizes is not None:
        bad = [s for s in sizes if not isinstance(s, int) or isinstance(s, bool) or s < 1]
        if bad or not sizes:
            raise ValueError(f"cuda_graph_sizes must be a non-empty list of positive integers, got {list(sizes)!r}")
        return sorted({s for s in sizes if s <= max_num_seqs}) or [max_num_seqs]
    top = min(max_num_seqs, max_size)
    ladder = [s for s in _LADDER if s <= top]
    if top not in ladder:
        ladder.append(top)
    return ladder


def padded_size(n: int, sizes: Sequence[int]) -> Optional[int]:
    """The smallest captured size >= n (sizes ascending), or None when n is larger than all."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def graph_blockers(model: nn.Module, device: torch.device, world_size: int) -> list[str]:
    """Why the decode path of ``model`` cannot be captured here (empty: it can)."""
    from vllm.model_executor.layers.attention import attention_layers

    reasons = []
    if device.type != "cuda":
        reasons.append(f"the device is {device.type}, not CUDA")
    if world_size > 1:
        reasons.append("tensor parallelism is not supported with CUDA graphs yet")
    backends = {a.backend for a in attention_layers(model)}
    if backends - {"triton"}:
        reasons.append(f"attention backend {sorted(map(str, backends - {'triton'}))} is not graph-safe (use triton)")
    for name, m in model.named_modules():
        kernel = getattr(getattr(m, "quant_method", None), "kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and type(experts).__name__ not in _GRAPH_SAFE_EXPERTS:
            reasons.append(f"{name} runs {type(experts).__name__}, which synchronises with the host")
            break
    return reasons


class DecodeBuffers:
    """Static inputs of captured decode steps, for batches of up to ``max_size`` sequences.

    For a padded size p the graph reads: ``ids`` [p] / ``positions`` [p] /
    ``slots`` [p] (int64, packed in one buffer so that one copy fills them),
    ``seq_lens`` [p] int32, ``block_tables`` [p, max_blocks] int32 and the
    constant ``query_start_loc`` [p + 1] = 0..p.
    """

    def __init__(self, max_size: int, max_blocks: int, block_size: int, device: torch.device) -> None:
        self.max_size, self.max_blocks, self.block_size = max_size, max_blocks, block_size
        self.device = torch.device(device)
        self._i64: Optional[torch.Tensor] = None

    def allocate(self) -> None:
        dev, p = self.device, self.max_size
        self._i64 = torch.zeros(3 * p, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(p, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(p, self.max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(p + 1, dtype=torch.int32, device=dev)
        self.fill_dummy(p)

    def views(self, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids, positions, slot mapping) of size p: consecutive slices of one buffer."""
        assert self._i64 is not None, "call allocate() first"
        return self._i64[:p], self._i64[p:2 * p], self._i64[2 * p:3 * p]

    def metadata(self, p: int, seq_lens_cpu: Optional[list[int]] = None) -> AttentionMetadata:
        """Attention metadata over the buffers for size p.  The host lengths are placeholders
        (1) unless given: the Triton backend reads lengths from the device only."""
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:p + 1], seq_lens=self.seq_lens[:p],
            slot_mapping=self.views(p)[2], block_tables=self.block_tables[:p],
            query_lens_cpu=[1] * p, seq_lens_cpu=list(seq_lens_cpu) if seq_lens_cpu else [1] * p,
            block_size=self.block_size)

    def fill_dummy(self, p: int) -> None:
        """Inputs for capturing size p: token 0 at position 0, slot -1 (no KV write), seq_len 1."""
        self.prepare([0] * 0, [], [], [], [], p)

    def prepare(self, input_ids: Sequence[int], positions: Sequence[int], slot_mapping: Sequence[int],
                seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]], p: int) -> None:
        """Copy one decode step of n <= p sequences into the buffers of size p; rows n..p-1 are padding."""
        n = len(input_ids)
        if not (len(positions) == len(slot_mapping) == len(seq_lens) == len(block_tables) == n) or n > p:
            raise ValueError(f"a decode step of {n} sequences needs one position, slot, seq_len and block table "
                             f"each, and at most {p} sequences")
        pad = p - n
        flat = torch.tensor([*input_ids, *[0] * pad, *positions, *[0] * pad, *slot_mapping, *[-1] * pad],
                            dtype=torch.int64)
        self._i64[:3 * p].copy_(flat, non_blocking=True)
        self.seq_lens[:p].copy_(torch.tensor([*seq_lens, *[1] * pad], dtype=torch.int32), non_blocking=True)
        if n:
            width = max(len(bt) for bt in block_tables)
            if width > self.max_blocks:
                raise ValueError(f"a block table of {width} blocks exceeds the {self.max_blocks} the graphs were "
                                 "captured for")
            if width:
                tables = torch.tensor([[*bt, *[0] * (width - len(bt))] for bt in block_tables], dtype=torch.int32)
                # Entries past a row's seq_len are never read; padding rows read entry 0, a valid block.
                self.block_tables[:n, :width].copy_(tables, non_blocking=True)


class DecodeGraphRunner:
    """Captures and replays decode steps of ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, *, block_size: int, max_model_len: int, max_num_seqs: int,
                 device: torch.device, lora_manager: Optional[Any] = None,
                 sizes: Optional[Sequence[int]] = None, emulate: bool = False) -> None:
        self.model = model
        self.device = torch.device(device)
        self.lora_manager = lora_manager
        self.sizes = capture_sizes(max_num_seqs, sizes)
        self.max_size = self.sizes[-1]
        self.emulate = emulate
        self.buffers = DecodeBuffers(self.max_size, -(-max_model_len // block_size), block_size, self.device)
        self.logits: Optional[torch.Tensor] = None  # [max_size, vocab] float32, written by every replay
        self._graphs: dict[tuple[int, bool], Any] = {}
        self._keep_alive: list[torch.Tensor] = []
        self.replays: dict[tuple[int, bool], int] = {}  # replays per key (tests and logs)
        self.capture_seconds = 0.0
        self.graph_memory_bytes = 0

    # ---- host-side decisions ------------------------------------------------------
    @property
    def keys(self) -> list[tuple[int, bool]]:
        """(size, LoRA) keys to capture: with LoRA enabled, each size with and without adapters."""
        flags = (False, True) if self.lora_manager is not None else (False,)
        return [(p, lora) for p in self.sizes for lora in flags]

    def graph_key(self, inp: "ModelInput") -> Optional[tuple[int, bool]]:
        """The graph for this step, or None when it must run eagerly (not a pure decode step, prompt
        logprobs wanted, or more sequences than the largest graph)."""
        n = len(inp.query_lens)
        if n == 0 or inp.prompt_rows or len(inp.input_ids) != n or any(q != 1 for q in inp.query_lens):
            return None
        p = padded_size(n, self.sizes)
        if p is None:
            return None
        lora = self.lora_manager is not None and any(inp.token_lora_ids or ())
        return (p, bool(lora))

    # ---- capture --------------------------------------------------------------------
    def _forward(self, p: int, lora: bool, seq_lens_cpu: Optional[list[int]] = None) -> None:
        """The step a graph holds: model over the size-p buffers, logits of every row into ``self.logits``."""
        ids, positions, _ = self.buffers.views(p)
        punica = self.lora_manager.punica_wrapper if self.lora_manager is not None else None
        if punica is not None:
            punica.run_all_lora_ops(lora)
        try:
            with set_forward_context(self.buffers.metadata(p, seq_lens_cpu)):
                hidden = self.model(ids, positions)
            logits = self.model.compute_logits(hidden)
        finally:
            if punica is not None:
                punica.run_all_lora_ops(False)
        if self.logits is None:  # first (eager) warm-up run: the vocabulary is known now
            self.logits = torch.empty(self.max_size, logits.shape[1], dtype=logits.dtype, device=self.device)
        self.logits[:p].copy_(logits)

    def _set_dummy_inputs(self, p: int) -> None:
        self.buffers.fill_dummy(p)
        if self.lora_manager is not None:
            self.lora_manager.set_adapter_mapping([0] * p)  # every token on the base model

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every key, largest size first (call once the KV cache is bound)."""
        self.buffers.allocate()
        cuda = not self.emulate
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0] if cuda else 0
        pool = torch.cuda.graph_pool_handle() if cuda else None
        gc.collect()
        for p, lora in sorted(self.keys, reverse=True):
            self._set_dummy_inputs(p)
            self._forward(p, lora)  # compiles the Triton kernels of this shape outside the capture
            if not cuda:
                self._graphs[(p, lora)] = (p, lora)
                continue
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(p, lora)
            self._graphs[(p, lora)] = graph
        if cuda:
            self._keep_alive = _grown_workspaces(self.model)
            torch.cuda.synchronize(self.device)
            self.graph_memory_bytes = max(0, free_before - torch.cuda.mem_get_info(self.device)[0])
        if self.lora_manager is not None:
            self.lora_manager.set_adapter_mapping([])
        self.replays = {k: 0 for k in self._graphs}
        self.capture_seconds = time.perf_counter() - start
        logger.info("CUDA graphs: captured %d decode graphs (batch sizes %s%s) in %.1f s, %.0f MiB of GPU memory%s",
                    len(self._graphs), self.sizes, ", each with and without LoRA" if self.lora_manager else "",
                    self.capture_seconds, self.graph_memory_bytes / (1 << 20),
                    " (emulated on the host)" if self.emulate else "")

    def release(self) -> None:
        """Drop every graph and buffer (after a failed capture): the engine then runs eagerly."""
        self._graphs.clear()
        self._keep_alive = []
        self.logits = None
        self.replays = {}
        if self.lora_manager is not None:
            self.lora_manager.punica_wrapper.run_all_lora_ops(False)
            self.lora_manager.set_adapter_mapping([])
        if not self.emulate:
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # noqa: BLE001 - the capture error was already reported
                pass
            torch.cuda.empty_cache()

    # ---- replay -------------------------------------------------------------------------
    def run(self, inp: "ModelInput", key: tuple[int, bool], input_ids: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
        """Copy the step's inputs into the buffers, replay ``key``'s graph; [n, vocab] logits (a view of a
        static buffer, valid until the next step).  The LoRA mapping must already be set for the step.
        ``input_ids``: the ids on the device (async scheduling), copied on the device over ``inp``'s."""
        p, lora = key
        b = self.buffers
        b.prepare(inp.input_ids, inp.positions, inp.slot_mapping, inp.seq_lens, inp.block_tables, p)
        if input_ids is not None:
            b.views(p)[0][:input_ids.shape[0]].copy_(input_ids)
        graph = self._graphs[key]
        if self.emulate:
            pad = p - len(inp.seq_lens)
            self._forward(p, lora, [*inp.seq_lens, *[1] * pad])
        else:
            graph.replay()
        self.replays[key] += 1
        return self.logits[:len(inp.seq_lens)]


def _grown_workspaces(model: nn.Module) -> list[torch.Tensor]:
    """The MoE kernels' scratch buffers the graphs were captured with.  A kernel replaces its buffer by
    a bigger one when a prefill needs more; the graphs keep writing the old one, which must then stay
    allocated (not be handed to another tensor), so the runner holds these references."""
    bufs = []
    for m in model.modules():
        kernel = getattr(getattr(m, "quant_method", None), "kernel", None)
        bufs.extend(getattr(kernel, "_workspaces", {}).values())
    return bufs


def maybe_capture(model: nn.Module, *, device: torch.device, world_size: int, enforce_eager: bool,
                  block_size: int, max_model_len: int, max_num_seqs: int, lora_manager: Optional[Any],
                  sizes: Optional[Sequence[int]], log: Callable[..., None] = logger.info
                  ) -> Optional[DecodeGraphRunner]:
    """A captured ``DecodeGraphRunner`` when graphs apply here, else None (the reason is logged)."""
    if enforce_eager:
        log("CUDA graphs: off (enforce_eager)")
        return None
    reasons = graph_blockers(model, device, world_size)
    if reasons:
        (logger.debug if device.type != "cuda" else log)("CUDA graphs: off (%s); decode runs eagerly",
                                                         "; ".join(reasons))
        return None
    runner = DecodeGraphRunner(model, block_size=block_size, max_model_len=max_model_len,
                               max_num_seqs=max_num_seqs, device=device, lora_manager=lora_manager, sizes=sizes)
    try:
        runner.capture()
    except Exception as e:  # a capture bug must cost speed, not the server
        runner.release()
        logger.warning("CUDA graphs: capture failed (%r); decode runs eagerly. Please report this; "
                       "enforce_eager=True / --enforce-eager skips the attempt", e)
        return None
    return runner
