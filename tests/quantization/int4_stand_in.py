"""A stand-in for ``Int4MoEMethod`` (built elsewhere): the same constructor and ``load_int4``, float inside.

It records every ``load_int4`` call and loads the dequantised weight into ordinary float experts,
so the loading path (checkpoint -> Int4Weight -> the layer's quant method) is tested end to end
without the int4 kernel.  ``install_stand_in(monkeypatch)`` puts it where the configs import it.
"""
from __future__ import annotations

import sys
import types

import torch

from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.quantization.int4 import Int4Weight

MODULE = "vllm.model_executor.layers.fused_moe.int4_fused_moe_method"


class StandInInt4MoEMethod(UnquantizedFusedMoEMethod):
    instances: list["StandInInt4MoEMethod"] = []

    def __init__(self, moe_config, group_size: int, has_zeros: bool, act_order: bool) -> None:
        super().__init__(moe_config)
        self.args = (group_size, has_zeros, act_order)
        self.calls: list[tuple[str, int, Int4Weight]] = []
        StandInInt4MoEMethod.instances.append(self)

    def load_int4(self, layer, shard_id: str, expert_id: int, w: Int4Weight) -> None:
        assert isinstance(w, Int4Weight) and shard_id in ("w1", "w3", "w2")
        self.calls.append((shard_id, expert_id, w))
        param = layer.w2_weight if shard_id == "w2" else layer.w13_weight
        layer.weight_loader(param, w.dequantize(torch.float32).to(param.dtype), shard_id, expert_id)


def install_stand_in(monkeypatch) -> type[StandInInt4MoEMethod]:
    module = types.ModuleType(MODULE)
    module.Int4MoEMethod = StandInInt4MoEMethod
    monkeypatch.setitem(sys.modules, MODULE, module)
    StandInInt4MoEMethod.instances = []
    return StandInInt4MoEMethod
