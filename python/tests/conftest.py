"""Fixtures: a real ``murmur-worker`` (process substrate) on its own task queue and state dir,
against the Temporal server at ``TEMPORAL_ADDRESS`` (the dev server ``./devserver.sh start``
runs), and credentials it issued.

``MURMUR_BIN_DIR`` names the directory holding the built ``murmur`` and ``murmur-worker``
(``./devserver.sh test`` sets it; default ``$CARGO_TARGET_DIR/debug``, else ``target/debug``).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import pytest_asyncio

import murmur

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "vectors" / "signing.json"


def bin_dir() -> Path:
    """Where the built binaries are."""
    if os.environ.get("MURMUR_BIN_DIR"):
        return Path(os.environ["MURMUR_BIN_DIR"])
    target = os.environ.get("CARGO_TARGET_DIR") or str(REPO / "target")
    return Path(target) / "debug"


@dataclass
class Deployment:
    """One worker of a private deployment: its task queue, state dir, tenant and address."""

    tenant: str
    task_queue: str
    state_dir: Path
    address: str
    log: Path
    worker: subprocess.Popen[bytes] | None = None
    credentials: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for the CLI and the worker of this deployment."""
        env = dict(os.environ)
        env.update(
            MURMUR_TASK_QUEUE=self.task_queue,
            MURMUR_STATE_DIR=str(self.state_dir),
            TEMPORAL_ADDRESS=self.address,
            MURMUR_SUBSTRATE="process",
        )
        env.pop("MURMUR_TOKEN", None)
        env.update(extra)
        return env

    def issue(self, developer: str, role: str, ttl: str = "1h") -> str:
        """A credential issued with this deployment's worker key."""
        out = subprocess.run(
            [str(bin_dir() / "murmur-worker"), "token", "issue", "--tenant", self.tenant,
             "--developer", developer, "--role", role, "--ttl", ttl],
            env=self.env(), capture_output=True, text=True, check=False,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def cli(self, args: list[str], credential: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        """Runs the ``murmur`` CLI of this deployment with ``credential`` from ``cwd``."""
        return subprocess.run(
            [str(bin_dir() / "murmur"), *args],
            env=self.env(MURMUR_TOKEN=credential, MURMUR_TENANT=self.tenant),
            cwd=cwd, capture_output=True, text=True, check=False, timeout=120,
        )

    async def client(self, credential: str, workspace: str = "default") -> murmur.Murmur:
        """A client of this deployment acting with ``credential``."""
        return await murmur.Murmur.connect(
            tenant=self.tenant, credential=credential, workspace=workspace,
            address=self.address, task_queue=self.task_queue,
        )


@pytest.fixture(scope="session")
def deployment() -> Iterator[Deployment]:
    """A worker of a private deployment, for the whole session; on the way out the tenant is
    nuked (every VM deleted) and the worker stopped."""
    for name in ("murmur", "murmur-worker"):
        assert (bin_dir() / name).is_file(), (
            f"{bin_dir() / name} is missing: build it (cargo build) or set MURMUR_BIN_DIR"
        )
    suffix = secrets.token_hex(4)
    with tempfile.TemporaryDirectory(prefix="mmpy") as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        dep = Deployment(
            tenant=f"py{suffix}",
            task_queue=f"py-{suffix}",
            state_dir=state,
            address=os.environ.get("TEMPORAL_ADDRESS", "127.0.0.1:7233"),
            log=Path(tmp) / "worker.log",
        )
        # Issue first: the worker key is made by the first user of the state dir.
        dep.credentials["admin"] = dep.issue("ana", "murmur-tenant-admin")
        with dep.log.open("ab") as log:
            dep.worker = subprocess.Popen(
                [str(bin_dir() / "murmur-worker")],
                env=dep.env(RUST_LOG="info,temporalio_sdk_core=warn"),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        try:
            yield dep
        finally:
            project = Path(tmp) / "project"
            project.mkdir(exist_ok=True)
            nuke = dep.cli(["pool", "flush", "--nuke"], dep.credentials["admin"], project)
            dep.worker.send_signal(signal.SIGTERM)
            try:
                dep.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                dep.worker.kill()
                dep.worker.wait()
            # Nothing of this session may stay behind, whatever the tests did.
            subprocess.run(["pkill", "-f", f"murmur-worker sandbox --dir {state}"], check=False)
            if nuke.returncode != 0:
                print(dep.log.read_text(errors="replace")[-4000:])
            assert nuke.returncode == 0, f"the closing nuke failed: {nuke.stderr}"


@pytest_asyncio.fixture(scope="session")
async def admin(deployment: Deployment) -> AsyncIterator[murmur.Murmur]:
    """A tenant admin's client, with workspace `default` at `min_idle: 1`."""
    mm = await deployment.client(deployment.credentials["admin"])
    await mm.config.set("workspace", "default", {"min_idle": 1})
    yield mm
