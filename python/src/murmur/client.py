"""The asyncio client: agents, the pool and its config, over the Temporal Python SDK.

It speaks the CLI's protocol without shelling out: the same workflow ids, updates and
queries, the same signed requests (see :mod:`murmur.signing`), the same errors.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence, TypeVar

import temporalio.client
import temporalio.common
import temporalio.envconfig
import temporalio.exceptions
import temporalio.service
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)

from . import config as config_mod
from . import messages as m
from .config import Context
from .errors import (
    FailedPrecondition,
    InvalidArgument,
    MurmurError,
    NotFound,
    Unavailable,
    from_failure,
    parse,
)
from .signing import Credential

T = TypeVar("T")

#: How often :meth:`Agent.wait` reads the agent's status.
WAIT_POLL = 0.2


def _search_attributes(tenant: str, kind: str, workspace: str | None = None) -> TypedSearchAttributes:
    pairs = [
        SearchAttributePair(SearchAttributeKey.for_keyword(m.SA_TENANT), tenant),
        SearchAttributePair(SearchAttributeKey.for_keyword(m.SA_KIND), kind),
    ]
    if workspace is not None:
        pairs.append(SearchAttributePair(SearchAttributeKey.for_keyword(m.SA_WORKSPACE), workspace))
    return TypedSearchAttributes(pairs)


def _failure_message(error: BaseException) -> str:
    """The innermost failure message of a Temporal error chain (where the worker's
    ``CODE: reason`` is)."""
    parts = []
    current: BaseException | None = error
    while current is not None:
        parts.append(getattr(current, "message", None) or str(current))
        current = getattr(current, "cause", None) or current.__cause__
    return " / ".join(p for p in parts if p)


def _map_error(error: BaseException, not_found: str) -> MurmurError:
    """Maps a Temporal SDK error onto murmur's error contract, as the CLI does."""
    if isinstance(error, MurmurError):
        return error
    if isinstance(error, temporalio.service.RPCError):
        if error.status == temporalio.service.RPCStatusCode.NOT_FOUND:
            return NotFound(not_found)
        return parse(error.message) or Unavailable(error.message)
    if isinstance(error, temporalio.client.WorkflowUpdateFailedError):
        text = _failure_message(error.cause)
        found = parse(text)
        if found is not None:
            return found
        if "ncoding" in text or "deserializ" in text:
            return InvalidArgument(text)
        return from_failure(text)
    if isinstance(error, temporalio.client.WorkflowQueryFailedError):
        return parse(error.message) or Unavailable(error.message)
    if isinstance(error, (temporalio.client.WorkflowFailureError, temporalio.exceptions.TemporalError)):
        return from_failure(_failure_message(error))
    return Unavailable(str(error))


async def _call(work: Awaitable[T], not_found: str) -> T:
    try:
        return await work
    except temporalio.exceptions.TemporalError as e:
        raise _map_error(e, not_found) from e


