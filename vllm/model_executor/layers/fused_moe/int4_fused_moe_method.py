"""Int4 (W4A16) experts: load decoded ``Int4Weight``s, repack once, run MarlinExperts or torch.

The checkpoint formats (GPTQ, AWQ, compressed-tensors) decode each expert's projection into an
``Int4Weight`` and hand it to ``load_int4``.  While loading, the layer holds the codes unpacked
(uint8, one per weight) with their scales, zeros and ``g_idx``; ``process_weights_after_loading``
repacks them once into ``Int4PackedWeight`` (int32 words along the input dimension, 4 bits a
weight, act-order sorted by group) and frees the rest, so the weights stay 4-bit on the device.

Layer attributes after loading (E = local experts, N = w13 rows, H hidden, I = I_part):
    w13_weight int32 [E, H/8, N], w13_scales [E, G13, N], w13_qzeros uint8 [E, G13, N] (asymmetric),
    w13_perm / w13_g_idx int32 [E, H] (act-order only); the same for w2 with K = I_part.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, MoEActivation
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.int4_weights import Int4MoEQuantConfig, Int4PackedWeight, pack_int4_k
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernel
from vllm.model_executor.layers.fused_moe.prepare_finalize import make_prepare_finalize
from vllm.model_executor.layers.quantization.int4 import Int4Weight

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE

_SHARDS = ("w1", "w3", "w2")


def _refuse_loader(param: nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs) -> None:
    raise ValueError("int4 expert weights load through Int4MoEMethod.load_int4 (the checkpoint's quantization "
                     "config decodes qweight / scales / zeros into an Int4Weight first), not as float tensors")


def _param(layer: "FusedMoE", name: str, t: torch.Tensor) -> None:
    if hasattr(layer, name):
        delattr(layer, name)
    p = nn.Parameter(t, requires_grad=False)
    p.weight_loader = _refuse_loader
    layer.register_parameter(name, p)


class Int4MoEMethod(FusedMoEMethodBase):
    """Group-quantized int4 expert weights (``group_size`` input channels per scale; -1: one group
    spans a projection's whole input, i.e. per-channel scales), with zero points (``has_zeros``) or
    symmetric (zero 8), optionally act-order (permuted ``g_idx``)."""

    def __init__(self, moe_config: FusedMoEConfig, group_size: int, has_zeros: bool, act_order: bool) -> None:
        super().__init__(moe_config)
        if group_size <= 0 and group_size != -1:
            raise ValueError(f"int4 experts need a positive group size, or -1 (one group per row), got {group_size}")
        self.group_size = group_size
        self.has_zeros = has_zeros
        self.act_order = act_order

    # ---- weights while loading ----------------------------------------------------------
    def create_weights(self, layer: "FusedMoE", params_dtype: torch.dtype, device: torch.device) -> None:
        cfg = self.moe_config
        if cfg.has_bias:
            raise ValueError("int4 experts with biases are not supported (no int4 checkpoint format stores them)")
        if cfg.activation is MoEActivation.SWIGLUOAI:
            raise ValueError("int4 experts do not support gpt-oss's interleaved swigluoai experts (gpt-oss ships "
                             "MXFP4 weights)")
        E, H, I_full = cfg.local_num_experts, cfg.hidden_dim, cfg.intermediate_size
        I_part, N = cfg.intermediate_size_per_partition, cfg.w13_out_dim
        gs13, gs2 = self._full_group_sizes()
        for what, k, gs in (("hidden size", H, gs13), ("intermediate size", I_full, gs2)):
            if k % gs:
                raise ValueError(f"group size {gs} does not divide the experts' {what} {k}")
            if k % 8:
                raise ValueError(f"the experts' {what} {k} is not a multiple of 8, which packed int4 weights need")
        if I_part % 8:
            raise ValueError(f"the intermediate size per TP rank {I_part} is not a multiple of 8; use fewer ranks")
        # w2's input columns are split over TP ranks: whole groups per rank, or every rank inside one group
        # (per-channel scales); with act-order every group stays (a rank's columns may touch any of them)
        if self.act_order:
            G2, local_gs2 = I_full // gs2, gs2
        elif I_part % gs2 == 0:
            G2, local_gs2 = I_part // gs2, gs2
        elif gs2 % I_part == 0:
            G2, local_gs2 = 1, I_part
        else:
            raise ValueError(f"tensor parallelism splits the intermediate size {I_full} into {I_part} columns per "
                             f"rank, which is not a multiple of the group size {gs2}: w2's groups would be split "
                             "across ranks; use fewer ranks")
        kw = dict(device=device)
        _param(layer, "w13_weight", torch.zeros(E, N, H, dtype=torch.uint8, **kw))
        _param(layer, "w13_scales", torch.zeros(E, N, H // gs13, dtype=params_dtype, **kw))
        _param(layer, "w2_weight", torch.zeros(E, H, I_part, dtype=torch.uint8, **kw))
        _param(layer, "w2_scales", torch.zeros(E, H, G2, dtype=params_dtype, **kw))
        if self.has_zeros:
            _param(layer, "w13_qzeros", torch.zeros(E, N, H // gs13, dtype=torch.uint8, **kw))
            _param(layer, "w2_qzeros", torch.zeros(E, H, G2, dtype=torch.uint8, **kw))
        if self.act_order:
            _param(layer, "w13_g_idx", torch.zeros(E, H, dtype=torch.int32, **kw))
            _param(layer, "w2_g_idx", torch.zeros(E, I_part, dtype=torch.int32, **kw))
        layer.w13_bias = None
        layer.w2_bias = None
        layer._int4_loaded = set()
        layer._int4_group_size = {"w13": gs13, "w2": local_gs2}  # after TP slicing

    def _full_group_sizes(self) -> tuple[int, int]:
        """Group sizes of the unsliced w13 (input H) and w2 (input I) projections."""
        cfg = self.moe_config
        if self.group_size == -1:
            return cfg.hidden_dim, cfg.intermediate_size
        return self.group_size, self.group_size

    def _check(self, shard_id: str, expert_id: int, w: Int4Weight, shape: tuple[int, int], gs: int) -> torch.Tensor:
        """The weight's g_idx ([in] int64), after checking it matches this layer's scheme."""
        where = f"expert {expert_id} shard {shard_id}"
        if tuple(w.shape) != shape:
            raise ValueError(f"{where}: expected an unsliced [out, in] = {list(shape)} int4 weight, got "
                             f"{list(w.shape)}")
        if w.group_size != gs:
            raise ValueError(f"{where}: group size {w.group_size}, but the layer was built for {gs}")
        if (w.zeros is not None) != self.has_zeros:
            raise ValueError(f"{where}: the weight {'has' if w.zeros is not None else 'lacks'} zero points, but the "
                             f"layer was built {'with' if self.has_zeros else 'without'} them")
        g = w.group_index()
        if not self.act_order and w.g_idx is not None:
            plain = torch.arange(shape[1], device=g.device) // gs
            if not torch.equal(g, plain):
                raise ValueError(f"{where}: g_idx is permuted (act-order), but the layer was built with "
                                 "act_order=False")
        return g

    def load_int4(self, layer: "FusedMoE", shard_id: str, expert_id: int, w: Int4Weight) -> None:
        """Load one expert's full (unsliced) projection: "w1" gate / "w3" up [I, H], "w2" down [H, I].

        Slices this TP rank's part of the intermediate dimension and skips other EP ranks' experts.
        """
        if shard_id not in _SHARDS:
            raise ValueError(f"unknown shard_id {shard_id!r}; expected 'w1', 'w3' or 'w2'")
        cfg = self.moe_config
        if shard_id == "w3" and not cfg.activation.is_gated:
            raise ValueError("non-gated experts have no up projection (w3)")
        local = layer._local_expert(expert_id)
        if local is None:
            return  # another EP rank's expert
        if not hasattr(layer, "_int4_loaded") or layer.w13_weight.dtype != torch.uint8:
            raise RuntimeError("load_int4 after process_weights_after_loading: the weights are already packed")
        H, I_full, I_part = cfg.hidden_dim, cfg.intermediate_size, cfg.intermediate_size_per_partition
        gs13, gs2 = self._full_group_sizes()
        cols = layer.tp_slice(I_full)
        dev = layer.w13_weight.device
        if shard_id in ("w1", "w3"):
            g = self._check(shard_id, expert_id, w, (I_full, H), gs13)
            rows = slice(I_part if shard_id == "w3" else 0, (2 if shard_id == "w3" else 1) * I_part)
            layer.w13_weight.data[local, rows].copy_(w.q[cols])
            layer.w13_scales.data[local, rows].copy_(w.scales[cols])
            if self.has_zeros:
                layer.w13_qzeros.data[local, rows].copy_(w.zeros[cols])
            if self.act_order:
                other = "w3" if shard_id == "w1" else "w1"
                g32 = g.to(device=dev, dtype=torch.int32)
                if (local, other) in layer._int4_loaded and not torch.equal(layer.w13_g_idx.data[local], g32):
                    raise ValueError(f"expert {expert_id}: gate (w1) and up (w3) have different g_idx; they share one "
                                     "activation order in the fused w13 GEMM, so they must be quantized with the "
                                     "same act-order permutation")
                layer.w13_g_idx.data[local].copy_(g32)
        else:
            g = self._check(shard_id, expert_id, w, (H, I_full), gs2)
            layer.w2_weight.data[local].copy_(w.q[:, cols])
            if self.act_order:  # every group stays (the rank's columns may touch any); g_idx follows the columns
                groups = slice(None)
                layer.w2_g_idx.data[local].copy_(g[cols].to(torch.int32))
            else:
                groups = slice(cols.start // gs2, (cols.stop - 1) // gs2 + 1)  # whole groups, or the one around
            layer.w2_scales.data[local].copy_(w.scales[:, groups])
            if self.has_zeros:
                layer.w2_qzeros.data[local].copy_(w.zeros[:, groups])
        layer._int4_loaded.add((local, shard_id))

    # ---- repack --------------------------------------------------------------------------
    @staticmethod
    def _pack(q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], g_idx: Optional[torch.Tensor],
              group_size: int) -> tuple[torch.Tensor, ...]:
        """Unpacked [E, N, K] codes (+ [E, N, G] scales / zeros, [E, K] g_idx) -> packed tensors."""
        E, N, K = q.shape
        perm = None
        if g_idx is not None:
            order = torch.sort(g_idx.long(), dim=1, stable=True).indices  # group by group, channels in order
            q = torch.gather(q, 2, order[:, None, :].expand(E, N, K))
            g_idx = torch.gather(g_idx, 1, order)
            if not torch.equal(order, torch.arange(K, device=q.device).expand(E, K)):
                perm = order.to(torch.int32).contiguous()
            if torch.equal(g_idx.long(), (torch.arange(K, device=q.device) // group_size).expand(E, K)):
                g_idx = None  # sorted act-order = the plain layout
            else:
                g_idx = g_idx.to(torch.int32).contiguous()
        packed = pack_int4_k(q).transpose(1, 2).contiguous()  # [E, K/8, N]
        scales = scales.transpose(1, 2).contiguous()
        zeros = zeros.transpose(1, 2).contiguous() if zeros is not None else None
        return packed, scales, zeros, g_idx, perm

    def process_weights_after_loading(self, layer: "FusedMoE") -> None:
        if not hasattr(layer, "_int4_loaded"):
            return  # already packed
        shards = _SHARDS if self.moe_config.activation.is_gated else ("w1", "w2")
        missing = [(e, s) for e in range(self.moe_config.local_num_experts) for s in shards
                   if (e, s) not in layer._int4_loaded]
        if missing:
            shown = ", ".join(f"local expert {e} {s}" for e, s in missing[:6])
            raise ValueError(f"int4 MoE layer {layer.prefix or '<unnamed>'}: {len(missing)} expert projections were "
                             f"never loaded ({shown}{', ...' if len(missing) > 6 else ''}); the checkpoint is "
                             "incomplete")
        for name in ("w13", "w2"):
            zeros = getattr(layer, f"{name}_qzeros").data if self.has_zeros else None
            g_idx = getattr(layer, f"{name}_g_idx").data if self.act_order else None
            packed, scales, zeros, g_idx, perm = self._pack(getattr(layer, f"{name}_weight").data,
                                                            getattr(layer, f"{name}_scales").data, zeros, g_idx,
                                                            layer._int4_group_size[name])
            for suffix, t in (("weight", packed), ("scales", scales), ("qzeros", zeros), ("g_idx", g_idx),
                              ("perm", perm)):
                if t is not None:
                    _param(layer, f"{name}_{suffix}", t)
                elif hasattr(layer, f"{name}_{suffix}"):
                    delattr(layer, f"{name}_{suffix}")
        del layer._int4_loaded
        self._repack_for_tensor_cores(layer)

    def _repack_for_tensor_cores(self, layer: "FusedMoE") -> None:
        """With ``VLLM_INT4_MMA`` on a CUDA device where the CUDA C++ kernels build and take these weights:
        each projection's words repacked for the tensor-core kernel (``{name}_mma_words``) and the Triton
        layout's words dropped (``{name}_weight`` becomes a shape-only view), so the weights stay one 4-bit
        copy; MarlinExperts then runs every launch on that kernel, or the dequant path from those words."""
        from vllm import envs

        if not envs.VLLM_INT4_MMA or layer.w13_weight.device.type != "cuda":
            return
        from vllm.model_executor.layers.fused_moe.ops.int4_mma_moe import mma_weights_for, shape_only

        pair = mma_weights_for(self._packed(layer, "w13"), self._packed(layer, "w2"), self.moe_config.in_dtype)
        if pair is None:  # the reason is logged
            return
        for name, mw in zip(("w13", "w2"), pair):
            _param(layer, f"{name}_mma_words", mw.words)
            _param(layer, f"{name}_weight", shape_only(getattr(layer, f"{name}_weight").data))

    # ---- kernel ----------------------------------------------------------------------------
    def _packed(self, layer: "FusedMoE", name: str) -> Int4PackedWeight:
        t = lambda suffix: getattr(layer, f"{name}_{suffix}", None)  # noqa: E731
        return Int4PackedWeight(qweight=t("weight").data, scales=t("scales").data,
                                zeros=t("qzeros").data if t("qzeros") is not None else None,
                                group_size=layer._int4_group_size[name],
                                g_idx=t("g_idx").data if t("g_idx") is not None else None,
                                perm=t("perm").data if t("perm") is not None else None)

    def get_quant_config(self, layer: "FusedMoE") -> Int4MoEQuantConfig:
        if hasattr(layer, "_int4_loaded"):
            raise RuntimeError("the int4 weights are not packed yet: call layer.process_weights_after_loading()")
        w13, w2 = self._packed(layer, "w13"), self._packed(layer, "w2")
        if not hasattr(layer, "w13_mma_words"):
            return Int4MoEQuantConfig(w13=w13, w2=w2)
        from vllm.model_executor.layers.fused_moe.ops.int4_mma_moe import Int4MmaWeight

        return Int4MoEQuantConfig(w13=w13, w2=w2, w13_mma=Int4MmaWeight(layer.w13_mma_words.data, w13),
                                  w2_mma=Int4MmaWeight(layer.w2_mma_words.data, w2))

    def make_kernel(self, layer: "FusedMoE") -> FusedMoEKernel:
        from vllm.model_executor.layers.fused_moe.oracle.int4 import int4_experts_class, select_int4_moe_backend

        quant_config = self.get_quant_config(layer)
        backend = select_int4_moe_backend(self.moe_config, quant_config, layer.w13_weight.device)
        layer.moe_backend = backend
        experts = int4_experts_class(backend)(self.moe_config, quant_config)
        return FusedMoEKernel(make_prepare_finalize(layer), experts)

    def supports_lora(self) -> bool:
        return True

    def apply(self, layer: "FusedMoE", x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              lora_context: Optional["MoELoRAContext"] = None) -> torch.Tensor:
        raise RuntimeError("call FusedMoE.process_weights_after_loading() before the first forward")
