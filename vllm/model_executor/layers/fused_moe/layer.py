"""The ``FusedMoE`` layer: expert weights, their loaders, and the forward entry.

Weights (local experts only, this TP rank's share of I):
    w13_weight [E_local, 2*I_part, H]  gate rows first, then up (gated);
               for gpt-oss (``swigluoai``) gate/up rows interleaved; [E_local, I_part, H] non-gated.
    w2_weight  [E_local, H, I_part]
    w13_bias   [E_local, 2*I_part], w2_bias [E_local, H]   (when ``has_bias``)

Loading: ``weight_loader(param, loaded, shard_id, expert_id)`` takes one expert's
tensor as saved per expert (shard_id "w1" gate [I, H], "w3" up [I, H], "w2"
down [H, I]); ``load_fused_experts`` takes the fused layouts of FACTS.md 3.
Both slice for TP (``tp_slice``, ``shard_w13``) and skip experts of other EP ranks.

Finalisation: ``process_weights_after_loading`` converts the weights and builds the
modular kernel, once, after loading (``get_model`` and ``load_checkpoint`` call it; a
layer built by hand calls it itself).  ``forward`` and LoRA wrapping need it done
(``is_finalized``); neither builds anything on its own.

Expert parallelism: ``ep_size`` ranks each hold ``E / ep_size`` whole experts
(``expert_map``: global id -> local id, -1 elsewhere); with an ``ep_group`` of
those ranks the kernel dispatches and combines over it (``prepare_finalize/``).
``ep_tokens_replicated``: every rank of the group holds the same tokens (the
tensor-parallel engine), so dispatch moves nothing and combine is one all-reduce.

Quantized experts: ``quant_config`` (the checkpoint's ``QuantizationConfig``) picks the
quant method, which creates the weights and their loaders; None = unquantized.

LoRA: ``FusedMoEWithLoRA`` sets the layer's ``MoELoRAContext`` (``set_lora_context``);
``forward`` passes it on as an argument.  What the wrapper reads of the layer is public:
``is_finalized``, ``experts``, ``tp_slice``, ``shard_w13``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEParallelConfig, MoEActivation
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEModularMethod
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExpertsModular
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 params_dtype: Optional[torch.dtype] = None, device: torch.device | str | None = None,
                 renormalize: bool = True, scoring_func: str = "softmax", topk_then_softmax: bool = False,
                 e_score_correction_bias: Optional[torch.Tensor] = None,
                 custom_routing_function: Optional[Callable] = None, activation: str | MoEActivation = "silu",
                 has_bias: bool = False, apply_router_weight_on_input: bool = False,
                 tp_size: int = 1, tp_rank: int = 0, ep_size: int = 1, ep_rank: int = 0, tp_group=None,
                 ep_group=None, ep_tokens_replicated: bool = True,
                 reduce_results: bool = True, shared_experts: Optional[nn.Module] = None,
                 moe_backend: Optional[str] = None, lora_enabled: bool = False, max_num_tokens: int = 8192,
                 quant_config: Optional["QuantizationConfig"] = None, prefix: str = "") -> None:
        super().__init__()
        params_dtype = params_dtype or torch.get_default_dtype()
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.moe_config = FusedMoEConfig(
            num_experts=num_experts, experts_per_token=top_k, hidden_dim=hidden_size,
            intermediate_size=intermediate_size, activation=MoEActivation.parse(activation), in_dtype=params_dtype,
            has_bias=has_bias, parallel_config=FusedMoEParallelConfig(tp_size, tp_rank, ep_size, ep_rank),
            max_num_tokens=max_num_tokens, moe_backend=moe_backend, lora_enabled=lora_enabled)
        if apply_router_weight_on_input and top_k != 1:
            raise ValueError("apply_router_weight_on_input needs top_k == 1")
        if ep_group is not None:
            if tp_size > 1:
                raise ValueError(f"expert parallelism with tensor-parallel experts (tp_size={tp_size}, "
                                 f"ep_size={ep_size}) is not supported: under EP every rank holds whole experts, "
                                 "so build the layer with tp_size=1")
            if (ep_group.world_size, ep_group.rank) != (ep_size, ep_rank):
                raise ValueError(f"ep_group is rank {ep_group.rank} of {ep_group.world_size}, but the layer was "
                                 f"built as ep_rank={ep_rank} of ep_size={ep_size}")
        self.prefix = prefix
        self.global_num_experts = num_experts
        self.local_num_experts = self.moe_config.local_num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size_per_partition = self.moe_config.intermediate_size_per_partition
        self.renormalize = renormalize
        self.scoring_func = scoring_func
        self.topk_then_softmax = topk_then_softmax
        self.e_score_correction_bias = e_score_correction_bias
        self.custom_routing_function = custom_routing_function
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self.tp_group = tp_group
        self.ep_group = ep_group
        self.ep_tokens_replicated = ep_tokens_replicated
        self.reduce_results = reduce_results
        self.shared_experts = shared_experts
        self.activation = self.moe_config.activation
        self.moe_backend = None  # set when the kernel is built
        self.expert_map: Optional[torch.Tensor] = None
        if ep_size > 1:
            E_local = self.local_num_experts
            emap = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
            emap[ep_rank * E_local:(ep_rank + 1) * E_local] = torch.arange(E_local, dtype=torch.int32, device=device)
            self.expert_map = emap
        method = quant_config.get_moe_method(self.moe_config, prefix) if quant_config is not None else None
        self.quant_method = method if method is not None else UnquantizedFusedMoEMethod(self.moe_config)
        self.quant_method.create_weights(self, params_dtype, device)
        for p in self.parameters(recurse=False):
            if not hasattr(p, "weight_loader"):  # a quant method may give its parameters their own loader
                p.weight_loader = self.weight_loader
        self.runner = MoERunner(self)
        self._lora_context: Optional["MoELoRAContext"] = None

    # ---- loading ---------------------------------------------------------------
    def _local_expert(self, expert_id: int) -> Optional[int]:
        if not 0 <= expert_id < self.global_num_experts:
            raise ValueError(f"expert id {expert_id} out of range [0, {self.global_num_experts})")
        if self.expert_map is None:
            return expert_id
        local = int(self.expert_map[expert_id])
        return None if local < 0 else local

    def tp_slice(self, full: int) -> slice:
        """This TP rank's part of a dimension of size ``full`` that TP splits evenly (the
        intermediate size I, w2's columns, each half of w13's rows)."""
        pc = self.moe_config.parallel_config
        part = full // pc.tp_size
        return slice(pc.tp_rank * part, (pc.tp_rank + 1) * part)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str, expert_id: int) -> None:
        """Load one expert's tensor as saved per expert.

        shard_id: "w1" gate (or the only w13 projection when not gated), "w3" up,
        "w2" down.  Weights: w1/w3 [I, H], w2 [H, I]; biases: w1/w3 [I], w2 [H].
        """
        local = self._local_expert(expert_id)
        if local is None:
            return  # another EP rank's expert
        I_part = self.intermediate_size_per_partition
        gated = self.activation.is_gated
        if self.activation is MoEActivation.SWIGLUOAI:
            raise ValueError("gpt-oss experts are stored fused; load them with load_fused_experts")
        is_w13 = param is self.w13_weight or param is getattr(self, "w13_bias", None)
        if shard_id in ("w1", "w3"):
            if not is_w13:
                raise ValueError(f"shard {shard_id} belongs to w13, not this parameter")
            if shard_id == "w3" and not gated:
                raise ValueError("non-gated experts have no up projection (w3)")
            src = loaded_weight[self.tp_slice(loaded_weight.shape[0])]
            offset = I_part if shard_id == "w3" else 0
            dst = param.data[local, offset:offset + I_part]
        elif shard_id == "w2":
            if is_w13:
                raise ValueError("shard w2 belongs to w2, not w13")
            if loaded_weight.dim() == 1:  # the bias: added once, on TP rank 0 (partial sums are all-reduced)
                keep = self.moe_config.parallel_config.tp_rank == 0
                src = loaded_weight if keep else torch.zeros_like(loaded_weight)
            else:
                src = loaded_weight[:, self.tp_slice(loaded_weight.shape[1])]
            dst = param.data[local]
        else:
            raise ValueError(f"unknown shard_id {shard_id!r}; expected 'w1', 'w3' or 'w2'")
        if src.shape != dst.shape:
            raise ValueError(f"expert {expert_id} shard {shard_id}: expected shape {tuple(dst.shape)} "
                             f"after TP slicing, got {tuple(src.shape)} (from {tuple(loaded_weight.shape)})")
        dst.copy_(src)

    def load_fused_experts(self, *, gate_up: torch.Tensor, down: torch.Tensor,
                           gate_up_bias: Optional[torch.Tensor] = None, down_bias: Optional[torch.Tensor] = None,
                           transposed: bool = False) -> None:
        """Load all experts from fused tensors.

        transposed=False (transformers in-memory layout): gate_up [E, w13_rows, H], down [E, H, I].
        transposed=True (gpt-oss checkpoint): gate_up [E, H, 2I] (interleaved), down [E, I, H].
        Rows of gate_up are gate then up, or interleaved for ``swigluoai``.
        """
        w13 = getattr(self, "w13_weight", None)
        if not isinstance(w13, torch.Tensor) or not w13.is_floating_point():
            raise ValueError(f"the experts of {self.prefix or 'this layer'} are stored quantized "
                             f"({type(self.quant_method).__name__}): float expert weights cannot be loaded "
                             "into them; load the checkpoint's quantized tensors through the quant method")
        if transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        E = self.global_num_experts
        if gate_up.shape[0] != E or down.shape[0] != E:
            raise ValueError(f"fused experts must have {E} experts, got {gate_up.shape[0]} and {down.shape[0]}")
        for e in range(E):
            local = self._local_expert(e)
            if local is None:
                continue
            self.w13_weight.data[local].copy_(self.shard_w13(gate_up[e]))
            self.w2_weight.data[local].copy_(down[e][:, self.tp_slice(down.shape[2])])
            if gate_up_bias is not None:
                self.w13_bias.data[local].copy_(self.shard_w13(gate_up_bias[e]))
            if down_bias is not None:
                # every TP rank's partial sums are all-reduced: the bias is added on rank 0 only
                keep = self.moe_config.parallel_config.tp_rank == 0
                self.w2_bias.data[local].copy_(down_bias[e] if keep else torch.zeros_like(down_bias[e]))

    def shard_w13(self, rows: torch.Tensor) -> torch.Tensor:
        """This TP rank's rows of one expert's full w13 rows (dim 0: gate then up halves, or
        gpt-oss's interleaved pairs, or the one projection of non-gated experts), in the order
        ``w13_weight`` holds them."""
        n = rows.shape[0]
        if not self.activation.is_gated or self.activation is MoEActivation.SWIGLUOAI:
            return rows[self.tp_slice(n)]  # interleaved pairs stay contiguous per rank
        half = n // 2
        return torch.cat([rows[:half][self.tp_slice(half)], rows[half:][self.tp_slice(half)]], dim=0)

    # ---- finalisation ----------------------------------------------------------------
    @property
    def is_finalized(self) -> bool:
        """Whether ``process_weights_after_loading`` has run: weights converted, kernel built."""
        return isinstance(self.quant_method, FusedMoEModularMethod)

    def process_weights_after_loading(self) -> None:
        """Convert the loaded weights once and build the modular kernel (backend chosen here).

        Call it once every weight is loaded, before the first forward and before LoRA
        wrapping; calling it again does nothing.
        """
        if self.is_finalized:
            return
        self.quant_method.process_weights_after_loading(self)
        kernel = self.quant_method.make_kernel(self)
        self.quant_method = FusedMoEModularMethod(self.quant_method, kernel)

    def _require_finalized(self, what: str) -> None:
        if not self.is_finalized:
            raise RuntimeError(
                f"FusedMoE layer {self.prefix or '<unnamed>'}: {what} needs the layer finalised; call its "
                "process_weights_after_loading() once its weights are loaded (get_model and load_checkpoint do)")

    @property
    def experts(self) -> "FusedMoEExpertsModular":
        """The experts implementation of the built kernel (its class is the backend)."""
        self._require_finalized("experts")
        return self.quant_method.kernel.fused_experts

    # ---- LoRA ----------------------------------------------------------------------------
    @property
    def lora_context(self) -> Optional["MoELoRAContext"]:
        """The LoRA state ``forward`` passes down; None = no LoRA."""
        return self._lora_context

    def set_lora_context(self, ctx: Optional["MoELoRAContext"]) -> None:
        """Set (``FusedMoEWithLoRA.set_mapping``) or clear (None) the LoRA state of every later forward."""
        self._lora_context = ctx

    # ---- forward ---------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        self._require_finalized("forward")
        return self.runner.forward(hidden_states, router_logits, lora_context=self._lora_context)