class Murmur:
    """A connection to murmur for one tenant, workspace and developer.

    Create it with :meth:`from_config` (reads ``.murmur/`` and the environment like the CLI)
    or :meth:`connect` (explicit arguments)."""

    def __init__(self, client: Client, context: Context) -> None:
        self.client = client
        """The Temporal client underneath."""
        self.context = context
        """Who and where this client acts for."""

    @classmethod
    async def from_config(
        cls,
        *,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        workspace: str | None = None,
        profile: str | None = None,
    ) -> "Murmur":
        """Reads ``.murmur/murmur.yaml``, ``murmur.local.yaml``, ``MURMUR_TOKEN`` and the
        Temporal environment configuration (``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``, TLS
        and API-key variables, config profiles) exactly as the CLI does, and connects."""
        context = config_mod.resolve(Path(cwd) if cwd is not None else None, env, workspace)
        client = await _connect_temporal(profile=profile, env=env)
        return cls(client, context)

    @classmethod
    async def connect(
        cls,
        *,
        tenant: str,
        credential: str | Credential | None,
        workspace: str = "default",
        address: str | None = None,
        namespace: str | None = None,
        task_queue: str = config_mod.DEFAULT_TASK_QUEUE,
        client: Client | None = None,
    ) -> "Murmur":
        """Connects with explicit settings: ``credential`` is ``<token>~<private key>`` (as
        ``murmur-worker token issue`` prints it); ``address``/``namespace`` default to the
        Temporal environment configuration; an existing Temporal ``client`` may be passed."""
        config_mod.validate_label("tenant", tenant)
        config_mod.validate_label("workspace name", workspace)
        cred = Credential.parse(credential) if isinstance(credential, str) else credential
        context = Context(
            tenant=tenant,
            workspace=workspace,
            developer=cred.developer if cred is not None else "unknown",
            credential=cred,
            task_queue=task_queue,
        )
        if client is None:
            client = await _connect_temporal(address=address, namespace=namespace)
        return cls(client, context)

    @property
    def pool(self) -> "Pool":
        """The tenant's pool."""
        return Pool(self)

    @property
    def config(self) -> "Config":
        """The tenant's resources (``pool-config`` and workspaces)."""
        return Config(self)

    def agent(self, slug: str) -> "Agent":
        """The developer's agent ``slug`` in the current workspace (need not exist)."""
        config_mod.validate_label("slug", slug)
        return Agent(self, slug)

    async def spawn(
        self,
        slug: str,
        command: Sequence[str],
        on_idle: m.OnIdle | str = m.OnIdle.TERMINATE,
    ) -> "Agent":
        """Starts an agent running ``command`` on a VM of the workspace and returns once the
        pool accepted its claim (or raises the pool's refusal)."""
        config_mod.validate_label("slug", slug)
        command = list(command)
        if not command or all(not w.strip() for w in command):
            raise InvalidArgument("a command is required: murmur spawn <slug> -- <command...>")
        if any("\0" in w for w in command):
            raise InvalidArgument("the command contains a NUL byte")
        ctx = self.context
        on_idle = m.OnIdle.parse(on_idle)
        message = m.agent_input(ctx.tenant, ctx.workspace, ctx.developer, slug, command, on_idle)
        agent = Agent(self, slug)
        message["auth"] = ctx.require_credential().sign(m.OP_SPAWN, agent.workflow_id, message)
        start: WithStartWorkflowOperation[Any, Any] = WithStartWorkflowOperation(
            m.AGENT_WORKFLOW,
            message,
            id=agent.workflow_id,
            task_queue=ctx.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            search_attributes=_search_attributes(ctx.tenant, "agent", ctx.workspace),
            memo={
                "workspace": ctx.workspace,
                "developer": ctx.developer,
                "command": " ".join(command),
                "on_idle": on_idle.value,
            },
            static_summary=f"agent {slug}: {' '.join(command)}",
        )
        try:
            await self.client.execute_update_with_start_workflow(
                "admission", None, start_workflow_operation=start
            )
        except temporalio.exceptions.WorkflowAlreadyStartedError:
            raise FailedPrecondition(
                f"agent {slug} is already running; kill it first (murmur kill {slug}) or pick another slug"
            ) from None
        except temporalio.exceptions.TemporalError as e:
            raise _map_error(e, "the agent ended before it was admitted") from e
        return agent

    async def _update_pool(self, update: str, arg: Mapping[str, Any]) -> Any:
        ctx = self.context
        start: WithStartWorkflowOperation[Any, Any] = WithStartWorkflowOperation(
            m.POOL_WORKFLOW,
            m.pool_input(ctx.tenant),
            id=m.pool_workflow_id(ctx.tenant),
            task_queue=ctx.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=_search_attributes(ctx.tenant, "pool"),
            static_summary=f"warm pool of tenant {ctx.tenant}",
        )
        return await _call(
            self.client.execute_update_with_start_workflow(update, dict(arg), start_workflow_operation=start),
            f"the pool of tenant {ctx.tenant} is not running; start it with murmur pool up",
        )


