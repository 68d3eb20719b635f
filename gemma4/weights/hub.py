"""Where a checkpoint lives: a local path, or a Hugging Face Hub id fetched through its cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

# What a text checkpoint needs; the (large) vision/audio-only files are still shards of the same model.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory or .gguf file; otherwise a Hub repo id downloaded (or found in the cache)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if not (path / "config.json").exists() and len(ggufs) == 1:
                return ggufs[0]
        return path
    text = str(path_or_id)
    if not _REPO_ID.match(text) or text.startswith((".", "/")):
        raise CheckpointError(f"{text} does not exist; give a checkpoint directory, a .gguf file or a Hub id "
                              "such as google/gemma-4-E2B-it")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{text} is not a model on the Hugging Face Hub (or it is gated: run "
                              "`huggingface-cli login` after accepting its licence)") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{text} is not in the local Hugging Face cache and the Hub cannot be reached; "
                              "connect to the internet once, or pass a local directory") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"could not download {text} from the Hugging Face Hub: {e}") from None
