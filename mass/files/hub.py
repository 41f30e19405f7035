"""Hub ids: telling a Hugging Face Hub repository id from a local path, and fetching with one clear error when
the hub cannot be reached (offline mode or no network)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from mass.files.checkpoints import CheckpointError

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class HubUnavailableError(CheckpointError):
    """A hub id was given but the Hugging Face Hub cannot be reached (offline mode or no network)."""


def hub_offline() -> Optional[str]:
    """The offline-mode variable that is set (``HF_HUB_OFFLINE`` first), or None."""
    return next((v for v in _OFFLINE_VARS if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")),
                None)


_FILE_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".json"}


def is_hub_id(source) -> bool:
    """A string that is not an existing local path and has the shape of a hub repository id (``name`` or
    ``owner/name``; a checkpoint file name such as ``ckpts/cars.safetensors`` is taken for a path)."""
    return (isinstance(source, str) and not Path(source).exists() and bool(_HUB_ID.match(source))
            and Path(source).suffix.lower() not in _FILE_SUFFIXES)


def from_hub(what: str, source: str, load):
    """``load()`` for a hub id, with one clear error when offline (names the id and ``HF_HUB_OFFLINE``)."""
    var = hub_offline()
    if var is not None:
        raise HubUnavailableError(
            f"{what} {source!r} is not a local path and {var} is set (offline): download it while online "
            f"(`hf download {source}`) and pass the local directory, or unset {var}"
        )
    try:
        return load()
    except OSError as exc:  # transformers / huggingface_hub raise OSError subclasses for unreachable repos
        raise HubUnavailableError(
            f"cannot fetch {what} {source!r} from the Hugging Face Hub ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); without network, download it elsewhere and pass "
            f"the local directory (HF_HUB_OFFLINE=1 makes this fail at once)"
        ) from exc
