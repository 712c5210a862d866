"""SamplingParams validation, Sequence bookkeeping, outputs."""
import pytest

from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams, SamplingType
from vllm.sequence import Sequence, SequenceStatus


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens, p.min_tokens) == (1, 1.0, 1.0, 0, None, 16, 0)
    assert p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos
    assert not p.include_stop_str_in_output and p.skip_special_tokens


def test_normalisation_and_sampling_type():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(temperature=0).sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=0, seed=3).sampling_type == SamplingType.GREEDY
    assert SamplingParams().sampling_type == SamplingType.RANDOM
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=1e-4).temperature == 1e-2
    assert SamplingParams(stop_token_ids=[3, 4]).all_stop_token_ids == {3, 4}
    p = SamplingParams(stop=["a"])
    q = p.clone()
    q.stop.append("b")
    assert p.stop == ["a"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(n=0), "n must be an integer >= 1"),
    (dict(min_tokens=-1), "min_tokens must be"),
    (dict(min_tokens=5, max_tokens=4), r"min_tokens \(5\) must be <= max_tokens \(4\)"),
    (dict(stop=["ok", ""]), "non-empty string"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(seed=1.5), "seed must be an integer"),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_max_tokens_none_is_allowed():
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


def test_sequence_bookkeeping():
    seq = Sequence(3, "req", [5, 6, 7], SamplingParams(min_tokens=2, stop_token_ids=[9]), eos_token_id=2)
    assert (seq.num_tokens, len(seq), seq.last_token_id, seq.num_uncomputed_tokens) == (3, 3, 7, 3)
    assert seq.status == SequenceStatus.WAITING and not seq.is_finished and seq.lora_int_id == 0
    assert sorted(seq.suppressed_token_ids()) == [2, 9]
    seq.append_token_id(8)
    seq.append_token_id(9)
    assert seq.token_ids == [5, 6, 7, 8, 9] and seq.output_token_ids == [8, 9]
    assert seq.suppressed_token_ids() is None
    assert seq.get_generator() is None
    seq.status = SequenceStatus.FINISHED_IGNORED
    assert seq.is_finished and seq.finish_reason == "length"
    assert "seq_id=3" in repr(seq)


def test_sequence_errors():
    with pytest.raises(ValueError, match="prompt is empty"):
        Sequence(0, "r", [])
    with pytest.raises(TypeError, match="lora_int_id"):
        Sequence(0, "r", [1], lora_request="adapter")


def test_generator_is_lazy_and_kept():
    seq = Sequence(0, "r", [1], SamplingParams(seed=11))
    g = seq.get_generator("cpu")
    assert g is seq.get_generator("cpu")
    assert g.initial_seed() == 11


def test_outputs_from_seqs_and_repr():
    p = SamplingParams(n=2)
    seqs = [Sequence(i, "req-1", [1, 2], p, index=i, prompt="hi") for i in (1, 0)]
    seqs[0].append_token_id(4)
    seqs[0].output_text = "x"
    seqs[0].status = SequenceStatus.FINISHED_STOPPED
    seqs[0].stop_reason = "###"
    out = RequestOutput.from_seqs(seqs)
    assert [o.index for o in out.outputs] == [0, 1] and not out.finished
    assert out.outputs[1] == CompletionOutput(index=1, text="x", token_ids=[4], finish_reason="stop",
                                              stop_reason="###")
    assert out.outputs[1].finished() and not out.outputs[0].finished()
    assert "request_id='req-1'" in repr(out) and "text='x'" in repr(out)
    with pytest.raises(ValueError, match="different requests"):
        RequestOutput.from_seqs([seqs[0], Sequence(9, "other", [1])])
