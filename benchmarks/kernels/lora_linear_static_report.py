"""Static report of the dense LoRA token kernels compiled for an H100 / H200 (sm_90), no GPU needed.

Per token kernel (``LoRALinearTileConfig.token_kernel`` 0 = ``lora_linear_token_kernel``, 1 =
``lora_linear_token_prefetch_kernel``) at the configs ``lora_linear_config`` / ``token_variant_config``
give for the attention projections (qkv: three slices in one launch; o: one), as the engine launches them
(slices are views of one buffer, ``adapter_enabled`` given): registers, spilled bytes, shared memory,
programs, bytes of A the programs read (each program reads its slot's whole A), and the dependent
global-memory round trips before the last store (``round_trips``).

``round_trips`` models one warp issuing in order (a GPU warp does): an instruction issues when the
previous one has and its source registers are ready; a global load's result is ready one round trip
after it issues, everything else at once.  So the count is the number of global loads chained before
the store, counting the loads that wait only because an earlier instruction in program order waits
(e.g. a load placed after a shared-memory store of an earlier load's value, or after a branch on it).
Back edges are not followed (one pass of each loop; the default configs give each program one N tile).

    PYTHONPATH=. python benchmarks/kernels/lora_linear_static_report.py [--width qwen3] [--rank 16] [--tokens 1 8]
        [--out report.md]

Run without TRITON_INTERPRET (the interpreter replaces the compiler).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET (the interpreter replaces the compiler)")

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.kernels.sass_stats import TARGET, _sass, resources, specialise  # noqa: E402

_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# width -> (hidden, q heads * head_dim, kv heads * head_dim), as benchmark_lora_linear.py
WIDTHS = {"qwen3": (2048, 4096, 512), "mixtral": (4096, 4096, 1024), "gpt-oss": (2880, 4096, 512)}
_NO_WRITE = ("STG", "ST.", "STS", "STL", "RED", "BRA", "EXIT", "BAR", "MEMBAR", "NOP", "WARPSYNC", "DEPBAR",
             "BSYNC", "BSSY", "RET", "CALL", "FENCE", "ERRBAR", "CCTL")
_PRED_ONLY = ("ISETP", "FSETP", "DSETP", "HSETP2", "PLOP3", "UISETP", "UPLOP3")


def _regs(text: str) -> list[str]:
    """Register names an operand list reads; ``R8.64`` (an address pair) reads R8 and R9."""
    out = []
    for m in re.finditer(r"\b(U?R)(\d+)(\.64)?\b|\b(U?P\d)\b", text):
        if m.group(4):
            out.append(m.group(4))
            continue
        out.append(f"{m.group(1)}{m.group(2)}")
        if m.group(3):
            out.append(f"{m.group(1)}{int(m.group(2)) + 1}")
    return [r for r in out if r not in ("RZ", "URZ", "PT", "UPT")]


def round_trips(sass: str) -> int:
    """Dependent global round trips before the last global store (the in-order model above)."""
    ready: dict[str, int] = {}
    now = last_store = 0
    for line in sass.splitlines():
        m = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);", line)
        if not m:
            continue
        guard, op, rest = m.group(1) or "", m.group(2), m.group(3)
        ops = [o.strip() for o in rest.split(",")] if rest else []
        is_load = op.startswith(("LDG", "LD.", "ATOMG"))
        is_store = op.startswith(("STG", "ST.", "RED"))
        lead = 0  # leading predicate destinations (ISETP P0, PT, ...; LOP3.LUT P0, R2, ...)
        while lead < len(ops) and re.fullmatch(r"U?P\d|U?PT", ops[lead]):
            lead += 1
        if op.startswith(_NO_WRITE):
            lead = 0
        writes_reg = not op.startswith(_NO_WRITE + _PRED_ONLY) and lead < len(ops)
        n_dst = lead + (1 if writes_reg else 0)
        dst, srcs = ",".join(ops[:n_dst]), _regs(guard) + _regs(",".join(ops[n_dst:]))
        now = max([now] + [ready.get(r, 0) for r in srcs])
        if is_store:
            last_store = max(last_store, now)
        width = 4 if ".128" in op else 2 if (".64" in op or ".WIDE" in op) else 1
        for d in _regs(dst):
            base = re.match(r"(U?R)(\d+)$", d)
            names = [f"{base.group(1)}{int(base.group(2)) + i}" for i in range(width)] if base else [d]
            for n in names:
                ready[n] = now + 1 if is_load else now
    return last_store


def compile_token(kernel: int, dtype: torch.dtype, cfg, *, K: int, n_sizes: list[int], R: int, L: int = 4):
    """One token-path kernel as the engine launches it (``add_lora_linear``'s arguments)."""
    from vllm.lora.ops.triton_ops import _lora_linear_kernels as kern
    from vllm.triton_utils import next_power_of_2

    fn = kern.lora_linear_token_kernel if kernel == 0 else kern.lora_linear_token_prefetch_kernel
    S, maxN, dt = len(n_sizes), max(n_sizes), _DT[dtype]
    n = n_sizes + [0] * (3 - S)
    offs = [sum(n_sizes[:i]) for i in range(S)] + [0] * (3 - S)
    ptrs = dict(x_ptr=dt, a_ptr=dt, b_ptr=dt, y_ptr=dt, mapping_ptr="i32", enabled_ptr="i32")
    ints = dict(K=K, R=R, max_loras=L, n0=n[0], n1=n[1], n2=n[2], off0=offs[0], off1=offs[1], off2=offs[2],
                stride_xt=K, stride_xk=1, stride_as=L * R * K if S > 1 else 0, stride_al=R * K, stride_ar=K,
                stride_ak=1, stride_bs=L * maxN * R if S > 1 else 0, stride_bl=maxN * R, stride_bn=R, stride_br=1,
                stride_yt=sum(n_sizes), stride_yn=1)
    if kernel == 0:
        ints["num_n_splits"] = max(1, min(cfg.num_n_splits, -(-maxN // cfg.block_n)))
    cexp = dict(HAS_ENABLED=True, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=next_power_of_2(max(R, 8)),
                K_TILES=-(-K // cfg.block_k))
    return triton.compile(specialise(fn, ptrs, cexp, ints), target=TARGET,
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def programs(kernel: int, cfg, T: int, n_sizes: list[int]) -> int:
    """Programs that read A (the others return before loading it)."""
    if kernel == 1:
        return T * sum(-(-n // cfg.block_n) for n in n_sizes)
    splits = max(1, min(cfg.num_n_splits, -(-max(n_sizes) // cfg.block_n)))
    return T * len(n_sizes) * splits  # every program shrinks, also those with no N tile


def main() -> None:
    from vllm.lora.ops.triton_ops.lora_linear import lora_linear_config, token_variant_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", default="qwen3", choices=list(WIDTHS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    H, QD, KVD = WIDTHS[args.width]
    lines = [f"# dense LoRA token kernels, sm_90, {args.dtype}, {args.width} width, rank {args.rank}", "",
             "| proj | tokens | kernel | BLOCK_N x BLOCK_K, warps, N-splits | regs | spill B | shared B | "
             "programs reading A | A bytes read (L2) | round trips |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, K, ns in (("qkv", H, [QD, KVD, KVD]), ("o", QD, [H])):
        for T in args.tokens:
            base = lora_linear_config(T, K, max(ns), args.rank, len(ns), dtype)
            for kernel, cfg in ((0, dataclasses.replace(base, token_kernel=0)),
                                (1, token_variant_config(T, K, max(ns), args.rank, len(ns), dtype))):
                k = compile_token(kernel, dtype, cfg, K=K, n_sizes=ns, R=args.rank)
                regs, spill = resources(k.asm["cubin"])
                sass = _sass(k.asm["cubin"])
                trips = round_trips(sass) if sass else "-"
                progs = programs(kernel, cfg, T, ns)
                a_bytes = progs * args.rank * K * torch.finfo(dtype).bits // 8
                splits = cfg.num_n_splits if kernel == 0 else "-"
                lines.append(f"| {name} | {T} | {kernel} | {cfg.block_n} x {cfg.block_k}, {cfg.num_warps}, {splits} | "
                             f"{regs} | {spill} | {k.metadata.shared} | {progs} | {a_bytes / 1e6:.2f} MB | {trips} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
