"""The main job: one batch on the embedded demo MoE model, mixing the base model and two LoRA adapters.

The demo model (``examples/demo_model``, trained by ``examples/train_demo_model.py``)
copies its input: ``"hello="`` -> ``"hello"``.  Adapter ``upper`` answers in upper
case, adapter ``rot13`` in rot13.  Every word below is sent three times in ONE
``generate`` call: to the base model and to each adapter.  The script prints
what each produced, whether it is the expected transformation, and exits
non-zero if fewer than 95 % are.

    python examples/lora_demo.py [--words hello world ...]
"""
from __future__ import annotations

import argparse
import codecs
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ["vllm", "mixture", "experts", "adapter", "serving", "kernel", "router", "hopper", "batch", "token",
         "lora", "triton"]
TASKS = {
    "base": lambda w: w,
    "upper": lambda w: w.upper(),
    "rot13": lambda w: codecs.encode(w, "rot13"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--words", nargs="+", default=WORDS, help="lowercase words (a-z, 3-10 letters)")
    p.add_argument("--model", default=os.path.join(HERE, "demo_model"))
    p.add_argument("--adapters", default=os.path.join(HERE, "demo_adapters"))
    args = p.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    # The demo adapters are saved with r=4; peft 0.21 gives the fused gate_up experts LoRA twice
    # the configured rank (4 -> 8), so max_lora_rank=8 holds them.
    llm = LLM(args.model, enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=64)
    adapters = {name: LoRARequest(name, i + 1, os.path.join(args.adapters, name))
                for i, name in enumerate(["upper", "rot13"])}
    prompts, loras, rows = [], [], []
    for word in args.words:
        for task in TASKS:
            prompts.append(f"{word}=")
            loras.append(adapters.get(task))
            rows.append((word, task))
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), lora_request=loras,
                           use_tqdm=False)

    print(f"\n{'input':<12} {'adapter':<8} {'output':<12} {'expected':<12} verdict")
    good = 0
    for (word, task), out in zip(rows, outputs):
        text = out.outputs[0].text
        want = TASKS[task](word)
        ok = text == want
        good += ok
        print(f"{word:<12} {task:<8} {text:<12} {want:<12} {'OK' if ok else 'MISS'}")
    share = good / len(rows)
    print(f"\n{good}/{len(rows)} outputs are the expected transformation ({share:.0%}), "
          f"all {len(rows)} prompts in one batch over the base model and {len(adapters)} adapters")
    return 0 if share >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
