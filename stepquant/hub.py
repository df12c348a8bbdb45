"""The Hugging Face Hub: resolving a repo id to a local snapshot, and publishing a checkpoint folder.

Authentication and offline mode come from huggingface_hub itself (`HF_TOKEN` or the login cache,
`HF_HUB_OFFLINE`, `HF_ENDPOINT`); stepquant never reads, prints or stores a token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from . import __version__
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


# ---------------------------------------------------------------------------------------------------
# Publishing

# Never uploaded: unfinished files, stepquant's journal and lock, caches, VCS and editor leftovers.
NEVER_UPLOADED = ("*.partial", ".stepquant-journal.json", ".stepquant.lock", ".stepquant-work/*", "*.lock", "gpqa-answers.jsonl",
                  ".cache/*", "__pycache__/*", ".git/*", ".huggingface/*", ".DS_Store", "*.tmp", "*~")  # fmt: skip
REPORT_FILES = ("report.json", "report.md", "*.png")  # what of a verify report goes up, under verify/
REPORT_DIR = "verify"


@dataclass
class PushOptions:
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    dry_run: bool = False
    force: bool = False
    regenerate_card: bool = False
    report: str | None = None  # a `stepquant verify --report` folder; default DST/verify when it has one
    base_model: str | None = None


@dataclass
class PushResult:
    files: list[tuple[str, int]]  # (path in the repo, bytes), everything that belongs in the repo
    card: Path
    card_written: bool
    uploaded: list[str] = field(default_factory=list)  # paths whose content was new to the Hub
    url: str | None = None  # the commit or pull request


def upload_plan(dst: Path, report: Path | None) -> list[tuple[str, Path]]:
    """(path in the repo, local file) for every file `push` uploads, sorted: DST's files minus what is
    never uploaded, plus the verify report's files under verify/."""
    files: dict[str, Path] = {}
    for path in sorted(dst.rglob("*")):
        rel = path.relative_to(dst).as_posix()
        if path.is_file() and not any(fnmatch(rel, pat) or fnmatch(path.name, pat) for pat in NEVER_UPLOADED):
            if path.is_symlink() and not path.resolve().is_relative_to(dst.resolve()):
                raise StepquantError(f"{path}: a link out of the folder; refusing to upload what it points to")
            files[rel] = path
    if report is not None:
        for path in sorted(report.iterdir()):
            if path.is_file() and any(fnmatch(path.name, pat) for pat in REPORT_FILES):
                files.setdefault(f"{REPORT_DIR}/{path.name}", path)
    return sorted(files.items())


def _check_complete(dst: Path, force: bool) -> dict:
    """Refuse a folder that is not a finished stepquant output, or that `check` finds defects in;
    returns its manifest ({} when forced past a missing one)."""
    from .check import check_checkpoint
    from .convert import MANIFEST

    if dst.name.endswith(".partial"):
        raise StepquantError(f"{dst}: an unfinished conversion; finish it with convert --resume")
    try:
        manifest = json.loads((dst / MANIFEST).read_text())
    except FileNotFoundError:
        if force:
            return {}
        raise StepquantError(f"{dst}: no {MANIFEST}, so not a finished stepquant output (--force to push anyway)") from None
    except ValueError as exc:
        raise StepquantError(f"{dst / MANIFEST}: not valid JSON ({exc})") from None
    if force:
        return manifest
    for name, meta in (manifest.get("outputs") or {}).items():
        path = dst / name
        if not path.is_file() or path.stat().st_size != meta.get("bytes"):
            raise StepquantError(f"{path}: missing or not the size {MANIFEST} records; the folder is incomplete (--force to push anyway)")
    rep = check_checkpoint(dst)
    if rep.defects:
        raise StepquantError(f"{dst}: check finds {len(rep.defects)} defect(s), first: {rep.defects[0]} (--force to push anyway)")
    return manifest


def push(dst: str | Path, repo_id: str, opts: PushOptions | None = None, echo=print) -> PushResult:
    """Publish the checkpoint folder `dst` to the Hub repo `repo_id`: check it, write its model card,
    create the repo, and commit every file the Hub does not already have (a rerun after an interruption
    sends only what is missing). With `dry_run`, write the card and list the files, uploading nothing."""
    from huggingface_hub import constants

    from .card import card_inputs, write_card

    opts = opts or PushOptions()
    dst = Path(dst)
    if not REPO_ID.match(repo_id):
        raise StepquantError(f"{repo_id}: not a Hub repo id (org/name)")
    if not dst.is_dir():
        raise StepquantError(f"{dst}: no such folder")
    manifest = _check_complete(dst, opts.force)
    report_dir = Path(opts.report) if opts.report else dst / REPORT_DIR
    report = None
    if (report_dir / "report.json").is_file():
        try:
            report = json.loads((report_dir / "report.json").read_text())
        except ValueError as exc:
            raise StepquantError(f"{report_dir / 'report.json'}: not valid JSON ({exc})") from None
    elif opts.report:
        raise StepquantError(f"{report_dir}: no report.json (write one with stepquant verify --report)")
    else:
        report_dir = None
    plots = tuple(f"{REPORT_DIR}/{p.name}" for p in sorted(report_dir.glob("*.png"))) if report_dir else ()
    card, written = write_card(card_inputs(dst, repo_id, opts.base_model, manifest, report, plots), opts.regenerate_card)
    echo(f"{card}: {'written' if written else 'kept (--regenerate-card to replace it)'}")
    files = upload_plan(dst, report_dir)
    result = PushResult([(rel, p.stat().st_size) for rel, p in files], card, written)
    if opts.dry_run:
        return result
    if constants.HF_HUB_OFFLINE:
        raise StepquantError("HF_HUB_OFFLINE is set: cannot push (--dry-run shows what would go up)")
    result.uploaded, result.url = _upload(repo_id, files, opts, dst.name)
    return result


def _upload(repo_id: str, files: list[tuple[str, Path]], opts: PushOptions, name: str) -> tuple[list[str], str]:
    """create_repo, then one commit of every file: huggingface_hub leaves out files whose content the
    Hub already has at that path (preupload) and LFS objects it already stores (an interrupted run's)."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=opts.private, exist_ok=True, repo_type="model")
        if opts.revision and not opts.create_pr:
            api.create_branch(repo_id, branch=opts.revision, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
        info = api.create_commit(
            repo_id, ops, commit_message=opts.commit_message or f"Upload {name} with stepquant {__version__}",
            revision=opts.revision, create_pr=opts.create_pr, num_threads=8,
        )  # fmt: skip
    except HfHubHTTPError as exc:
        raise StepquantError(f"{repo_id}: the Hub refused: {_one_line(exc)}") from None
    except Exception as exc:  # network, file and protocol errors alike: one line, resumable
        raise StepquantError(f"{repo_id}: upload failed: {_one_line(exc)}; run the same command again to resume") from None
    # what the Hub did not already hold at that path (from huggingface_hub's preupload answer)
    remote = {op.path_in_repo: getattr(op, "_remote_oid", None) for op in ops}
    sent = [op.path_in_repo for op in ops if remote[op.path_in_repo] is None or remote[op.path_in_repo] != op._local_oid]
    return sent, info.pr_url or info.commit_url


def _one_line(exc: BaseException) -> str:
    """An exception as one line, with any token that huggingface_hub knows of removed."""
    from huggingface_hub import get_token

    def first(e: BaseException) -> str:
        return (str(e).splitlines() or [type(e).__name__])[0]

    msg = first(exc) + (f" ({first(exc.__cause__)})" if exc.__cause__ is not None else "")
    token = get_token()
    return msg.replace(token, "<token>") if token else msg
