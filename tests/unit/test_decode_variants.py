"""benchmarks/decode_variants.py: the decode A/B flips one switch from its shipped default and puts every switch
back before the next case (a switch left flipped would silently time the wrong build)."""
import importlib
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import decode_variants as dv  # noqa: E402


@pytest.fixture
def restore():
    mods = {flag: importlib.import_module(mod) for flag, (mod, _) in dv.TOGGLES.items()}
    before = {flag: getattr(mods[flag], name) for flag, (_, name) in dv.TOGGLES.items()}
    yield mods
    dv.shipped_switches()
    for flag, (_, name) in dv.TOGGLES.items():
        setattr(mods[flag], name, before[flag])


def _state(mods):
    return {flag: bool(getattr(mods[flag], name)) for flag, (_, name) in dv.TOGGLES.items()} | {
        "fanout": dv.pair_fanout_on()}


def test_each_flip_changes_one_switch_and_shipped_restores_all(restore):
    dv.shipped_switches()
    shipped = _state(restore)
    for flag in [*dv.TOGGLES, "moe-lora-pair-fanout"]:
        said = dv.flip_switch(flag)
        now = _state(restore)
        key = "fanout" if flag == "moe-lora-pair-fanout" else flag
        assert now[key] != shipped[key], said
        assert {k: v for k, v in now.items() if k != key} == {k: v for k, v in shipped.items() if k != key}
        assert said.endswith("on" if now[key] else "off")
    dv.shipped_switches()
    assert _state(restore) == shipped


def test_flip_flags_turn_several_switches_and_leave_the_rest(restore):
    """``--flip`` (benchmark_decode.py / profile_decode.py): each named switch to the other side of its shipped
    default, the others as they were; an unknown name stops with the list of switches."""
    import argparse

    dv.shipped_switches()
    shipped = _state(restore)
    p = argparse.ArgumentParser()
    dv.add_variant_flags(p)
    names = list(dv.TOGGLES)[:2]
    on = dv.apply_variant_flags(p.parse_args([x for n in names for x in ("--flip", n)]))
    now = _state(restore)
    assert all(now[n] != shipped[n] for n in names) and all(f"{n} flipped" in on for n in names)
    assert {k: v for k, v in now.items() if k not in names} == {k: v for k, v in shipped.items() if k not in names}
    with pytest.raises(SystemExit, match="not a decode switch"):
        dv.apply_variant_flags(p.parse_args(["--flip", "no-such-switch"]))


def test_set_assigns_a_module_constant_and_refuses_what_does_not_exist(monkeypatch):
    from vllm.lora.ops.triton_ops import lora_concat

    monkeypatch.setattr(lora_concat, "SLOT_GROUP", lora_concat.SLOT_GROUP)  # restored after
    said = dv.apply_sets(["vllm.lora.ops.triton_ops.lora_concat.SLOT_GROUP=4"])
    assert lora_concat.SLOT_GROUP == 4 and said == ["vllm.lora.ops.triton_ops.lora_concat.SLOT_GROUP=4"]
    for bad, why in (("vllm.lora.ops.triton_ops.lora_concat.NO_SUCH=1", "has no attribute"),
                     ("SLOT_GROUP", "expected MODULE.ATTR=VALUE"), ("no_such_module.X=1", "cannot import")):
        with pytest.raises(SystemExit, match=why):
            dv.apply_sets([bad])
