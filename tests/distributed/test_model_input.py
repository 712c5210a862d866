"""The ModelInput that rank 0 sends to the other tensor-parallel ranks carries each token's adapter.

Real SchedulerOutputs (a mixed-adapter prefill, decodes, a preemption, a recompute prefill next
to a new sequence) go through ``ModelRunner.execute`` with a fake model; the peers receive the
ModelInput pickled, as the worker pipes send it, and run it through ``Worker.execute_model``.
On both ranks the LoRA manager must get, per token, the adapter id its sequence was created with.
"""
import pickle
from types import SimpleNamespace

import torch
from torch import nn

from tests.engine.test_scheduler import make_scheduler, make_seq
from vllm.worker.model_runner import ModelInput, ModelRunner
from vllm.worker.worker import Worker

VOCAB = 16


class _ZeroModel(nn.Module):
    """Stands in for a model: hidden states are zeros, logits are the hidden states."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(input_ids), VOCAB)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class _RecordingLoRAManager:
    def __init__(self) -> None:
        self.mappings: list[list[int]] = []

    def set_adapter_mapping(self, token_lora_ids: list[int]) -> None:
        self.mappings.append(list(token_lora_ids))


class _PicklingPeers:
    """The other ranks: each step's ModelInput crosses a pickle boundary, then runs on rank 1."""

    def __init__(self, rank1: ModelRunner) -> None:
        self.rank1 = SimpleNamespace(runner=rank1)
        self.sent: list[ModelInput] = []

    def start_execute(self, inp: ModelInput) -> None:
        received = pickle.loads(pickle.dumps(inp))
        self.sent.append(received)
        Worker.execute_model(self.rank1, received)

    def finish_execute(self) -> None:
        pass


def test_every_rank_maps_each_token_to_its_sequences_adapter():
    sched, bm = make_scheduler(num_blocks=4, block_size=2, max_model_len=8)
    a, b, c = make_seq(0, 4, lora=3), make_seq(1, 4, lora=5), make_seq(2, 2)
    want = {0: 3, 1: 5, 2: 0}  # seq_id -> adapter id (0: base model)
    managers = [_RecordingLoRAManager(), _RecordingLoRAManager()]
    rank1 = ModelRunner(_ZeroModel(), block_size=2, device=torch.device("cpu"), lora_manager=managers[1])
    peers = _PicklingPeers(rank1)
    rank0 = ModelRunner(_ZeroModel(), block_size=2, device=torch.device("cpu"), lora_manager=managers[0],
                        peers=peers)
    sched.add_seqs([a, b])

    def step():
        out = sched.schedule()
        expected = [want[s.seq_id] for s, q in zip(out.scheduled_seqs, out.query_lens) for _ in range(q)]
        result = rank0.execute(out)
        assert peers.sent[-1].token_lora_ids == expected
        assert managers[0].mappings[-1] == managers[1].mappings[-1] == expected
        sched.postprocess(out.scheduled_seqs, result.sampled_token_ids)
        return out

    assert step().query_lens == [4, 4]  # prefill: a (adapter 3) and b (adapter 5)
    sched.add_seq(c)
    out = step()  # decode: a needs a block, b is preempted
    assert out.scheduled_seqs == [a] and out.preempted_seqs == [b]
    sched.abort_request("r0")
    out = step()  # b recomputed (prompt + 1 generated token) next to c's new prompt
    assert out.is_prefill and out.scheduled_seqs == [b, c] and out.query_lens == [5, 2]
    steps = 3
    while sched.has_unfinished():  # to the end (c is preempted and recomputed in turn)
        steps += 1
        step()
    assert b.num_preemptions == 1 and c.num_preemptions >= 1
    assert len(managers[0].mappings) == len(managers[1].mappings) == len(peers.sent) == steps


def test_without_lora_the_model_input_has_no_adapter_ids():
    sched, bm = make_scheduler()
    sched.add_seqs([make_seq(0, 3), make_seq(1, 2, lora=4)])
    inp = ModelInput.from_scheduler_output(sched.schedule(), bm.block_size, lora=False)
    assert inp.token_lora_ids is None and len(inp.input_ids) == 5
