"""Finding tenant, workspace, developer and credential as the CLI does (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import murmur
from murmur.config import resolve

from conftest import VECTORS

CREDENTIAL = json.loads(VECTORS.read_text())["credential"]
TOKEN, KEY = CREDENTIAL.split("~", 1)


def project(tmp_path: Path, shared: str, local: str | None = None) -> Path:
    (tmp_path / ".murmur").mkdir()
    (tmp_path / ".murmur" / "murmur.yaml").write_text(shared)
    if local is not None:
        (tmp_path / ".murmur" / "murmur.local.yaml").write_text(local)
    sub = tmp_path / "src" / "deep"
    sub.mkdir(parents=True)
    return sub


def test_the_project_is_found_upwards_and_the_token_names_the_developer(tmp_path: Path) -> None:
    cwd = project(
        tmp_path,
        "tenant: acme\nworkspace: web\n",
        f"developer: someone-else\nidentity_token: {TOKEN}\nidentity_key: {KEY}\n",
    )
    ctx = resolve(cwd, env={})
    assert (ctx.tenant, ctx.workspace, ctx.developer) == ("acme", "web", "ana")
    assert ctx.credential is not None and ctx.task_queue == "murmur"


def test_workspace_precedence_is_argument_env_local_shared(tmp_path: Path) -> None:
    cwd = project(tmp_path, "tenant: acme\nworkspace: shared\n", "workspace: local\n")
    assert resolve(cwd, env={}).workspace == "local"
    assert resolve(cwd, env={"MURMUR_WORKSPACE": "fromenv"}).workspace == "fromenv"
    assert resolve(cwd, env={"MURMUR_WORKSPACE": "fromenv"}, workspace="flag").workspace == "flag"
    assert resolve(cwd, env={"MURMUR_TENANT": "other", "MURMUR_TASK_QUEUE": "q"}).tenant == "other"
    assert resolve(cwd, env={"MURMUR_TASK_QUEUE": "q"}).task_queue == "q"


def test_murmur_token_wins_over_the_local_file(tmp_path: Path) -> None:
    cwd = project(tmp_path, "tenant: acme\n", "identity_token: x.y.z\nidentity_key: nope\n")
    ctx = resolve(cwd, env={"MURMUR_TOKEN": CREDENTIAL})
    assert ctx.developer == "ana"


@pytest.mark.parametrize(
    ("shared", "env", "error", "text"),
    [
        ("tenant: acme\nbogus: 1\n", {}, murmur.InvalidArgument, "unknown field `bogus`"),
        ("tenant: [unclosed\n", {}, murmur.InvalidArgument, "murmur.yaml"),
        ("workspace: web\n", {}, murmur.FailedPrecondition, "no tenant configured"),
        ("tenant: Acme\n", {}, murmur.InvalidArgument, 'invalid tenant "Acme"'),
        ("tenant: acme\n", {"MURMUR_WORKSPACE": "Bad_Name"}, murmur.InvalidArgument, "invalid workspace name"),
        ("tenant: acme\n", {"MURMUR_TOKEN": "not-a-credential"}, murmur.Unauthenticated, "MURMUR_TOKEN is not a credential"),
        ("tenant: acme\n", {"MURMUR_TOKEN": "a.b.c~AAAA"}, murmur.Unauthenticated, "not usable"),
    ],
)
def test_bad_config_is_a_clear_error(
    tmp_path: Path, shared: str, env: dict[str, str], error: type[murmur.MurmurError], text: str
) -> None:
    cwd = project(tmp_path, shared)
    with pytest.raises(error) as caught:
        resolve(cwd, env=env)
    assert text in str(caught.value)
    assert str(caught.value).startswith(error.code + ": ")


def test_without_a_credential_a_signed_request_is_unauthenticated(tmp_path: Path) -> None:
    ctx = resolve(project(tmp_path, "tenant: acme\n"), env={"USER": "bo"})
    assert ctx.developer == "bo"
    with pytest.raises(murmur.Unauthenticated, match="identity token is missing or expired"):
        ctx.require_credential()
