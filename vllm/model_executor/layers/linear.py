"""Linear layers with tensor-parallel sharding and per-parameter weight loaders.

Every layer computes ``y = x @ W^T + b`` on its share of the weight and keeps
the attributes the LoRA wrappers rely on:

    input_size, output_size                     full (unsharded) sizes
    input_size_per_partition, output_size_per_partition
    tp_size, tp_rank, prefix
    weight [output_size_per_partition, input_size_per_partition], bias (Parameter or None)
    output_sizes / output_partition_sizes       Merged and QKV: [gate, up] or [q, k, v]

Sharding:
    ReplicatedLinear      every rank holds the whole weight
    ColumnParallelLinear  rank r holds output rows [r * out/tp, (r+1) * out/tp)
    MergedColumnParallel  several column-parallel outputs stacked ([gate | up]); each
                          one is sharded on its own, so rank r holds [gate_r | up_r]
    QKVParallelLinear     [q | k | v] by heads; when there are fewer KV heads than
                          ranks, each KV head is replicated on tp/num_kv_heads ranks
    RowParallelLinear     rank r holds input columns [r * in/tp, (r+1) * in/tp); the
                          partial products are summed with ``tp_group.all_reduce``

Each parameter carries ``weight_loader(param, loaded_weight, loaded_shard_id=None)``
which takes the full checkpoint tensor (or one stacked piece of it) and copies
this rank's slice.  Shard ids: Merged 0, 1, ...; QKV "q", "k", "v"; None = the
whole fused tensor.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from vllm.model_executor.layers.ops.dense_gemv import linear


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by tp_size ({d})")
    return n // d


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, where: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{where}: expected shape {tuple(dst.shape)}, got {tuple(src.shape)}")
    dst.copy_(src)


class LinearBase(nn.Module):
    """Allocates ``weight`` / ``bias`` for the partition sizes the subclass chose."""

    def __init__(self, input_size: int, output_size: int, input_size_per_partition: int,
                 output_size_per_partition: int, *, bias: bool = False, params_dtype: Optional[torch.dtype] = None,
                 device: torch.device | str | None = None, tp_size: int = 1, tp_rank: int = 0,
                 prefix: str = "") -> None:
        super().__init__()
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise ValueError(f"invalid tensor parallel rank {tp_rank} of size {tp_size}")
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = input_size_per_partition
        self.output_size_per_partition = output_size_per_partition
        self.tp_size = tp_size
        self.tp_rank = tp_rank
        self.prefix = prefix
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(output_size_per_partition, input_size_per_partition,
                                               dtype=dtype, device=device), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(self._bias_size(), dtype=dtype, device=device), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _bias_size(self) -> int:
        return self.output_size_per_partition

    def _name(self, param: nn.Parameter) -> str:
        kind = "bias" if param is self.bias else "weight"
        return f"{self.prefix or type(self).__name__}.{kind}"

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      loaded_shard_id: Optional[int | str] = None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.input_size_per_partition}, out={self.output_size_per_partition}, "
                f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_size}")


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank (routers, small gates)."""

    def __init__(self, input_size: int, output_size: int, **kw) -> None:
        super().__init__(input_size, output_size, input_size, output_size, **kw)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      loaded_shard_id: Optional[int | str] = None) -> None:
        if loaded_shard_id is not None:
            raise ValueError(f"{self._name(param)}: a replicated layer has no shards (got {loaded_shard_id!r})")
        _copy_checked(param.data, loaded_weight, self._name(param))


class ColumnParallelLinear(LinearBase):
    """Output rows split across ranks; the output stays sharded (no gather)."""

    def __init__(self, input_size: int, output_size: int, *, tp_size: int = 1, **kw) -> None:
        out_part = _divide(output_size, tp_size, f"output size of {kw.get('prefix') or 'linear'}")
        super().__init__(input_size, output_size, input_size, out_part, tp_size=tp_size, **kw)

    def _rows(self, loaded: torch.Tensor, part: int, index: int) -> torch.Tensor:
        """Rows ``[index * part, (index + 1) * part)`` of a weight or bias."""
        return loaded.narrow(0, index * part, part)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      loaded_shard_id: Optional[int | str] = None) -> None:
        if loaded_shard_id is not None:
            raise ValueError(f"{self._name(param)}: ColumnParallelLinear takes no shard id (got {loaded_shard_id!r})")
        part = self.output_size_per_partition
        if loaded_weight.shape[0] != self.output_size:
            raise ValueError(f"{self._name(param)}: expected {self.output_size} output rows, "
                             f"got shape {tuple(loaded_weight.shape)}")
        _copy_checked(param.data, self._rows(loaded_weight, part, self.tp_rank), self._name(param))


