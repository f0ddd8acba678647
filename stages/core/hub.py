"""Downloads from the Hugging Face Hub (the base model's files, the data sets) at pinned revisions, with
every hub or network failure turned into one line that names the repo and revision and says what to do.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

from stages.core.cli import StageError

log = logging.getLogger(__name__)
# Seconds to wait for the hub's first answer: with the up to 3 s of huggingface_hub's own best-effort request
# before it (its agent registry, fetched once a day) and a stage's imports, a hub that answers nothing fails a
# stage well within 15 s.
PROBE_TIMEOUT = 5


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(source: str) -> bool:
    """A hub id looks like owner/name and is not an existing or explicitly local path."""
    explicit_path = source.startswith(("/", "./", "../", "~")) or source.endswith((".parquet", ".jsonl", ".json"))
    return not explicit_path and not Path(source).exists() and bool(HUB_ID.match(source))


class HubError(StageError):
    """A hub download failed."""


def one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _reason(error: BaseException) -> str:
    """What went wrong, short: the HTTP status and the hub's own message, or the exception's first words."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError) and error.response is not None:
        message = " ".join((error.server_message or "").split())
        return f"HTTP {error.response.status_code}{': ' + message if message else ''}"
    return f"{type(error).__name__}: {one_line(error)}"


def _unreachable(error: BaseException) -> bool:
    """A failure of the network or of the hub itself (not an answer about the repo): the cache may serve."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        return status is None or status >= 500 or status in (408, 429)
    return isinstance(error, httpx.TransportError | OfflineModeIsEnabled | LocalEntryNotFoundError)


def _hub_problem(error: BaseException, repo_id: str, revision: str, repo_type: str, key: str, cached: bool) -> str:
    """The one line for a failed hub download: what failed, for which repo and revision, what to do."""
    from huggingface_hub import constants, is_offline_mode
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    kind = "model" if repo_type == "model" else "dataset"
    field = f"{key}.name" if repo_type == "model" else f"{key}.source"
    what = f"the {kind} {repo_id} at revision {revision}"
    hub = f"the Hugging Face Hub at {constants.ENDPOINT}"
    status = error.response.status_code if isinstance(error, HfHubHTTPError) and error.response is not None else None
    if isinstance(error, RevisionNotFoundError):
        return (f"the {kind} {repo_id} has no revision {revision} on {hub} ({_reason(error)}): set {key}.revision in "
                "params.yaml to a commit SHA, branch or tag of it")
    if isinstance(error, GatedRepoError):
        return (f"{what} is gated on {hub} ({_reason(error)}): accept its terms on its page, then set HF_TOKEN to a "
                "token of that account")
    if isinstance(error, RepositoryNotFoundError):
        return (f"{hub} has no {kind} {repo_id} that this machine may read ({_reason(error)}; revision {revision}): "
                f"check {field} in params.yaml (owner/name); if the repo is private or gated, set HF_TOKEN to a token "
                "that can read it")
    if status in (401, 403):
        return (f"{hub} refused {what} ({_reason(error)}): HF_TOKEN is missing, invalid or cannot read this repo; "
                f"set it to a token that can, or check {field} in params.yaml")
    if _unreachable(error):
        offline = is_offline_mode()
        reason = "HF_HUB_OFFLINE is set" if offline else f"{hub} is unreachable ({_reason(error)})"
        repo_type_option = "" if repo_type == "model" else " --repo-type dataset"
        return (f"cannot download {what}: {reason}{', and it is not in the local Hugging Face cache' if cached else ''}"
                f". {'Unset HF_HUB_OFFLINE' if offline else 'Fix the network (or HF_ENDPOINT)'}, or download it on a "
                f"machine with hub access (`hf download {repo_id}{repo_type_option} --revision {revision} --local-dir "
                f"DIR`), copy DIR here and set {field} in params.yaml to DIR")
    if isinstance(error, ValueError) and not isinstance(error, HfHubHTTPError):
        return (f"{field}={repo_id!r} is neither an existing local path nor a valid hub id (owner/name) with revision "
                f"{revision!r} ({one_line(error)}): fix it in params.yaml")
    return (f"could not download {what} ({_reason(error)}): check the free space and write access of the download "
            "folder and of the Hugging Face cache (HF_HOME)")


def hub_snapshot(repo_id: str, revision: str, *, repo_type: str, key: str, allow_patterns: list[str],
                 error: type[StageError] = HubError, prefix: str = "", local_dir: Path | None = None) -> Path:
    """The files of a hub repo that match allow_patterns, at revision: downloaded into local_dir, or (when it is
    None) into the Hugging Face cache, where a complete snapshot is reused and, when the hub cannot be
    reached or HF_HUB_OFFLINE is set, used as it is. `key` is the repo's params.yaml section (model, data,
    eval_data.NAME), for the message. Any failure raises `error` with one line, after `prefix`.

    The first request is HfApi.repo_info, made once with a timeout of PROBE_TIMEOUT seconds (or
    HF_HUB_ETAG_TIMEOUT where set), so a hub that cannot be reached or does not answer fails fast:
    snapshot_download's own first request has no timeout, and its per-file downloads retry for about 25 s
    when a file's metadata cannot be fetched."""
    import httpx
    from huggingface_hub import HfApi, constants, is_offline_mode, snapshot_download

    download = functools.partial(snapshot_download, repo_id, repo_type=repo_type, revision=revision,
                                 allow_patterns=allow_patterns, local_dir=local_dir)
    unreachable = None  # the network failure for which the cache is tried
    try:
        if not is_offline_mode():
            try:
                explicit = constants.HF_HUB_ETAG_TIMEOUT != constants.DEFAULT_ETAG_TIMEOUT
                HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision,
                                  timeout=constants.HF_HUB_ETAG_TIMEOUT if explicit else PROBE_TIMEOUT)
                return Path(download())
            except (httpx.HTTPError, OSError) as e:
                if local_dir is not None or not _unreachable(e):
                    raise
                unreachable = e
        folder = Path(download(local_files_only=True))
        if unreachable is not None:
            log.warning("the Hugging Face Hub is unreachable (%s); using the cached %s at revision %s in %s",
                        _reason(unreachable), repo_id, revision, folder)
        return folder
    except (httpx.HTTPError, OSError, ValueError) as e:
        problem = _hub_problem(unreachable or e, repo_id, revision, repo_type, key, cached=local_dir is None)
        raise error(prefix + problem) from e
