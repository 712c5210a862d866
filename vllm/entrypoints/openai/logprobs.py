"""Engine logprobs (``{token_id: Logprob}`` per token) in OpenAI's two response shapes.

/v1/completions (legacy): ``{"tokens": [...], "token_logprobs": [...],
"top_logprobs": [{token_text: logprob}, ...], "text_offset": [...]}``; a
position without logprobs (the first prompt token under ``echo``) has
``null`` for its logprob and its top entry. ``top_logprobs`` holds the top-k
tokens and the chosen one (so up to k + 1 entries, as OpenAI documents).
``text_offset`` is the running sum of the token texts' lengths.

/v1/chat/completions: ``{"content": [{"token", "logprob", "bytes",
"top_logprobs": [{"token", "logprob", "bytes"}, ...]}]}`` with exactly the
top-k tokens (k = ``top_logprobs``) in ``top_logprobs``.

Token texts are the ``decoded_token`` of each entry (the token decoded alone).
-inf (a token the model rules out) is sent as -9999.0, since JSON has no infinity.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence as Seq

from vllm.sequence import Logprob, TokenLogprobs

_MIN_LOGPROB = -9999.0


def _value(lp: Logprob) -> float:
    return max(lp.logprob, _MIN_LOGPROB)


def _ranked(entry: TokenLogprobs) -> list[tuple[int, Logprob]]:
    """Entries most likely first (the chosen token sits where its rank puts it)."""
    return sorted(entry.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                 -kv[1].logprob))


def _text(token_id: int, lp: Optional[Logprob], token_text: Callable[[int], str]) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return token_text(token_id)


def completion_logprobs(token_ids: Seq[int], entries: Seq[Optional[TokenLogprobs]],
                        token_text: Callable[[int], str], text_offset: int = 0) -> tuple[dict, int]:
    """The legacy completions logprobs object of ``token_ids`` (one entry each,
    None for a position without logprobs) whose first token starts at
    ``text_offset``; returns it and the offset after the last token."""
    if len(token_ids) != len(entries):
        raise ValueError(f"{len(token_ids)} tokens but {len(entries)} logprobs entries")
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top: list[Optional[dict[str, float]]] = []
    offsets: list[int] = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id) if entry is not None else None
        text = _text(token_id, chosen, token_text)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if entry is None or chosen is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(_value(chosen))
        row: dict[str, float] = {}
        for tid, lp in _ranked(entry):
            row.setdefault(_text(tid, lp, token_text), _value(lp))  # the likelier of two equal texts wins
        top.append(row)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}, text_offset


def _chat_token(text: str, value: float) -> dict:
    return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(token_ids: Seq[int], entries: Seq[TokenLogprobs], top_logprobs: int,
                  token_text: Callable[[int], str]) -> dict:
    """The chat ``logprobs`` object of ``token_ids`` with ``top_logprobs``
    alternatives per token."""
    if len(token_ids) != len(entries):
        raise ValueError(f"{len(token_ids)} tokens but {len(entries)} logprobs entries")
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        item = _chat_token(_text(token_id, chosen, token_text), _value(chosen))
        item["top_logprobs"] = [_chat_token(_text(tid, lp, token_text), _value(lp))
                                for tid, lp in _ranked(entry)[:top_logprobs]]
        content.append(item)
    return {"content": content}
