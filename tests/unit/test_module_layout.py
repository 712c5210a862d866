"""Modules are where their names say: a torch backend's module never imports from a Triton
backend's module, nor the other way round.  What both share lives in a neutral module
(``experts/two_gemm.py``, ``experts/*_base.py``, ``vllm/lora/ops/moe_lora_align.py``,
``vllm/lora/ops/slices.py``)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Collection

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPERTS = "vllm.model_executor.layers.fused_moe.experts"

# (torch side, Triton side): modules by dotted name; a trailing "." is a package prefix
SIDES = {
    "experts": (
        {f"{EXPERTS}.{m}" for m in ("torch_experts", "torch_int4_experts", "torch_mxfp4_experts", "naive_dense")},
        {f"{EXPERTS}.{m}" for m in ("triton_experts", "marlin_experts", "oai_triton_experts")},
    ),
    "lora ops": ({"vllm.lora.ops.torch_ops."}, {"vllm.lora.ops.triton_ops."}),
}
# Known exceptions, each to be removed when fixed: (importing module, imported module)
KNOWN: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, modules: Collection[str]) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions (``from a import b``: a, and
    a.b when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names} & set(modules)
    return found


def _belongs(name: str, side: set[str]) -> bool:
    return any(name.startswith(s) if s.endswith(".") else name == s for s in side)


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (ROOT / "vllm").rglob("*.py")}


def crossings(modules: dict[str, Path], sides: tuple[set[str], set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) pairs where a module of one side imports a module of the other."""
    out = set()
    for name, path in modules.items():
        for mine, other in (sides, sides[::-1]):
            if _belongs(name, mine):
                out |= {(name, imp) for imp in _imports(path, modules) if _belongs(imp, other)}
    return out


@pytest.mark.parametrize("kind", sorted(SIDES))
def test_no_backend_module_imports_from_the_other_backend(kind):
    modules = _all_modules()
    torch_side, triton_side = SIDES[kind]
    for side in (torch_side, triton_side):  # the rule must see the modules it names
        for s in side:
            assert s.endswith(".") or s in modules, f"{s} does not exist: update SIDES"
    bad = crossings(modules, SIDES[kind]) - KNOWN
    assert not bad, ("a torch module imports from a Triton module or the reverse; move what both need "
                     f"into a neutral module: {sorted(bad)}")


def test_the_check_sees_a_crossing(tmp_path):
    fake = tmp_path / "m.py"
    fake.write_text(f"def f():\n    from {EXPERTS}.torch_experts import grouped_gemm_torch\n")
    sides = SIDES["experts"]
    assert crossings({f"{EXPERTS}.triton_experts": fake}, sides) == {
        (f"{EXPERTS}.triton_experts", f"{EXPERTS}.torch_experts")}


def test_known_exceptions_still_exist():
    """An exception that no longer occurs must leave KNOWN, so it cannot come back unnoticed."""
    modules = _all_modules()
    found = set().union(*(crossings(modules, s) for s in SIDES.values()))
    assert KNOWN <= found, f"fixed, remove from KNOWN: {sorted(KNOWN - found)}"
