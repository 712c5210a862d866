"""MXFP4 experts (gpt-oss as released): weights stay 4.25 bits per value in memory.

Parameters (local experts, this TP rank's share of I):
    w13_blocks uint8 [E_local, 2I_part, H/32, 16]   w13_scales uint8 [E_local, 2I_part, H/32]
    w2_blocks  uint8 [E_local, H, I_part/32, 16]    w2_scales  uint8 [E_local, H, I_part/32]
    w13_bias [E_local, 2I_part], w2_bias [E_local, H]  (model dtype, when the layer has biases)
Rows of w13 keep the checkpoint's order (gate/up interleaved for gpt-oss).

``load_checkpoint_tensor(layer, suffix, tensor)`` takes the checkpoint's full tensors
(``gate_up_proj_blocks`` ... ``down_proj_bias``, FACTS.md 3) and keeps this rank's part:
TP slices the intermediate dimension (w13 rows, w2 scale groups, so I_part must be a
multiple of 32), EP keeps the local experts.  Every parameter also carries a
``weight_loader(param, tensor, *_)`` doing the same for its own suffix.

After loading, ``layer.w13_weight`` / ``layer.w2_weight`` are the block tensors (no
copy): the modular kernel hands them to the experts as w1 / w2, and the scales and
biases travel in the ``Mxfp4MoEQuantConfig``.
"""
from __future__ import annotations

from typing import Callable, Optional, TYPE_CHECKING

import torch

from vllm.model_executor.layers.fused_moe.experts.mxfp4_experts_base import (
    Mxfp4MoEQuantConfig,
    mxfp4_moe_quant_config,
)
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernel
from vllm.model_executor.layers.fused_moe.ops.mxfp4_dequant import MXFP4_BLOCK
from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import mxfp4_experts_class, select_mxfp4_moe_backend
from vllm.model_executor.layers.fused_moe.prepare_finalize import make_prepare_finalize

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE

# checkpoint suffix -> (parameter, which dimension TP slices: "rows" of w13, "groups" of w2's I, None)
CHECKPOINT_SUFFIXES: dict[str, tuple[str, str | None]] = {
    "gate_up_proj_blocks": ("w13_blocks", "rows"),
    "gate_up_proj_scales": ("w13_scales", "rows"),
    "gate_up_proj_bias": ("w13_bias", "rows"),
    "down_proj_blocks": ("w2_blocks", "groups"),
    "down_proj_scales": ("w2_scales", "groups"),
    "down_proj_bias": ("w2_bias", None),
}


