"""Who and where the client acts for, found exactly as the ``murmur`` CLI finds it.

- The project: the first directory from the current one upwards holding
  ``.murmur/murmur.yaml`` (``tenant:``, ``workspace:``).
- ``.murmur/murmur.local.yaml`` (per developer, mode 0600): ``developer``,
  ``identity_token``, ``identity_key``, ``workspace``.
- Environment: ``MURMUR_TENANT`` (over the shared file), ``MURMUR_WORKSPACE`` (over both
  files), ``MURMUR_TOKEN`` (a ``<token>~<private key>`` credential, over the local file),
  ``MURMUR_DEVELOPER`` / ``USER``, ``MURMUR_TASK_QUEUE`` (default ``murmur``).
- Workspace order: explicit argument > ``MURMUR_WORKSPACE`` > local file > shared file >
  ``default``. The developer is the one the token names.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import FailedPrecondition, InvalidArgument, Unauthenticated
from .signing import Credential

#: Directory holding the config files.
CONFIG_DIR = ".murmur"
#: The shared config file.
SHARED_FILE = "murmur.yaml"
#: The per-developer config file.
LOCAL_FILE = "murmur.local.yaml"
#: The task queue workers poll unless ``MURMUR_TASK_QUEUE`` says otherwise.
DEFAULT_TASK_QUEUE = "murmur"

_DNS_LABEL = re.compile(r"[a-z][a-z0-9-]{0,62}")
_SHARED_KEYS = {"tenant", "workspace"}
_LOCAL_KEYS = {"developer", "identity_token", "identity_key", "workspace"}


def is_dns_label(name: str) -> bool:
    """``[a-z][a-z0-9-]{0,62}``: tenants, workspaces and slugs."""
    return _DNS_LABEL.fullmatch(name) is not None


def validate_label(what: str, name: str) -> None:
    """Raises ``InvalidArgument`` unless ``name`` is a DNS label (as the CLI words it)."""
    if not is_dns_label(name):
        raise InvalidArgument(f"invalid {what} {json.dumps(name)}: must match [a-z][a-z0-9-]{{0,62}}")


@dataclass(frozen=True)
class Context:
    """Where the client acts: tenant, workspace, developer, credential, task queue."""

    tenant: str
    workspace: str
    developer: str
    credential: Credential | None
    task_queue: str = DEFAULT_TASK_QUEUE
    project_dir: Path | None = None

    def require_credential(self) -> Credential:
        """The credential, or the CLI's ``UNAUTHENTICATED`` when there is none."""
        if self.credential is None:
            raise Unauthenticated("identity token is missing or expired")
        return self.credential


def find_project(start: Path) -> Path | None:
    """The first directory from ``start`` upwards holding ``.murmur/murmur.yaml``."""
    for directory in (start, *start.parents):
        if (directory / CONFIG_DIR / SHARED_FILE).is_file():
            return directory
    return None


def _read_yaml(path: Path, allowed: set[str]) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise FailedPrecondition(f"cannot read {path}: {e}") from None
    if not text.strip():
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidArgument(f"{path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path}: expected a mapping of {', '.join(sorted(allowed))}")
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise InvalidArgument(
            f"{path}: unknown field `{unknown[0]}`, expected one of {', '.join(sorted(allowed))}"
        )
    for key, value in data.items():
        if value is not None and not isinstance(value, str):
            raise InvalidArgument(f"{path}: `{key}` must be a string")
    return data


def resolve(
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    workspace: str | None = None,
) -> Context:
    """Resolves the context from ``cwd`` (default: the current directory) and ``env``
    (default: the process environment), as the CLI does."""
    cwd = Path.cwd() if cwd is None else cwd
    env = os.environ if env is None else env

    def var(name: str) -> str | None:
        value = env.get(name)
        return value if value else None

    project = find_project(cwd)
    shared: dict[str, Any] = {}
    local: dict[str, Any] = {}
    if project is not None:
        shared = _read_yaml(project / CONFIG_DIR / SHARED_FILE, _SHARED_KEYS)
        local = _read_yaml(project / CONFIG_DIR / LOCAL_FILE, _LOCAL_KEYS)
    tenant = var("MURMUR_TENANT") or shared.get("tenant")
    if not tenant:
        raise FailedPrecondition(
            f"no tenant configured: create {CONFIG_DIR}/{SHARED_FILE} with `tenant:` and "
            f"`workspace:` (searched from {cwd} upwards), or set MURMUR_TENANT"
        )
    validate_label("tenant", tenant)
    chosen = workspace or var("MURMUR_WORKSPACE") or local.get("workspace") or shared.get("workspace") or "default"
    validate_label("workspace name", chosen)
    credential: Credential | None
    token = var("MURMUR_TOKEN")
    if token is not None:
        if "~" not in token:
            raise Unauthenticated("MURMUR_TOKEN is not a credential (<token>~<private key>)")
        credential = Credential.parse(token)
    elif local.get("identity_token") and local.get("identity_key"):
        credential = Credential.from_parts(local["identity_token"], local["identity_key"])
    else:
        credential = None
    developer = (
        (credential.developer if credential is not None else None)
        or local.get("developer")
        or var("MURMUR_DEVELOPER")
        or var("USER")
        or "unknown"
    )
    return Context(
        tenant=tenant,
        workspace=chosen,
        developer=developer,
        credential=credential,
        task_queue=var("MURMUR_TASK_QUEUE") or DEFAULT_TASK_QUEUE,
        project_dir=project,
    )
