"""Typed tile configs of the Triton kernels, and their JSON form in tuned files.

A tile config is a small frozen dataclass with lower-case fields; its JSON form
(the entries of the tuned files, see ``vllm.kernel_configs``) keeps Triton's
upper-case names, e.g. ``{"BLOCK_SIZE_M": 16, ..., "num_warps": 4}``.  The two
forms meet only in ``from_json`` / ``to_json``:

    cfg = TileConfig(block_size_m=16, block_size_n=64, block_size_k=128)
    cfg.to_json()                                   # {"BLOCK_SIZE_M": 16, ..., "num_stages": 3}
    TileConfig.from_json({"BLOCK_SIZE_N": 32}, base=cfg)   # cfg with block_size_n=32
    tuned_tiles(cfg, "fused_moe_gemm", {"E": 8, "N": 96, "K": 64}, 16, "NVIDIA H200")

An unknown key, a non-integer value or a value below 1 (below 0 for the mode
switches in ``ZERO_OK``; true / false for the ``FLAGS``) is a ``ValueError`` that
names where the entry came from (the tuned file), never silently dropped.  Kernel
specific rules (powers of two, what a kernel cannot do) are checked by the kernel's
launcher.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional, TypeVar

T = TypeVar("T", bound="JsonTiles")


@dataclass(frozen=True)
class JsonTiles:
    """Base of the tile configs: every field a positive int, each with its JSON key in ``JSON_KEYS``."""

    #: JSON key -> field name, in the order ``to_json`` writes them
    JSON_KEYS: ClassVar[Mapping[str, str]] = {}
    #: fields that may also be 0 (mode switches such as ``unpack``; their ranges are the launcher's to check)
    ZERO_OK: ClassVar[frozenset[str]] = frozenset()
    #: bool fields (JSON true / false), e.g. a path switch
    FLAGS: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        for name, v in self.__dict__.items():  # the fields (no ClassVars in an instance's __dict__)
            if name in self.FLAGS:
                if type(v) is not bool:
                    raise ValueError(f"{type(self).__name__}.{name} must be a bool, got {v!r}")
                continue
            lowest = 0 if name in self.ZERO_OK else 1
            if type(v) is not int or v < lowest:  # bool is an int subclass: rejected too
                kind = "a non-negative" if lowest == 0 else "a positive"
                raise ValueError(f"{type(self).__name__}.{name} must be {kind} int, got {v!r}")

    @classmethod
    def from_json(cls: type[T], entry: Mapping[str, Any], *, source: str = "tile config",
                  base: Optional[T] = None) -> T:
        """The config an entry of a tuned file describes; keys it lacks come from ``base``
        (or the field defaults without one).  ``source`` (e.g. the file) starts every error message."""
        if not isinstance(entry, Mapping):
            raise ValueError(f"{source}: a tile config must be a JSON object, got {type(entry).__name__}")
        unknown = sorted(k for k in entry if k not in cls.JSON_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown} in a {cls.__name__}; "
                             f"known keys: {list(cls.JSON_KEYS)}")
        values = {}
        for key, v in entry.items():
            name = cls.JSON_KEYS[key]
            if name in cls.FLAGS and type(v) is not bool:
                raise ValueError(f"{source}: {key}={v!r} must be true or false")
            if name not in cls.FLAGS and type(v) is not int:
                raise ValueError(f"{source}: {key}={v!r} must be an integer")
            values[name] = v
        try:
            return dataclasses.replace(base, **values) if base is not None else cls(**values)
        except (TypeError, ValueError) as exc:  # a required key missing, or a value below 1
            raise ValueError(f"{source}: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """The JSON form (every key), as a tuned file stores it."""
        return {key: getattr(self, name) for key, name in self.JSON_KEYS.items()}


@dataclass(frozen=True)
class TileConfig(JsonTiles):
    """Tiles of a grouped expert GEMM (``fused_moe_gemm``; the 4-bit GEMMs' configs below extend it).

    block_size_m is also the block size of the expert alignment the GEMM reads.
    group_size_m: M-blocks that sweep the N tiles together (L2 reuse of a weight slice).
    split_k: programs sharing one tile's K range (1 = no split; only kernels that reduce splits take > 1).
    gemv: 1 = the bf16 GEMM runs the FMA GEMV (``ops/_fused_moe_gemv_kernel.py``) on pairwise launches (one
    pair per alignment block): block_size_n, block_size_k (any powers of two), split_k (1-16) and num_warps
    apply; block_size_m is still the alignment's block size; group_size_m and num_stages do not apply;
    launches on sorted routing run the tl.dot kernel at the config's tiles.  0 = the tl.dot kernel.
    The 4-bit GEMMs' configs give ``gemv`` meanings of their own (read their docstrings).
    """

    block_size_m: int
    block_size_n: int
    block_size_k: int
    group_size_m: int = 1
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    gemv: int = 0

    JSON_KEYS: ClassVar[Mapping[str, str]] = {
        "BLOCK_SIZE_M": "block_size_m", "BLOCK_SIZE_N": "block_size_n", "BLOCK_SIZE_K": "block_size_k",
        "GROUP_SIZE_M": "group_size_m", "SPLIT_K": "split_k", "num_warps": "num_warps", "num_stages": "num_stages",
        "GEMV": "gemv",
    }
    ZERO_OK: ClassVar[frozenset[str]] = frozenset({"gemv"})


_GEMM_KEYS = TileConfig.JSON_KEYS


@dataclass(frozen=True)
class Int4TileConfig(TileConfig):
    """Tiles of the int4 (W4A16) grouped GEMM (``int4_moe_gemm.py``): ``TileConfig``'s, and

    unpack: how the kernel unpacks the 4-bit codes, 0-3 (read ``_int4_moe_gemm_kernel.py``), or 4: the
        operands swapped (``_int4_moe_gemm_swap_kernel.py``).
    gemv: 1 = the FMA GEMV instead of tl.dot: one row per program on the unsorted small-batch path
    (``_int4_gemv_kernel.py``: block_size_n, block_size_k, split_k, num_warps apply; num_stages,
    block_size_m, group_size_m, unpack do not), block_size_m rows per alignment block on sorted routing
    (``_int4_gemv_rows_kernel.py``: block_size_m may then be 1-16); 0 = the tl.dot kernel.
    A distinct class: the bf16 GEMM's launcher refuses it (its ``unpack`` would mean nothing there).
    """

    unpack: int = 0
    gemv: int = 0

    JSON_KEYS: ClassVar[Mapping[str, str]] = {**_GEMM_KEYS, "UNPACK": "unpack", "GEMV": "gemv"}
    ZERO_OK: ClassVar[frozenset[str]] = frozenset({"unpack", "gemv"})


@dataclass(frozen=True)
class Mxfp4TileConfig(TileConfig):
    """Tiles of the MXFP4 grouped GEMM (``mxfp4_moe_gemm.py``): ``TileConfig``'s, and

    decode_asm: 1 = decode the codes with packed PTX where it can (bf16 on CUDA), 0 = portable Triton.
    gemv: 1 or 2 = the FMA GEMV for decode (``_mxfp4_gemv_kernel.py``), decoding each weight tile for 1 or
    2 rows at a time (block_size_n, block_size_k, split_k, num_warps, decode_asm apply; block_size_m is
    still the alignment's block size; group_size_m and num_stages do not apply); 0 = the tl.dot kernel.
    """

    decode_asm: int = 1
    gemv: int = 0

    JSON_KEYS: ClassVar[Mapping[str, str]] = {**_GEMM_KEYS, "DECODE_ASM": "decode_asm", "GEMV": "gemv"}
    ZERO_OK: ClassVar[frozenset[str]] = frozenset({"decode_asm", "gemv"})


@dataclass(frozen=True)
class MoELoRATileConfig(JsonTiles):
    """Tiles of one MoE LoRA launch (``vllm/lora/ops/triton_ops``: fields explained in ``moe_lora_config.py``).

    block_size_m: rows of one M-block (the (adapter, expert) alignment's block size).
    num_n_splits: programs sharing one block's (or pair's) N range.
    shrink_split_k: 1 = the one fused launch; n > 1 = the fused op on sorted routing in two launches, its
    shrink split over n programs along K (``triton_ops/moe_lora_split.py``); other launches ignore it.
    """

    block_size_m: int
    block_size_n: int
    block_size_k: int
    num_n_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3
    shrink_split_k: int = 1

    JSON_KEYS: ClassVar[Mapping[str, str]] = {
        "BLOCK_SIZE_M": "block_size_m", "BLOCK_SIZE_N": "block_size_n", "BLOCK_SIZE_K": "block_size_k",
        "NUM_N_SPLITS": "num_n_splits", "num_warps": "num_warps", "num_stages": "num_stages",
        "SHRINK_SPLIT_K": "shrink_split_k",
    }


@dataclass(frozen=True)
class LoRALinearTileConfig(JsonTiles):
    """Tiles of the dense multi-LoRA op (``vllm/lora/ops/triton_ops/lora_linear.py``).

    token_path: one program per (token, slice, N-split), no grouping (small batches); else the slot-sorted
    path on tensor cores, whose M-blocks are block_m tokens.
    num_n_splits: programs sharing one block's (or token's) N range.
    token_kernel: which kernel runs the token path: 0 = ``lora_linear_token_kernel`` (every N-split
    program recomputes the shrink), 1 = ``lora_linear_token_prefetch_kernel`` (two dependent memory
    round trips; one program per block_n columns, num_n_splits unused; read ``_lora_linear_kernels.py``),
    2 = a split-K shrink (block_k columns of A per program) and an expand (``_lora_linear_split_kernels.py``).
    sorted_split: the sorted path (token_path false) as a split-K shrink (block_k columns of A per program)
    and an expand (one block_n tile per program; ``_lora_linear_sorted_split_kernels.py``) instead of
    ``lora_linear_sorted_kernel`` (num_n_splits and num_stages unused).
    """

    block_m: int
    block_n: int
    block_k: int
    num_n_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3
    token_path: bool = False
    token_kernel: int = 0
    sorted_split: bool = False

    JSON_KEYS: ClassVar[Mapping[str, str]] = {
        "BLOCK_M": "block_m", "BLOCK_N": "block_n", "BLOCK_K": "block_k", "NUM_N_SPLITS": "num_n_splits",
        "num_warps": "num_warps", "num_stages": "num_stages", "token_path": "token_path",
        "TOKEN_KERNEL": "token_kernel", "SORTED_SPLIT": "sorted_split",
    }
    FLAGS: ClassVar[frozenset[str]] = frozenset({"token_path", "sorted_split"})
    ZERO_OK: ClassVar[frozenset[str]] = frozenset({"token_kernel"})


@dataclass(frozen=True)
class FusedLinearLoRATileConfig(JsonTiles):
    """Tiles of the fused projection + LoRA op up to 16 tokens (``triton_ops/fused_linear_lora.py``).

    shrink_in_loop: one (slice, slot) shrink accumulated in the main K loop (read the kernel).
    """

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    shrink_in_loop: bool = True

    JSON_KEYS: ClassVar[Mapping[str, str]] = {
        "BLOCK_N": "block_n", "BLOCK_K": "block_k", "num_warps": "num_warps", "num_stages": "num_stages",
        "SHRINK_IN_LOOP": "shrink_in_loop",
    }
    FLAGS: ClassVar[frozenset[str]] = frozenset({"shrink_in_loop"})


@dataclass(frozen=True)
class FusedLinearLoRABatchTileConfig(JsonTiles):
    """Tiles of the fused projection + LoRA op for 17..256 tokens (``triton_ops/fused_linear_lora_batch.py``).

    loop_slots: how many distinct slots of a tile are shrunk inside the main loop (0, 1, 2, 4 or 8).
    """

    block_m: int
    block_n: int
    block_k: int
    loop_slots: int
    num_warps: int = 4
    num_stages: int = 3

    JSON_KEYS: ClassVar[Mapping[str, str]] = {
        "BLOCK_M": "block_m", "BLOCK_N": "block_n", "BLOCK_K": "block_k", "LOOP_SLOTS": "loop_slots",
        "num_warps": "num_warps", "num_stages": "num_stages",
    }
    ZERO_OK: ClassVar[frozenset[str]] = frozenset({"loop_slots"})


def tuned_tiles(base: T, op: str, key: Mapping[str, Any], num_tokens: int, device_name: str, *,
                check: Optional[Callable[[T], None]] = None) -> T:
    """``base`` overridden by the tuned entry of ``op`` nearest ``num_tokens`` (``vllm.kernel_configs``),
    or ``base`` itself when no tuned file matches.

    The entry may hold only some keys.  A bad entry (unknown key, non-integer, or rejected by ``check``,
    which raises ``ValueError``) is a ``ValueError`` naming the file and the entry.
    """
    from vllm.kernel_configs import find_tuned_config

    found = find_tuned_config(op, key, num_tokens, device_name)
    if found is None:
        return base
    entry, path, tokens = found
    source = f"tuned config {path} (entry {tokens})"
    cfg = type(base).from_json(entry, source=source, base=base)
    if check is not None:
        try:
            check(cfg)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
    return cfg