async def _connect_temporal(
    *,
    profile: str | None = None,
    env: Mapping[str, str] | None = None,
    address: str | None = None,
    namespace: str | None = None,
) -> Client:
    try:
        settings: dict[str, Any] = dict(
            temporalio.envconfig.ClientConfig.load_client_connect_config(
                profile=profile, override_env_vars=env
            )
        )
    except Exception as e:  # the SDK raises plain exceptions for bad config files
        raise InvalidArgument(f"Temporal client configuration: {e}") from None
    if address is not None:
        settings["target_host"] = address
    if namespace is not None:
        settings["namespace"] = namespace
    settings.setdefault("target_host", "localhost:7233")
    target = settings["target_host"]
    try:
        return await Client.connect(**settings)
    except Exception as e:  # connection failures surface as RuntimeError from the bridge
        raise Unavailable(
            f"cannot reach Temporal at {target}: {e} (is the dev server running? ./devserver.sh start)"
        ) from None


class Agent:
    """One agent of the developer (``agent/<tenant>/<workspace>/<developer>/<slug>``)."""

    def __init__(self, murmur: Murmur, slug: str) -> None:
        self._murmur = murmur
        self.slug = slug
        """The agent's name."""

    def __repr__(self) -> str:
        return f"Agent({self.workflow_id!r})"

    @property
    def workflow_id(self) -> str:
        """The agent's workflow id."""
        ctx = self._murmur.context
        return m.agent_workflow_id(ctx.tenant, ctx.workspace, ctx.developer, self.slug)

    def _not_found(self) -> str:
        return f"no agent with slug {self.slug}"

    async def _describe(self) -> tuple[temporalio.client.WorkflowHandle[Any, Any], Any]:
        handle = self._murmur.client.get_workflow_handle(self.workflow_id)
        description = await _call(handle.describe(), self._not_found())
        return handle, description

    async def status(self) -> m.AgentStatus:
        """The agent's status; one terminated from outside (a nuke) shows as canceled."""
        handle, description = await self._describe()
        data = await _call(handle.query("status"), self._not_found())
        status = m.AgentStatus.from_json(data)
        state = description.status
        if state == temporalio.client.WorkflowExecutionStatus.TERMINATED:
            status = replace(status, phase=m.Phase.CANCELED)
        elif state == temporalio.client.WorkflowExecutionStatus.TIMED_OUT:
            status = replace(status, phase=m.Phase.FAILED)
        return status

    async def wait(
        self,
        phase: m.Phase | str = m.Phase.COMPLETED,
        timeout: float | None = None,
        progress: Callable[[m.AgentStatus], None] | None = None,
    ) -> m.AgentStatus:
        """Waits until the agent reaches ``phase`` (or went through it) and returns its status.
        Raises ``FailedPrecondition`` when it ended without reaching it, or after ``timeout``
        seconds; calls ``progress`` on every phase change."""
        want = m.Phase.parse(phase)
        started = time.monotonic()
        last: m.Phase | None = None
        while True:
            status = await self.status()
            if status.phase != last:
                last = status.phase
                if progress is not None:
                    progress(status)
            if status.has_reached(want):
                return status
            if status.phase is not None and status.phase.terminal:
                raise FailedPrecondition(
                    f"agent {self.slug} ended in {status.phase.value} without reaching {want.value}"
                )
            if timeout is not None and time.monotonic() - started >= timeout:
                now = status.phase.value if status.phase else "no phase yet"
                raise FailedPrecondition(
                    f"agent {self.slug} did not reach {want.value} within {int(timeout)}s (it is in {now})"
                )
            await asyncio.sleep(WAIT_POLL)

    async def _running(self) -> tuple[temporalio.client.WorkflowHandle[Any, Any], str]:
        """The handle of the agent's running workflow and its run id; ``FailedPrecondition``
        when the agent has ended."""
        handle, description = await self._describe()
        if description.status != temporalio.client.WorkflowExecutionStatus.RUNNING:
            phase = _closed_phase(description.status)
            raise FailedPrecondition(f"agent {self.slug} has already ended ({phase.value})")
        return handle, description.run_id

    async def _update(
        self, update: str, op: str, message: dict[str, Any]
    ) -> tuple[temporalio.client.WorkflowHandle[Any, Any], Any]:
        """Runs the agent's update ``update`` with ``message`` signed for ``op`` on this run
        only (``<workflow id>@<run id>``: a copy cannot act on a later agent of the same slug);
        returns the workflow's handle and the update's answer."""
        handle, run_id = await self._running()
        target = f"{self.workflow_id}@{run_id}"
        message["auth"] = self._murmur.context.require_credential().sign(op, target, message)
        return handle, await _call(handle.execute_update(update, message), self._not_found())

    async def sleep(self) -> m.AgentStatus:
        """Puts the agent's VM to sleep (nothing in it runs, everything in it is kept) and
        returns the status once it is asleep (``PHASE_SLEEPING``, ``asleep``). Refused with
        ``FailedPrecondition`` while the agent has no VM yet or after it has ended."""
        _, status = await self._update("sleep", m.OP_SLEEP, m.power_request())
        return m.AgentStatus.from_json(status)

    async def wake(self) -> m.AgentStatus:
        """Wakes the agent's sleeping VM on the same VM, processes and memory intact, and
        returns the status once it is awake (back in the phase it slept in: ``PHASE_RUNNING``
        while its command runs, else ``PHASE_IDLE``)."""
        _, status = await self._update("wake", m.OP_WAKE, m.power_request())
        return m.AgentStatus.from_json(status)

    async def set_on_idle(self, on_idle: m.OnIdle | str) -> m.AgentStatus:
        """Sets what the agent does the next time its command exits: ``"sleep"`` or
        ``"keep-alive"`` (``"terminate"`` cannot be set at runtime: ``InvalidArgument``);
        returns the new status."""
        mode = m.OnIdle.parse(on_idle)
        if mode == m.OnIdle.TERMINATE:
            raise InvalidArgument("--on-idle terminate cannot be set at runtime (use sleep or keep-alive)")
        _, status = await self._update("on_idle", m.OP_ON_IDLE, m.on_idle_request(mode))
        return m.AgentStatus.from_json(status)

    async def kill(self) -> None:
        """Cancels the agent and returns once it has ended (its VM destroyed)."""
        handle, _ = await self._update("kill", m.OP_KILL, m.kill_request())
        try:
            await handle.result()
        except (temporalio.client.WorkflowFailureError, temporalio.service.RPCError):
            pass  # the result is the cancellation; what matters is that cleanup has run


