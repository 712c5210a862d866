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
