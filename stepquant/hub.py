"""The Hugging Face Hub: resolving a repo id to a local snapshot (and, later, publishing).

Authentication and offline mode come from huggingface_hub itself (`HF_TOKEN` or the login cache,
`HF_HUB_OFFLINE`, `HF_ENDPOINT`); stepquant never reads, prints or stores a token.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import StepquantError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# What a conversion needs from a model repo: weights, index, configs, tokenizer and processor files.
SNAPSHOT_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.txt",
    "*.model",
    "*.jinja",
    "*.tiktoken",
    "*.py",
    "*.md",
]


def is_repo_id(src: str) -> bool:
    """True when `src` reads as `org/name` and is not an existing local path."""
    return bool(REPO_ID.match(src)) and not Path(src).exists()


def snapshot(repo_id: str, revision: str | None = None) -> tuple[Path, str | None]:
    """Download (or reuse from cache) a model snapshot; returns its folder and commit hash."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=SNAPSHOT_PATTERNS))
    except RepositoryNotFoundError:
        raise StepquantError(f"{repo_id}: no such Hub repo, or it is gated and no token grants access") from None
    except LocalEntryNotFoundError:
        raise StepquantError(
            f"{repo_id}: not in the local cache and the Hub cannot be reached (HF_HUB_OFFLINE or no network)"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StepquantError(f"{repo_id}: download failed: {msg}") from None
    commit = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None
    return path, commit
