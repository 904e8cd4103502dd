"""murmur's Python client: spawn agents on warm-pool VMs, follow them, flush and configure pools.

Async first (the Temporal SDK is asyncio)::

    import asyncio, murmur

    async def main() -> None:
        mm = await murmur.Murmur.from_config()          # .murmur/, MURMUR_TOKEN, TEMPORAL_*
        agent = await mm.spawn("fix-1", ["sh", "-c", "echo hello"])
        status = await agent.wait(murmur.Phase.COMPLETED)
        print(status.exit_code, status.output_tail)

    asyncio.run(main())

:mod:`murmur.sync` wraps the same API for code without an event loop.
"""

from .client import Agent, Config, Murmur, Pool
from .config import Context, resolve
from .errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MurmurError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from .messages import AgentStatus, FlushResult, NukeResult, OnIdle, Phase
from .signing import Credential, canonical_body, signing_bytes, verify_signature

__all__ = [
    "Agent",
    "AgentStatus",
    "Config",
    "Context",
    "Credential",
    "FailedPrecondition",
    "FlushResult",
    "Internal",
    "InvalidArgument",
    "Murmur",
    "MurmurError",
    "NotFound",
    "NukeResult",
    "OnIdle",
    "PermissionDenied",
    "Phase",
    "Pool",
    "Unauthenticated",
    "Unavailable",
    "canonical_body",
    "resolve",
    "signing_bytes",
    "verify_signature",
]