class _StackedColumnLinear(ColumnParallelLinear):
    """Column-parallel layer made of several outputs, each sharded on its own."""

    output_sizes: list[int]
    output_partition_sizes: list[int]
    # per stacked output: which block of its rows this rank holds
    _shard_index: list[int]

    def _shard_ids(self) -> list[int | str]:
        raise NotImplementedError

    def _position(self, loaded_shard_id: int | str) -> int:
        ids = self._shard_ids()
        if loaded_shard_id not in ids:
            raise ValueError(f"{self.prefix or type(self).__name__}: unknown shard id {loaded_shard_id!r}; "
                             f"expected one of {ids}")
        return ids.index(loaded_shard_id)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      loaded_shard_id: Optional[int | str] = None) -> None:
        if loaded_shard_id is None:  # the whole fused tensor: split it into its pieces
            if loaded_weight.shape[0] != sum(self.output_sizes):
                raise ValueError(f"{self._name(param)}: fused tensor must have {sum(self.output_sizes)} rows, "
                                 f"got shape {tuple(loaded_weight.shape)}")
            for shard_id, piece in zip(self._shard_ids(), loaded_weight.split(self.output_sizes, dim=0)):
                self.weight_loader(param, piece, shard_id)
            return
        i = self._position(loaded_shard_id)
        full, part = self.output_sizes[i], self.output_partition_sizes[i]
        where = f"{self._name(param)} shard {loaded_shard_id!r}"
        if loaded_weight.shape[0] != full:
            raise ValueError(f"{where}: expected {full} rows, got shape {tuple(loaded_weight.shape)}")
        offset = sum(self.output_partition_sizes[:i])
        _copy_checked(param.data.narrow(0, offset, part), self._rows(loaded_weight, part, self._shard_index[i]),
                      where)


class MergedColumnParallelLinear(_StackedColumnLinear):
    """Several column-parallel outputs with one input, e.g. ``gate_up_proj = [gate | up]``."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], *, tp_size: int = 1, tp_rank: int = 0,
                 **kw) -> None:
        self.output_sizes = list(output_sizes)
        self.output_partition_sizes = [_divide(s, tp_size, "merged output size") for s in self.output_sizes]
        self._shard_index = [tp_rank] * len(self.output_sizes)
        super().__init__(input_size, sum(self.output_sizes), tp_size=tp_size, tp_rank=tp_rank, **kw)

    def _shard_ids(self) -> list[int | str]:
        return list(range(len(self.output_sizes)))


class QKVParallelLinear(_StackedColumnLinear):
    """Fused q/k/v projection, sharded by attention heads.

    ``num_heads`` / ``num_kv_heads`` are per partition.  With fewer KV heads than
    ranks (tp_size a multiple of total_num_kv_heads), rank r holds KV head
    ``r // (tp_size // total_num_kv_heads)``.
    """

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int,
                 total_num_kv_heads: Optional[int] = None, *, tp_size: int = 1, tp_rank: int = 0, **kw) -> None:
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = _divide(total_num_heads, tp_size, "number of attention heads")
        if total_num_kv_heads >= tp_size:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, "number of KV heads")
            self.num_kv_head_replicas = 1
        else:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = _divide(tp_size, total_num_kv_heads, "tp_size over KV heads")
        kv_index = tp_rank // self.num_kv_head_replicas
        self.output_sizes = [total_num_heads * head_dim, total_num_kv_heads * head_dim,
                             total_num_kv_heads * head_dim]
        self.output_partition_sizes = [self.num_heads * head_dim, self.num_kv_heads * head_dim,
                                       self.num_kv_heads * head_dim]
        self._shard_index = [tp_rank, kv_index, kv_index]
        # Full output size counts replicated KV heads once per rank, as the weight does.
        super().__init__(hidden_size, sum(self.output_partition_sizes) * tp_size, tp_size=tp_size,
                         tp_rank=tp_rank, **kw)
        self.output_size = sum(self.output_sizes)

    def _shard_ids(self) -> list[int | str]:
        return ["q", "k", "v"]


class RowParallelLinear(LinearBase):
    """Input columns split across ranks; partial outputs summed over the TP group.

    The bias is added once, after the reduce (or on rank 0 only with
    ``reduce_results=False``, so that a later sum over ranks adds it once).
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, reduce_results: bool = True,
                 tp_group=None, tp_size: int = 1, **kw) -> None:
        in_part = _divide(input_size, tp_size, f"input size of {kw.get('prefix') or 'linear'}")
        super().__init__(input_size, output_size, in_part, output_size, bias=bias, tp_size=tp_size, **kw)
        if tp_size > 1 and reduce_results and tp_group is None:
            raise ValueError(f"{self.prefix or 'RowParallelLinear'}: tp_size {tp_size} with reduce_results "
                             "needs a tp_group (anything with all_reduce(tensor) -> tensor)")
        self.reduce_results = reduce_results
        self.tp_group = tp_group

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      loaded_shard_id: Optional[int | str] = None) -> None:
        if loaded_shard_id is not None:
            raise ValueError(f"{self._name(param)}: RowParallelLinear takes no shard id (got {loaded_shard_id!r})")
        if param is self.bias:
            _copy_checked(param.data, loaded_weight, self._name(param))
            return
        if loaded_weight.dim() != 2 or loaded_weight.shape[1] != self.input_size:
            raise ValueError(f"{self._name(param)}: expected {self.input_size} input columns, "
                             f"got shape {tuple(loaded_weight.shape)}")
        part = self.input_size_per_partition
        _copy_checked(param.data, loaded_weight.narrow(1, self.tp_rank * part, part), self._name(param))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return linear(x, self.weight, self.bias)
        y = linear(x, self.weight)
        if self.reduce_results:
            y = self.tp_group.all_reduce(y)
            return y if self.bias is None else y + self.bias
        if self.bias is not None and self.tp_rank == 0:
            y = y + self.bias
        return y