class Mxfp4FusedMoEMethod(FusedMoEMethodBase):
    """Creates and loads MXFP4 expert weights; the oracle picks the experts that run them."""

    def create_weights(self, layer: "FusedMoE", params_dtype: torch.dtype, device: torch.device) -> None:
        cfg = self.moe_config
        E, H, I_part, N = cfg.local_num_experts, cfg.hidden_dim, cfg.intermediate_size_per_partition, cfg.w13_out_dim
        tp = cfg.parallel_config.tp_size
        if H % MXFP4_BLOCK:
            raise ValueError(f"MXFP4 experts need a hidden size divisible by {MXFP4_BLOCK}, got {H}")
        if I_part % MXFP4_BLOCK:
            raise ValueError(
                f"MXFP4 experts: intermediate size per tensor-parallel rank ({cfg.intermediate_size} / {tp} = "
                f"{cfg.intermediate_size / tp:g}) must be a multiple of {MXFP4_BLOCK}, because down_proj's blocks "
                f"hold {MXFP4_BLOCK} values along it; use a tensor-parallel size that divides "
                f"{cfg.intermediate_size // MXFP4_BLOCK} scale groups evenly, or expert parallelism")
        u8 = dict(dtype=torch.uint8, device=device)
        shapes = {"w13_blocks": (E, N, H // MXFP4_BLOCK, MXFP4_BLOCK // 2), "w13_scales": (E, N, H // MXFP4_BLOCK),
                  "w2_blocks": (E, H, I_part // MXFP4_BLOCK, MXFP4_BLOCK // 2),
                  "w2_scales": (E, H, I_part // MXFP4_BLOCK)}
        for name, shape in shapes.items():
            self._register(layer, name, torch.empty(shape, **u8))
        if cfg.has_bias:
            self._register(layer, "w13_bias", torch.zeros(E, N, dtype=params_dtype, device=device))
            self._register(layer, "w2_bias", torch.zeros(E, H, dtype=params_dtype, device=device))
        else:
            layer.w13_bias = None
            layer.w2_bias = None

    def _register(self, layer: "FusedMoE", name: str, data: torch.Tensor) -> None:
        param = torch.nn.Parameter(data, requires_grad=False)
        suffix = next(s for s, (p, _) in CHECKPOINT_SUFFIXES.items() if p == name)
        param.weight_loader = self._param_loader(layer, suffix)
        layer.register_parameter(name, param)

    def _param_loader(self, layer: "FusedMoE", suffix: str) -> Callable[..., None]:
        def weight_loader(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *_args, **_kwargs) -> None:
            self.load_checkpoint_tensor(layer, suffix, loaded_weight)

        return weight_loader

    # ---- loading ---------------------------------------------------------------
    def load_checkpoint_tensor(self, layer: "FusedMoE", suffix: str, tensor: torch.Tensor) -> None:
        """Load the checkpoint's full tensor ``mlp.experts.<suffix>`` (all experts, full I) into this rank's part.

        suffix: gate_up_proj_blocks [E, 2I, H/32, 16], gate_up_proj_scales [E, 2I, H/32],
        gate_up_proj_bias [E, 2I], down_proj_blocks [E, H, I/32, 16], down_proj_scales [E, H, I/32],
        down_proj_bias [E, H].
        """
        if suffix not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"unknown MXFP4 expert tensor {suffix!r}; expected one of {', '.join(CHECKPOINT_SUFFIXES)}")
        name, tp_dim = CHECKPOINT_SUFFIXES[suffix]
        param = getattr(layer, name, None)
        if param is None:
            raise ValueError(f"the checkpoint has {suffix}, but the layer {layer.prefix or '(unnamed)'} was built "
                             "without biases (has_bias=False)")
        cfg = self.moe_config
        pc = cfg.parallel_config
        E, I = cfg.num_experts, cfg.intermediate_size
        full = self._full_shape(suffix)
        if tuple(tensor.shape) != full:
            raise ValueError(f"MXFP4 expert tensor {suffix}: expected shape {full} (E={E}, H={cfg.hidden_dim}, "
                             f"I={I}), got {tuple(tensor.shape)}")
        is_code = not suffix.endswith("_bias")
        if is_code and tensor.dtype != torch.uint8:
            raise ValueError(f"MXFP4 expert tensor {suffix} must be uint8, got {tensor.dtype}")
        if not is_code and not tensor.is_floating_point():
            raise ValueError(f"expert bias {suffix} must be a float tensor, got {tensor.dtype}")
        if tp_dim == "rows":
            part = full[1] // pc.tp_size
            tensor = tensor[:, pc.tp_rank * part:(pc.tp_rank + 1) * part]  # interleaved pairs stay together
        elif tp_dim == "groups":
            part = full[2] // pc.tp_size
            tensor = tensor[:, :, pc.tp_rank * part:(pc.tp_rank + 1) * part]
        elif suffix == "down_proj_bias" and pc.tp_rank != 0:
            tensor = torch.zeros_like(tensor)  # the ranks' partial sums are all-reduced: add the bias once
        local = [(e, loc) for e in range(E) if (loc := layer._local_expert(e)) is not None]
        src = tensor[torch.tensor([e for e, _ in local], dtype=torch.long, device=tensor.device)]
        dst_ids = [loc for _, loc in local]
        if dst_ids == list(range(param.shape[0])):
            param.data.copy_(src)
        else:
            param.data[torch.tensor(dst_ids, dtype=torch.long, device=param.device)] = src.to(param.device,
                                                                                              param.dtype)

    def _full_shape(self, suffix: str) -> tuple[int, ...]:
        cfg = self.moe_config
        E, H, I = cfg.num_experts, cfg.hidden_dim, cfg.intermediate_size
        rows = 2 * I if cfg.activation.is_gated else I
        g, b = MXFP4_BLOCK, MXFP4_BLOCK // 2
        return {"gate_up_proj_blocks": (E, rows, H // g, b), "gate_up_proj_scales": (E, rows, H // g),
                "gate_up_proj_bias": (E, rows), "down_proj_blocks": (E, H, I // g, b),
                "down_proj_scales": (E, H, I // g), "down_proj_bias": (E, H)}[suffix]

    # ---- after loading -----------------------------------------------------------
    def process_weights_after_loading(self, layer: "FusedMoE") -> None:
        """The Triton and torch kernels read the checkpoint's block layout: w13_weight / w2_weight become
        (plain-tensor) names of the blocks, which the modular kernel passes as w1 / w2.  On CUDA the blocks are
        repacked for the tensor-core kernel instead where it takes them (``_repack_for_tensor_cores``)."""
        if not hasattr(layer, "w13_mma_words"):
            self._repack_for_tensor_cores(layer)
        layer.w13_weight = layer.w13_blocks.data
        layer.w2_weight = layer.w2_blocks.data

    def _repack_for_tensor_cores(self, layer: "FusedMoE") -> None:
        """With ``VLLM_MXFP4_MMA`` on a CUDA device where the CUDA C++ kernels build and take these weights: each
        projection's words and transposed scales for the tensor-core kernel (``{name}_mma_words`` /
        ``{name}_mma_scales``), and the blocks / scales dropped (shape-only views), so the weights stay one
        4.25-bit copy; UnfusedOAITritonExperts then runs every launch on that kernel or the dequant path."""
        from vllm import envs

        if not envs.VLLM_MXFP4_MMA or layer.w13_blocks.device.type != "cuda":
            return
        backend = select_mxfp4_moe_backend(self.moe_config, self.get_quant_config(layer), layer.w13_blocks.device)
        if mxfp4_experts_class(backend).__name__ != "UnfusedOAITritonExperts":  # the torch experts read the blocks
            return
        from vllm.model_executor.layers.fused_moe.ops.int4_mma_moe import shape_only
        from vllm.model_executor.layers.fused_moe.ops.mxfp4_mma_moe import mxfp4_mma_weights_for

        pair = mxfp4_mma_weights_for((layer.w13_blocks.data, layer.w13_scales.data),
                                     (layer.w2_blocks.data, layer.w2_scales.data), self.moe_config.in_dtype)
        if pair is None:  # the reason is logged
            return
        layer._mxfp4_mma_fold = tuple(mw.fold for mw in pair)
        for name, mw in zip(("w13", "w2"), pair):
            for suffix, t in (("mma_words", mw.words), ("mma_scales", mw.scales_t)):
                layer.register_parameter(f"{name}_{suffix}", torch.nn.Parameter(t, requires_grad=False))
            for suffix in ("blocks", "scales"):
                getattr(layer, f"{name}_{suffix}").data = shape_only(getattr(layer, f"{name}_{suffix}").data)

    def get_quant_config(self, layer: "FusedMoE") -> Mxfp4MoEQuantConfig:
        qc = mxfp4_moe_quant_config(layer.w13_scales.data, layer.w2_scales.data, layer.w13_bias, layer.w2_bias)
        if hasattr(layer, "w13_mma_words"):
            from vllm.model_executor.layers.fused_moe.ops.mxfp4_mma_moe import Mxfp4MmaWeight

            fold = getattr(layer, "_mxfp4_mma_fold", (False, False))  # set at the repack
            qc.w1_mma = Mxfp4MmaWeight(layer.w13_mma_words.data, layer.w13_mma_scales.data, fold[0])
            qc.w2_mma = Mxfp4MmaWeight(layer.w2_mma_words.data, layer.w2_mma_scales.data, fold[1])
        return qc

    def supports_lora(self) -> bool:
        return True

    def make_kernel(self, layer: "FusedMoE") -> FusedMoEKernel:
        quant_config = self.get_quant_config(layer)
        backend = select_mxfp4_moe_backend(self.moe_config, quant_config, layer.w13_blocks.device)
        layer.moe_backend = f"mxfp4-{backend.value}"
        experts = mxfp4_experts_class(backend)(self.moe_config, quant_config)
        return FusedMoEKernel(make_prepare_finalize(layer), experts)

    def apply(self, layer: "FusedMoE", x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              lora_context: Optional["MoELoRAContext"] = None) -> torch.Tensor:
        raise RuntimeError("call FusedMoE.process_weights_after_loading() before the first forward")
