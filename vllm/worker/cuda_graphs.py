"""CUDA-graph decode: one captured forward per padded batch size, replayed every decode step.

A decode step (one new token for every sequence) launches hundreds of small
kernels; replaying a captured graph costs one launch.  ``DecodeGraphRunner``,
owned by the ``ModelRunner``, keeps:

* ``DecodeBuffers`` (``decode_buffers.py``): static device buffers for everything a captured step reads
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
  layer of the wrapper's *LoRA layer set* - the layers some adapter activated into
  a slot has targeted, a set that only grows - launches its ops for all its slots;
  slots without weights have ``adapter_enabled`` 0 and contribute exactly zero;
  layers no adapter targets, e.g. the MoE router under an attention + experts
  adapter, launch nothing).  Adapters are copied into their slots in place, so the
  graphs stay valid across loads, unloads and swaps that keep the set and the layers'
  kernel ranks.
* The set's version: a "some adapter" graph holds the layers of the set it was
  captured with (``_layer_sets``).  Start-up capture happens before any adapter is
  loaded (version 0: the set is unknown, every LoRA layer launches), so the first
  LoRA steps never wait.  A replay whose set version differs from the current one
  (an adapter targeting a new layer was activated, or a layer's LoRA kernel rank - the
  rank of the adapters in its slots, rounded up - changed) first frees every stale "some
  adapter" graph, then re-captures that size's graph with the current set; other
  sizes are re-captured on their first use (logged at INFO once per version, with
  the time it took).  Swapping adapters with the same targets changes nothing.

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
LoRA forcing, layer-set versions and re-capture - but "replays" by running the
same forward eagerly over the static buffers, with the LoRA layer set the "graph"
was captured with (a stale graph misses a new layer's delta, as a real one would).
"""
from __future__ import annotations

import bisect
import gc
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import nn

from vllm.forward_context import set_forward_context
from vllm.logger import init_logger
from vllm.worker.decode_buffers import DecodeBuffers

