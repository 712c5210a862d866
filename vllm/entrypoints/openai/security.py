"""What the server lets a client reach: the API key check and the folders adapters may load from.

``api_key_matches`` compares SHA-256 digests in constant time, so the time a wrong key
takes says nothing about how much of it was right.

``AdapterPathPolicy`` confines adapter paths that come from clients (``POST
/v1/load_lora_adapter``, and any resolver that loads adapters by name) to the
allowed directories:

- a relative path is looked up inside each allowed directory, in order; ``~`` is not
  expanded, and nothing is resolved against the server's working directory;
- the path is resolved with ``os.path.realpath`` (``..`` and every symlink) and the
  result must lie inside an allowed directory (themselves resolved the same way);
- it must be a folder holding ``adapter_config.json``.

Every failure raises ``AdapterPathError`` with one message that repeats the client's
own path and never says which check failed, so a client cannot learn whether some
folder exists outside the allowed directories.  ``public_message`` rewrites a
loader's error about an accepted path so that it shows the client's path, not the
server's.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from typing import Iterable, Optional, Sequence

from vllm.lora.peft_loader import CONFIG_NAME


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def api_key_matches(authorization: Optional[str], api_key: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <api_key>``, compared in constant time."""
    scheme, _, given = (authorization or "").partition(" ")
    ok_scheme = scheme.lower() == "bearer"
    return hmac.compare_digest(_digest(given.strip()), _digest(api_key)) and ok_scheme


class AdapterPathError(ValueError):
    """A client's adapter path is refused; the message reveals nothing about the server's files."""


class AdapterPathPolicy:
    """The directories runtime adapters may be loaded from (see the module docstring).

    ``allowed_dirs`` empty means runtime loads are refused, with a message naming
    ``--lora-allowed-dirs``.
    """

    def __init__(self, allowed_dirs: Iterable[str]) -> None:
        self.allowed_dirs: list[str] = []
        for d in allowed_dirs:
            real = os.path.realpath(d)
            if real not in self.allowed_dirs:
                self.allowed_dirs.append(real)

    @classmethod
    def for_server(cls, allowed_dirs: Optional[Sequence[str]], startup_adapter_paths: Sequence[str]
                   ) -> "AdapterPathPolicy":
        """``--lora-allowed-dirs`` when given; otherwise the folders holding the start-up adapters."""
        if allowed_dirs:
            missing = [d for d in allowed_dirs if not os.path.isdir(d)]
            if missing:
                raise ValueError(f"--lora-allowed-dirs: {', '.join(missing)} is not a directory")
            return cls(allowed_dirs)
        return cls(os.path.dirname(os.path.realpath(p)) for p in startup_adapter_paths)

    def _inside(self, real: str) -> bool:
        return any(os.path.commonpath([real, d]) == d for d in self.allowed_dirs)

    def resolve(self, path: str) -> str:
        """The real path of the adapter folder ``path`` names, or ``AdapterPathError``."""
        if not self.allowed_dirs:
            raise AdapterPathError("loading adapters at run time needs allowed directories: start the server with "
                                   "--lora-allowed-dirs DIR (or serve start-up adapters with --lora-modules, whose "
                                   "folders are then allowed)")
        refused = AdapterPathError(f"no LoRA adapter at {path!r} inside the directories this server allows "
                                   "(--lora-allowed-dirs)")
        if not isinstance(path, str) or not path or "\x00" in path:
            raise refused
        candidates = [path] if os.path.isabs(path) else [os.path.join(d, path) for d in self.allowed_dirs]
        for candidate in candidates:
            real = os.path.realpath(candidate)
            if self._inside(real) and os.path.isfile(os.path.join(real, CONFIG_NAME)):
                return real
        raise refused

    @staticmethod
    def public_message(message: str, real_path: str, given_path: str) -> str:
        """``message`` with the server's resolved path replaced by the client's own path."""
        return message.replace(real_path, given_path)
