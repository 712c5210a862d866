"""Model and tokenizer names -> local folders: a folder stays as it is; a Hugging Face hub id
(``Org/Name``) is looked up in the local hub cache by ``huggingface_hub`` (never downloaded).

The cache is huggingface_hub's: ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache/huggingface/hub
(read by huggingface_hub when it is imported).
"""
from __future__ import annotations

import os
from typing import Optional


def resolve_model_path(name: str, revision: Optional[str] = None, *, what: str = "model") -> str:
    """The local folder of ``name``: itself if it is a folder, else the cached snapshot of the hub
    repository ``name`` at ``revision`` (a branch, tag or commit; default: main).

    Raises FileNotFoundError saying where it looked and how to download it when it is not cached.
    ``what`` names the argument in messages ("model", "tokenizer").
    """
    path = os.fspath(name)
    if os.path.isdir(path):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = snapshot_download(path, revision=revision, local_files_only=True)
    except HFValidationError as e:
        raise FileNotFoundError(f"{what} {path!r}: there is no such folder (a model folder holds config.json, the "
                                f"weights and the tokenizer), and it is not a Hugging Face hub id (Org/Name) "
                                f"either: {e}") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        raise FileNotFoundError(
            f"{what} {path!r} is not a local folder, and the hub repository {path!r}{at} is not in the local "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}; set HF_HUB_CACHE or HF_HOME to use another). "
            f"Nothing is downloaded here: download it first with `hf download {path}"
            f"{f' --revision {revision}' if revision else ''}` (or `huggingface-cli download {path}`), "
            f"or pass the local folder that holds it ({type(e).__name__}: {e})") from None
    return str(folder)