if TYPE_CHECKING:
    from vllm.lora.punica_wrapper.punica_base import LoRALayerSet
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
        self.logits: Optional[torch.Tensor] = None  # [max_size, vocab] in the logits' dtype, written by every replay
        self._graphs: dict[tuple[int, bool], Any] = {}
        self._keep_alive: list[torch.Tensor] = []
        self.replays: dict[tuple[int, bool], int] = {}  # replays per key (tests and logs)
        self.capture_seconds = 0.0
        self.graph_memory_bytes = 0
        self._pool: Any = None  # the graphs' shared memory pool (CUDA)
        self._layer_sets: dict[tuple[int, bool], "LoRALayerSet"] = {}  # what each "some adapter" graph holds
        self._logged_version = -1  # the last layer-set version whose re-capture was logged
        self.recaptures = 0  # "some adapter" graphs captured again after the layer set changed
        self.failed: Optional[str] = None  # a re-capture failed: every step runs eagerly (graph_key None)

    # ---- host-side decisions ------------------------------------------------------
    @property
    def keys(self) -> list[tuple[int, bool]]:
        """(size, LoRA) keys to capture: with LoRA enabled, each size with and without adapters."""
        flags = (False, True) if self.lora_manager is not None else (False,)
        return [(p, lora) for p in self.sizes for lora in flags]

    def graph_key(self, inp: "ModelInput") -> Optional[tuple[int, bool]]:
        """The graph for this step, or None when it must run eagerly (not a pure decode step, prompt
        logprobs wanted, more sequences than the largest graph, or graphs given up after a failed capture)."""
        n = len(inp.query_lens)
        if self.failed is not None:
            return None
        if n == 0 or inp.prompt_rows or len(inp.input_ids) != n or any(q != 1 for q in inp.query_lens):
            return None
        p = padded_size(n, self.sizes)
        if p is None:
            return None
        lora = self.lora_manager is not None and any(inp.token_lora_ids or ())
        return (p, bool(lora))

    # ---- capture --------------------------------------------------------------------
    def _forward(self, p: int, lora: bool, seq_lens_cpu: Optional[list[int]] = None,
                 layer_set: Optional["LoRALayerSet"] = None) -> None:
        """The step a graph holds: model over the size-p buffers, logits of every row into ``self.logits``.
        ``lora``: with the LoRA ops of every layer of ``layer_set`` (default: the current LoRA layer set)."""
        ids, positions, _ = self.buffers.views(p)
        punica = self.lora_manager.punica_wrapper if self.lora_manager is not None else None
        if punica is not None:
            punica.run_all_lora_ops(lora, layer_set)
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
        self._pool = torch.cuda.graph_pool_handle() if cuda else None
        gc.collect()
        for p, lora in sorted(self.keys, reverse=True):
            self._set_dummy_inputs(p)
            self._capture_one(p, lora)
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

    def _capture_one(self, p: int, lora: bool) -> None:
        """Capture the graph of key (p, lora) over the inputs now in the buffers; with LoRA, with the current
        LoRA layer set (recorded with the graph)."""
        layer_set = self.lora_manager.punica_wrapper.lora_layer_set if lora else None
        self._forward(p, lora, layer_set=layer_set)  # compiles the Triton kernels of this shape outside the capture
        if self.emulate:
            graph: Any = (p, lora)
        else:
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._forward(p, lora, layer_set=layer_set)
        self._graphs[(p, lora)] = graph
        if layer_set is not None:
            self._layer_sets[(p, lora)] = layer_set

    @torch.inference_mode()
    def _refresh_lora_graph(self, p: int, current: "LoRALayerSet") -> None:
        """Make the "some adapter" graph of size p hold ``current``: free the stale ones, capture this one.
        The step's LoRA mapping stays as set (the capture reads it on the device only); the input buffers of
        size p get dummy inputs, overwritten by the step's afterwards."""
        start = time.perf_counter()
        for key in [k for k, ls in self._layer_sets.items() if ls.version != current.version]:
            del self._layer_sets[key]
            self._graphs.pop(key, None)
        self.buffers.fill_dummy(p)
        self._capture_one(p, True)
        if not self.emulate:  # older graphs keep the workspaces they were captured with
            held = {id(t) for t in self._keep_alive}
            self._keep_alive += [t for t in _grown_workspaces(self.model) if id(t) not in held]
        self.recaptures += 1
        took = time.perf_counter() - start
        members = "all" if current.members is None else len(current.members)
        if current.version != self._logged_version:
            self._logged_version = current.version
            logger.info("CUDA graphs: the LoRA layer set changed (version %d, %s of %d LoRA layers, or a layer's "
                        "kernel rank); the LoRA decode "
                        "graphs are captured again, each size on its first use (size %d took %.2f s)",
                        current.version, members, len(getattr(self.lora_manager, "modules", ())), p, took)
        else:
            logger.debug("CUDA graphs: LoRA decode graph of size %d captured again for layer-set version %d "
                         "in %.2f s", p, current.version, took)

    def release(self) -> None:
        """Drop every graph and buffer (after a failed capture): the engine then runs eagerly."""
        self._graphs.clear()
        self._layer_sets.clear()
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
        eager_set = None
        if lora:
            current = self.lora_manager.punica_wrapper.lora_layer_set
            held = self._layer_sets.get(key)
            if held is None or held.version != current.version:
                try:
                    self._refresh_lora_graph(p, current)
                except Exception as e:  # a capture bug must cost speed, not the step
                    self._fail(e)
                    eager_set = current
        b.prepare(inp.input_ids, inp.positions, inp.slot_mapping, inp.seq_lens, inp.block_tables, p)
        if input_ids is not None:
            b.views(p)[0][:input_ids.shape[0]].copy_(input_ids)
        if self.emulate or eager_set is not None:
            pad = p - len(inp.seq_lens)
            self._forward(p, lora, [*inp.seq_lens, *[1] * pad], eager_set or self._layer_sets.get(key))
        else:
            self._graphs[key].replay()
        self.replays[key] = self.replays.get(key, 0) + 1
        return self.logits[:len(inp.seq_lens)]

    def _fail(self, e: Exception) -> None:
        """A re-capture failed: drop every graph (the step's LoRA mapping stays), run eagerly from now on."""
        self.failed = repr(e)
        self._graphs.clear()
        self._layer_sets.clear()
        logger.warning("CUDA graphs: capturing a LoRA decode graph again failed (%r); decode runs eagerly from now "
                       "on. Please report this; enforce_eager=True / --enforce-eager skips graphs", e)
        if not self.emulate:
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # noqa: BLE001 - the capture error was just reported
                pass
            self._keep_alive = []
            torch.cuda.empty_cache()


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