def _closed_phase(state: Any) -> m.Phase:
    if state == temporalio.client.WorkflowExecutionStatus.COMPLETED:
        return m.Phase.COMPLETED
    if state in (
        temporalio.client.WorkflowExecutionStatus.CANCELED,
        temporalio.client.WorkflowExecutionStatus.TERMINATED,
    ):
        return m.Phase.CANCELED
    return m.Phase.FAILED


class Pool:
    """The tenant's pool (``pool/<tenant>``)."""

    def __init__(self, murmur: Murmur) -> None:
        self._murmur = murmur

    @property
    def workflow_id(self) -> str:
        """``pool/<tenant>``."""
        return m.pool_workflow_id(self._murmur.context.tenant)

    def _not_running(self) -> str:
        return f"the pool of tenant {self._murmur.context.tenant} is not running; start it with murmur pool up"

    async def status(self) -> dict[str, Any]:
        """The pool's status, as ``murmur pool status -o json`` prints it (``warm``,
        ``in_use``, ``max_vms``, ``generation``, ``vms``, ``claims``, ...)."""
        handle = self._murmur.client.get_workflow_handle(self.workflow_id)
        status: dict[str, Any]
        description: temporalio.client.WorkflowExecutionDescription
        status, description = await asyncio.gather(
            _call(handle.query("status"), self._not_running()),
            _call(handle.describe(), self._not_running()),
        )
        state = description.status
        if state is not None and state != temporalio.client.WorkflowExecutionStatus.RUNNING:
            # The CLI's words for how a run ended.
            status["run_ended"] = "cancelled" if state.name == "CANCELED" else state.name.lower()
        return status

    async def up(self) -> dict[str, Any]:
        """Starts the pool if it is not running (a new run recovers the tenant's state first)
        and asks it to reconcile now; returns its summary (``warm``, ``booting``, ...)."""
        result: dict[str, Any] = await self._murmur._update_pool(
            "up", m.up_request(self._murmur.context.developer)
        )
        return result

    async def flush(self, nuke: bool = False) -> m.FlushResult | m.NukeResult:
        """Destroys every warm VM (the pool refills from current images) and returns once they
        are gone. With ``nuke=True``: terminates every agent of the tenant, deletes every VM
        and resets the pool (returns a :class:`~murmur.messages.NukeResult`)."""
        if nuke:
            return await self._nuke()
        ctx = self._murmur.context
        message = m.flush_request(False, ctx.developer, ctx.workspace)
        message["auth"] = ctx.require_credential().sign(m.OP_FLUSH, self.workflow_id, message)
        return m.FlushResult.from_json(await self._murmur._update_pool("flush", message))

    async def _nuke(self) -> m.NukeResult:
        ctx = self._murmur.context
        target = m.nuke_workflow_id(ctx.tenant)
        message = m.nuke_input(ctx.tenant, ctx.developer)
        message["auth"] = ctx.require_credential().sign(m.OP_NUKE, target, message)
        client = self._murmur.client
        handle = await _call(
            client.start_workflow(
                m.NUKE_WORKFLOW,
                message,
                id=target,
                task_queue=ctx.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                search_attributes=_search_attributes(ctx.tenant, "nuke"),
                static_summary=f"nuke of tenant {ctx.tenant} by {ctx.developer}",
            ),
            "nuke",
        )
        try:
            result = await handle.result()
        except temporalio.client.WorkflowFailureError as e:
            text = _failure_message(e)
            raise parse(text) or from_failure(f"nuke did not complete: {text}") from e
        return m.NukeResult.from_json(result)


