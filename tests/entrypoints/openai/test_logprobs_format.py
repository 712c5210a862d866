"""The OpenAI logprobs shapes built from engine entries (no server)."""
import json

import pytest

from vllm.entrypoints.openai.logprobs import chat_logprobs, completion_logprobs
from vllm.sequence import Logprob

TEXT = {1: "a", 2: "bc", 3: "a", 4: "é", 5: "d"}


def text(token_id):
    return TEXT[token_id]


def entry(*items):
    """(token_id, logprob, rank) -> {token_id: Logprob}, decoded_token from TEXT."""
    return {t: Logprob(lp, r, TEXT[t]) for t, lp, r in items}


def test_completion_logprobs_shape():
    entries = [None,                                                  # e.g. the first prompt token
               entry((2, -0.5, 1), (1, -1.0, 2)),                     # chosen token is the most likely
               entry((5, -3.0, 4), (2, -0.25, 1), (1, -1.5, 2), (3, -2.0, 3)),  # chosen outside the top-3
               entry((4, float("-inf"), 5))]
    obj, end = completion_logprobs([1, 2, 5, 4], entries, text, text_offset=10)
    assert obj["tokens"] == ["a", "bc", "d", "é"]
    assert obj["text_offset"] == [10, 11, 13, 14] and end == 15
    assert obj["token_logprobs"] == [None, -0.5, -3.0, -9999.0]  # -inf is not JSON: clamped
    assert obj["top_logprobs"][0] is None
    assert obj["top_logprobs"][1] == {"bc": -0.5, "a": -1.0}
    # the top-3 and the chosen token, most likely first; ids 1 and 3 share the text "a": the likelier stays
    assert list(obj["top_logprobs"][2].items()) == [("bc", -0.25), ("a", -1.5), ("d", -3.0)]
    json.dumps(obj, allow_nan=False)
    with pytest.raises(ValueError, match="2 tokens but 1 logprobs entries"):
        completion_logprobs([1, 2], [None], text)


def test_chat_logprobs_shape():
    entries = [entry((5, -3.0, 4), (2, -0.25, 1), (1, -1.5, 2), (3, -2.0, 3)), entry((4, -0.1, 1))]
    obj = chat_logprobs([5, 4], entries, 2, text)
    first, second = obj["content"]
    assert first == {"token": "d", "logprob": -3.0, "bytes": [100],
                     "top_logprobs": [{"token": "bc", "logprob": -0.25, "bytes": [98, 99]},
                                      {"token": "a", "logprob": -1.5, "bytes": [97]}]}
    assert second["bytes"] == list("é".encode()) and second["top_logprobs"] == [
        {"token": "é", "logprob": -0.1, "bytes": [195, 169]}]
    assert all(x["top_logprobs"] == [] for x in chat_logprobs([5, 4], entries, 0, text)["content"])
