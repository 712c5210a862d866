"""On-demand adapters: a request whose ``model`` names an adapter the server does not know yet
loads it from a directory, as vLLM's ``lora_filesystem_resolver`` plugin does.

Turned on by ``--lora-resolver-dir DIR``, or by vLLM's environment variables
``VLLM_PLUGINS=lora_filesystem_resolver`` with ``VLLM_LORA_RESOLVER_CACHE_DIR=DIR`` (which, as in
vLLM, also need ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``).  The adapter ``foo`` is the folder
``DIR/foo`` (a name may hold ``/``: ``org/foo`` is ``DIR/org/foo``), found through the same
``AdapterPathPolicy`` as runtime loads, so ``..`` and symlinks never reach outside ``DIR``.  It is
used when its ``adapter_config.json`` says ``peft_type: LORA`` and names the served base model in
``base_model_name_or_path`` (the model as given to ``vllm serve``, its real path, or a served
name); otherwise the name is unknown (404), as in vLLM.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from vllm import envs
from vllm.entrypoints.openai.security import AdapterPathError, AdapterPathPolicy
from vllm.logger import init_logger
from vllm.lora.peft_loader import CONFIG_NAME

logger = init_logger(__name__)

PLUGIN_NAME = "lora_filesystem_resolver"


def resolver_dir(flag: Optional[str]) -> Optional[str]:
    """The directory adapters are resolved from (``--lora-resolver-dir``, else vLLM's environment
    variables), or None.  A half-configured resolver is a ValueError that says what is missing."""
    plugins = [p.strip() for p in (envs.VLLM_PLUGINS or "").split(",") if p.strip()]
    others = [p for p in plugins if p != PLUGIN_NAME]
    if others:
        logger.warning("VLLM_PLUGINS: %s not available in this server (only %s is); not loaded",
                       ", ".join(others), PLUGIN_NAME)
    env_dir = envs.VLLM_LORA_RESOLVER_CACHE_DIR
    directory = flag
    if directory is None and PLUGIN_NAME in plugins:
        if env_dir is None:
            raise ValueError(f"VLLM_PLUGINS includes {PLUGIN_NAME} but VLLM_LORA_RESOLVER_CACHE_DIR is not set; set "
                             "it to the directory holding the adapters (or use --lora-resolver-dir DIR)")
        if not envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING:
            raise ValueError(f"VLLM_PLUGINS={PLUGIN_NAME} needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, as in vLLM "
                             "(or use --lora-resolver-dir DIR)")
        directory = env_dir
    elif directory is None and env_dir is not None:
        logger.warning("VLLM_LORA_RESOLVER_CACHE_DIR is set but VLLM_PLUGINS does not include %s: adapters are not "
                       "loaded on demand (add it, or use --lora-resolver-dir)", PLUGIN_NAME)
    if directory is not None and not os.path.isdir(directory):
        raise ValueError(f"the LoRA resolver directory {directory!r} is not a directory")
    return directory


class FilesystemLoRAResolver:
    """Finds the folder of adapter ``name`` under ``directory`` for the base model ``base_models``
    (the names it may be given by in ``base_model_name_or_path``)."""

    def __init__(self, directory: str, base_models: Sequence[str]) -> None:
        self.directory = directory
        self.policy = AdapterPathPolicy([directory])
        self.base_models = list(base_models)

    def _is_base_model(self, named: object) -> bool:
        if not isinstance(named, str) or not named:
            return False
        if named in self.base_models:
            return True
        # the same folder under another spelling (relative to the server's working directory, a symlink)
        return os.path.isdir(named) and any(os.path.isdir(b) and os.path.samefile(named, b) for b in self.base_models)

    def find(self, name: str) -> Optional[str]:
        """The real path of adapter ``name``'s folder, or None when there is no usable one."""
        if not name or os.path.isabs(name) or "\\" in name:
            return None
        try:
            path = self.policy.resolve(name)  # inside the directory, symlinks and '..' resolved
        except AdapterPathError:
            return None
        try:
            with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            logger.warning("LoRA resolver: %s/%s is not readable JSON (%s); not loaded", name, CONFIG_NAME, e)
            return None
        if not isinstance(config, dict) or config.get("peft_type") != "LORA":
            logger.info("LoRA resolver: %s is not a LoRA adapter (peft_type %r); not loaded", name,
                        config.get("peft_type") if isinstance(config, dict) else None)
            return None
        if not self._is_base_model(config.get("base_model_name_or_path")):
            logger.info("LoRA resolver: %s was trained on %r, not on the served model; not loaded", name,
                        config.get("base_model_name_or_path"))
            return None
        return path
