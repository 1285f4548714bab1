"""Where a translation model's files come from, decided before transformers is asked.

Why: given a Hugging Face id that is not in the local cache on a host without network and
without HF_HUB_OFFLINE, transformers and huggingface_hub retry the hub for minutes before they
give up (issue 18: `run -w subtitle -s en -t fr` with no NLLB weights took 205 s to fail its
branch, three setup attempts of about a minute each). So:

- a local folder, or an id already in the Hugging Face cache: loaded with `local_files_only`
  (no hub request at all, online or not);
- HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set and the id not cached: fail at once;
- else one HEAD request to the hub (HF_ENDPOINT, default huggingface.co) with a
  HUB_PROBE_TIMEOUT_S timeout: no answer fails at once, naming HF_HUB_OFFLINE and the model
  variable to set; an answer (any HTTP status) lets transformers download as before.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

HUB_PROBE_TIMEOUT_S = 5.0
_TRUE = {"1", "true", "yes", "on"}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def local_files_only(source: str, model_env: str | None, what: str) -> bool:
    """Whether `source` (a folder or a Hugging Face id) must load from local files only; raises
    RuntimeError with the fix when it cannot load at all (see the module docstring)."""
    if Path(source).is_dir() or _cached(source):
        return True
    setting = f"set {model_env} (or --option model=)" if model_env else "set --option model="
    fix = (f"{setting} to a local folder saved with save_pretrained, or fill the Hugging Face cache "
           f"(HF_HOME) with {source!r} on a host with network")
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        raise RuntimeError(f"cannot load the {what} {source!r}: it is not in the local Hugging Face cache "
                           f"and HF_HUB_OFFLINE is set; {fix}")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    reason = _unreachable(endpoint)
    if reason is not None:
        raise RuntimeError(f"cannot load the {what} {source!r}: it is not in the local Hugging Face cache and "
                           f"{endpoint} does not answer ({reason}); {fix}; set HF_HUB_OFFLINE=1 on hosts "
                           "without network so nothing waits on the hub")
    return False


def _cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - every translation env has it (transformers needs it)
        return False
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid id: transformers' own error says so
        return False
    return isinstance(found, str)


def _unreachable(endpoint: str) -> str | None:
    """None when the hub answers within HUB_PROBE_TIMEOUT_S (any HTTP status), else why not."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except Exception as e:
        return f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
    return None
