"""A thin synchronous wrapper over :mod:`murmur.client`, for scripts without an event loop.

Each object runs the async API on one private event loop::

    from murmur.sync import Murmur

    mm = Murmur.from_config()
    agent = mm.spawn("fix-1", ["sh", "-c", "echo hello"])
    print(agent.wait("completed").output_tail)
    mm.close()
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, Mapping, Sequence, TypeVar

from . import client as aio
from .messages import AgentStatus, FlushResult, NukeResult, OnIdle, Phase

T = TypeVar("T")


class Murmur:
    """The synchronous counterpart of :class:`murmur.Murmur` (same methods, blocking)."""

    def __init__(self, inner: aio.Murmur, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop

    @classmethod
    def from_config(cls, **kwargs: Any) -> "Murmur":
        """See :meth:`murmur.Murmur.from_config`."""
        loop = asyncio.new_event_loop()
        return cls(loop.run_until_complete(aio.Murmur.from_config(**kwargs)), loop)

    @classmethod
    def connect(cls, **kwargs: Any) -> "Murmur":
        """See :meth:`murmur.Murmur.connect`."""
        loop = asyncio.new_event_loop()
        return cls(loop.run_until_complete(aio.Murmur.connect(**kwargs)), loop)

    def close(self) -> None:
        """Closes the private event loop."""
        self._loop.close()

    def __enter__(self) -> "Murmur":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(work)

    def spawn(self, slug: str, command: Sequence[str], on_idle: OnIdle | str = OnIdle.TERMINATE) -> "Agent":
        """See :meth:`murmur.Murmur.spawn`."""
        return Agent(self, self._run(self._inner.spawn(slug, command, on_idle)))

    def agent(self, slug: str) -> "Agent":
        """See :meth:`murmur.Murmur.agent`."""
        return Agent(self, self._inner.agent(slug))

    @property
    def pool(self) -> "Pool":
        """See :attr:`murmur.Murmur.pool`."""
        return Pool(self, self._inner.pool)

    @property
    def config(self) -> "Config":
        """See :attr:`murmur.Murmur.config`."""
        return Config(self, self._inner.config)


class Agent:
    """The synchronous counterpart of :class:`murmur.Agent`."""

    def __init__(self, owner: Murmur, inner: aio.Agent) -> None:
        self._owner = owner
        self._inner = inner
        self.slug = inner.slug
        """The agent's name."""

    def status(self) -> AgentStatus:
        """See :meth:`murmur.Agent.status`."""
        return self._owner._run(self._inner.status())

    def wait(self, phase: Phase | str = Phase.COMPLETED, timeout: float | None = None) -> AgentStatus:
        """See :meth:`murmur.Agent.wait`."""
        return self._owner._run(self._inner.wait(phase, timeout))

    def sleep(self) -> AgentStatus:
        """See :meth:`murmur.Agent.sleep`."""
        return self._owner._run(self._inner.sleep())

    def wake(self) -> AgentStatus:
        """See :meth:`murmur.Agent.wake`."""
        return self._owner._run(self._inner.wake())

    def set_on_idle(self, on_idle: OnIdle | str) -> AgentStatus:
        """See :meth:`murmur.Agent.set_on_idle`."""
        return self._owner._run(self._inner.set_on_idle(on_idle))

    def kill(self) -> None:
        """See :meth:`murmur.Agent.kill`."""
        self._owner._run(self._inner.kill())


class Pool:
    """The synchronous counterpart of :class:`murmur.Pool`."""

    def __init__(self, owner: Murmur, inner: aio.Pool) -> None:
        self._owner = owner
        self._inner = inner

    def status(self) -> dict[str, Any]:
        """See :meth:`murmur.Pool.status`."""
        return self._owner._run(self._inner.status())

    def up(self) -> dict[str, Any]:
        """See :meth:`murmur.Pool.up`."""
        return self._owner._run(self._inner.up())

    def flush(self, nuke: bool = False) -> FlushResult | NukeResult:
        """See :meth:`murmur.Pool.flush`."""
        return self._owner._run(self._inner.flush(nuke))


class Config:
    """The synchronous counterpart of :class:`murmur.Config`."""

    def __init__(self, owner: Murmur, inner: aio.Config) -> None:
        self._owner = owner
        self._inner = inner

    def get(self) -> dict[str, Any]:
        """See :meth:`murmur.Config.get`."""
        return self._owner._run(self._inner.get())

    def patch(self, kind: str, name: str, **fields: Any) -> dict[str, Any]:
        """See :meth:`murmur.Config.patch`."""
        return self._owner._run(self._inner.patch(kind, name, **fields))

    def set(self, kind: str, name: str, spec: Mapping[str, Any], expected_generation: int | None = None) -> dict[str, Any]:
        """See :meth:`murmur.Config.set`."""
        return self._owner._run(self._inner.set(kind, name, spec, expected_generation))
