"""Load a model's tokenizer from a local folder (no downloads)."""
from __future__ import annotations

import os
from typing import Any, Optional

# Files of which at least one must be present for AutoTokenizer to find a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "vocab.txt", "spiece.model", "tiktoken.model")


def get_tokenizer(tokenizer_name: str, *, trust_remote_code: bool = False, revision: Optional[str] = None,
                  **kwargs: Any):
    """``transformers.AutoTokenizer`` for the local folder ``tokenizer_name``.

    Raises FileNotFoundError when the folder does not exist or holds no
    tokenizer files, and RuntimeError (with transformers' reason) when loading
    fails; both say which path was tried and how to point at another one.
    """
    from transformers import AutoTokenizer

    path = os.fspath(tokenizer_name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist; pass the local model folder "
                                "(or --tokenizer DIR) that holds tokenizer.json / tokenizer_config.json")
    if not any(os.path.exists(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {path!r}: expected one of {', '.join(_TOKENIZER_FILES)}; "
                                "copy the tokenizer files there or pass --tokenizer DIR pointing at them")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision,
                                             local_files_only=True, **kwargs)
    except Exception as exc:  # transformers raises many types; keep its message
        raise RuntimeError(f"could not load the tokenizer in {path!r}: {exc}. Check its tokenizer files, or "
                           "pass --tokenizer DIR pointing at a folder with a working tokenizer") from exc


# transformers modules whose ``_encode_plus`` is the Rust backend's encode plus argument handling
_PLAIN_FAST_ENCODE = ("transformers.tokenization_utils_tokenizers", "transformers.tokenization_utils_fast")


def _backend_encoder(tokenizer: Any) -> Optional[Any]:
    """The ``tokenizers`` backend of a fast tokenizer whose encode adds nothing to it, else None.

    Its ``encode`` only reads the backend, so it is safe while other threads decode (transformers'
    own encode resets the backend's truncation / padding / special-token settings on every call)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode"):
        return None
    owners = {name: next((c for c in type(tokenizer).__mro__ if name in c.__dict__), None)
              for name in ("_encode_plus", "encode", "__call__")}
    if owners["_encode_plus"] is None or owners["_encode_plus"].__module__ not in _PLAIN_FAST_ENCODE:
        return None
    if any(owners[n] is None or owners[n].__module__ != "transformers.tokenization_utils_base"
           for n in ("encode", "__call__")):
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None  # transformers would switch them off for the call
    if bool(getattr(tokenizer, "split_special_tokens", False)) != bool(getattr(backend, "encode_special_tokens",
                                                                                False)):
        return None
    return backend


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """``tokenizer.encode(text)`` without its "sequence length is longer than the specified maximum"
    warning (the engine answers an over-long prompt itself), and safe to call off the engine thread."""
    backend = _backend_encoder(tokenizer)
    if backend is not None:
        return list(backend.encode(text, add_special_tokens=add_special_tokens).ids)
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens, verbose=False))


def load_chat_template(value: str) -> str:
    """A chat template given as a file path or as the Jinja text itself (``--chat-template``,
    ``LLM.chat(chat_template=...)``); ValueError when it is neither, or is not valid Jinja."""
    text = value
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
    elif not any(mark in value for mark in ("{{", "{%", "\n")):
        raise ValueError(f"chat template {value!r} is not a file and does not look like a Jinja template "
                         "(no '{{' or '{%'); give the path of a .jinja file or the template text")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except TemplateSyntaxError as e:
        where = f"the file {value!r}" if text is not value else "the chat template"
        raise ValueError(f"{where} is not a valid Jinja template: {e.message} (line {e.lineno})") from None
    return text