class Config:
    """The tenant's resources: ``pool-config default`` and the workspaces."""

    def __init__(self, murmur: Murmur) -> None:
        self._murmur = murmur

    async def get(self) -> dict[str, Any]:
        """Every resource, as ``murmur get`` reads them (``pool_config``, ``workspaces``)."""
        pool = self._murmur.pool
        handle = self._murmur.client.get_workflow_handle(pool.workflow_id)
        result: dict[str, Any] = await _call(handle.query("config"), pool._not_running())
        return result

    async def patch(self, kind: str, name: str, **fields: Any) -> dict[str, Any]:
        """Sets fields of a resource (``kind`` is ``pool-config`` or ``workspace``; dotted
        keys for nested fields as ``murmur patch`` takes them, e.g. ``{"environment.FOO": "1"}``
        passed as ``**{...}``); returns the new document."""
        ctx = self._murmur.context
        message = m.config_patch(kind, name, {k: str(v) for k, v in fields.items()}, ctx.developer)
        message["auth"] = ctx.require_credential().sign(m.OP_CONFIG, m.pool_workflow_id(ctx.tenant), message)
        result: dict[str, Any] = await self._murmur._update_pool("apply_config", message)
        return result

    async def set(
        self, kind: str, name: str, spec: Mapping[str, Any], expected_generation: int | None = None
    ) -> dict[str, Any]:
        """Replaces a resource's whole spec (creating a workspace that does not exist);
        refused unless the resource is at ``expected_generation`` when that is given."""
        ctx = self._murmur.context
        message = m.config_set(kind, name, spec, ctx.developer, expected_generation)
        message["auth"] = ctx.require_credential().sign(m.OP_CONFIG, m.pool_workflow_id(ctx.tenant), message)
        result: dict[str, Any] = await self._murmur._update_pool("apply_config", message)
        return result

