"""The messages murmur's workflows take and answer, as the worker (de)serialises them.

A signed request's body is what the worker renders from the message it decoded, *every* field
included, so each builder here writes every field of its message (``None`` where the CLI
sends nothing); ``tests/vectors/signing.json`` pins the shapes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

#: Workflow types, as the worker registers them.
POOL_WORKFLOW = "PoolWorkflow"
AGENT_WORKFLOW = "AgentWorkflow"
NUKE_WORKFLOW = "NukeWorkflow"

#: Operation names a request signature covers.
OP_FLUSH = "pool.flush"
OP_NUKE = "pool.nuke"
OP_CONFIG = "config.apply"
OP_SPAWN = "agent.spawn"
OP_KILL = "agent.kill"
OP_SLEEP = "agent.sleep"
OP_WAKE = "agent.wake"
OP_ON_IDLE = "agent.on-idle"

#: Search attributes murmur's workflows carry.
SA_TENANT = "MurmurTenant"
SA_WORKSPACE = "MurmurWorkspace"
SA_KIND = "MurmurKind"


def pool_workflow_id(tenant: str) -> str:
    """``pool/<tenant>``."""
    return f"pool/{tenant}"


def nuke_workflow_id(tenant: str) -> str:
    """``nuke/<tenant>``."""
    return f"nuke/{tenant}"


def agent_workflow_id(tenant: str, workspace: str, developer: str, slug: str) -> str:
    """``agent/<tenant>/<workspace>/<developer>/<slug>``."""
    return f"agent/{tenant}/{workspace}/{developer}/{slug}"


class OnIdle(str, enum.Enum):
    """What an agent does once its command exits."""

    TERMINATE = "terminate"
    """Destroy the VM and end (the default)."""
    KEEP_ALIVE = "keep-alive"
    """Stay in ``PHASE_IDLE`` with the VM until killed."""
    SLEEP = "sleep"
    """Put the VM to sleep and stay in ``PHASE_SLEEPING`` until woken or killed."""

    @classmethod
    def parse(cls, text: "str | OnIdle") -> "OnIdle":
        """``terminate``, ``keep-alive`` (or ``keep_alive``) or ``sleep``, as the CLI takes them."""
        if isinstance(text, OnIdle):
            return text
        want = text.strip()
        if want == "keep_alive":
            return cls.KEEP_ALIVE
        for mode in cls:
            if mode.value == want:
                return mode
        from .errors import InvalidArgument

        raise InvalidArgument(f'unknown --on-idle "{want}" (expected sleep, keep-alive or terminate)')


class Phase(str, enum.Enum):
    """Where an agent is in its life, in lifecycle order."""

    STARTING = "PHASE_STARTING"
    RUNNING = "PHASE_RUNNING"
    TASK_COMPLETE = "PHASE_TASK_COMPLETE"
    IDLE = "PHASE_IDLE"
    SLEEPING = "PHASE_SLEEPING"
    """The VM is asleep (:meth:`Agent.sleep`, or ``on_idle="sleep"`` once the command
    exited): nothing in it runs, everything in it is kept; :meth:`Agent.wake` resumes it."""
    DESTROYING = "PHASE_DESTROYING"
    COMPLETED = "PHASE_COMPLETED"
    FAILED = "PHASE_FAILED"
    CANCELED = "PHASE_CANCELED"

    @property
    def terminal(self) -> bool:
        """True for the phases an agent never leaves."""
        return self in (Phase.COMPLETED, Phase.FAILED, Phase.CANCELED)

    @property
    def short(self) -> str:
        """The lower-case name ``murmur ls`` shows (``task-complete``)."""
        return self.value[len("PHASE_") :].lower().replace("_", "-")

    @classmethod
    def parse(cls, text: "str | Phase") -> "Phase":
        """``PHASE_RUNNING``, ``running``, ``task-complete`` or ``task_complete``."""
        if isinstance(text, Phase):
            return text
        want = text.strip().upper().replace("-", "_")
        want = want[len("PHASE_") :] if want.startswith("PHASE_") else want
        for phase in cls:
            if phase.value == f"PHASE_{want}":
                return phase
        from .errors import InvalidArgument

        names = ", ".join(p.short for p in cls)
        raise InvalidArgument(f"unknown phase {text!r} (expected one of {names})")


@dataclass(frozen=True)
class AgentStatus:
    """What ``murmur status <slug>`` shows: the agent workflow's ``status`` query.

    ``queue_position`` is the place in line the pool gave the claim when the agent last
    claimed (a queued agent waits for the pool's signal rather than asking again); the
    ``murmur status`` CLI asks the pool for the current one.
    """

    workflow: str
    slug: str
    phase: Phase | None
    reached: tuple[Phase, ...]
    vm: str | None
    queue_position: int | None
    command: tuple[str, ...]
    on_idle: OnIdle
    exit_code: int | None
    output_tail: str | None
    error: str | None
    waiting: str | None = None
    asleep: bool = False
    """True while the agent's VM is asleep (``murmur status`` shows ``[stopped]``)."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "AgentStatus":
        """Reads the query's answer."""
        phase = data.get("phase")
        return cls(
            workflow=str(data.get("workflow", "")),
            slug=str(data.get("slug", "")),
            phase=Phase(phase) if phase else None,
            reached=tuple(Phase(p) for p in data.get("reached") or ()),
            vm=data.get("vm"),
            queue_position=data.get("queue_position"),
            command=tuple(data.get("command") or ()),
            on_idle=OnIdle(data.get("on_idle") or "terminate"),
            exit_code=data.get("exit_code"),
            output_tail=data.get("output_tail"),
            error=data.get("error"),
            waiting=data.get("waiting"),
            asleep=bool(data.get("asleep", False)),
        )

    def has_reached(self, phase: Phase) -> bool:
        """In ``phase`` now or went through it; a terminal phase counts only when current."""
        if phase.terminal:
            return self.phase == phase
        return phase in self.reached


@dataclass(frozen=True)
class FlushResult:
    """What a flush did: the warm VMs destroyed, the generation after it."""

    flushed: int
    vms: tuple[str, ...]
    generation: int
    stuck: int = 0
    nuke: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FlushResult":
        """Reads the ``flush`` update's answer."""
        return cls(
            flushed=int(data.get("flushed", 0)),
            vms=tuple(data.get("vms") or ()),
            generation=int(data.get("generation", 0)),
            stuck=int(data.get("stuck", 0)),
            nuke=data.get("nuke"),
        )


@dataclass(frozen=True)
class NukeResult:
    """What a nuke did."""

    terminated: int
    """Agent workflows terminated."""
    deleted: int
    """VMs deleted from the substrate, agents' VMs and orphans included."""
    agent_vms: int
    """Of those, VMs that belonged to a terminated agent."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "NukeResult":
        """Reads the nuke workflow's result."""
        return cls(
            terminated=int(data.get("terminated", 0)),
            deleted=int(data.get("deleted", 0)),
            agent_vms=int(data.get("agent_vms", 0)),
        )

    @property
    def total(self) -> int:
        """What ``Nuke complete (N terminated/deleted)`` counts."""
        return self.terminated + max(self.deleted - self.agent_vms, 0)


def flush_request(nuke: bool, actor: str, workspace: str | None) -> dict[str, Any]:
    """Input of the pool's ``flush`` update (``FlushRequest``)."""
    return {"nuke": nuke, "actor": actor, "workspace": workspace}


def up_request(actor: str) -> dict[str, Any]:
    """Input of the pool's ``up`` update."""
    return {"actor": actor}


def pool_input(tenant: str) -> dict[str, Any]:
    """Input that starts a pool run (it recovers the tenant's state first)."""
    return {"tenant": tenant, "carried": None}


def agent_input(
    tenant: str, workspace: str, developer: str, slug: str, command: Sequence[str], on_idle: OnIdle
) -> dict[str, Any]:
    """The agent workflow's input (``AgentInput``)."""
    return {
        "tenant": tenant,
        "workspace": workspace,
        "developer": developer,
        "slug": slug,
        "command": list(command),
        "on_idle": on_idle.value,
    }


def kill_request() -> dict[str, Any]:
    """Input of the agent's ``kill`` update, before signing (``KillRequest``)."""
    return {}


def power_request() -> dict[str, Any]:
    """Input of the agent's ``sleep`` and ``wake`` updates, before signing (``PowerRequest``)."""
    return {}


def on_idle_request(on_idle: OnIdle) -> dict[str, Any]:
    """Input of the agent's ``on_idle`` update, before signing (``OnIdleRequest``)."""
    return {"on_idle": on_idle.value}


def nuke_input(tenant: str, actor: str) -> dict[str, Any]:
    """The nuke workflow's input, before signing (``NukeInput``)."""
    return {"tenant": tenant, "actor": actor, "authorized_request": None}


def config_patch(kind: str, name: str, assignments: Mapping[str, str], actor: str) -> dict[str, Any]:
    """Input of the pool's ``apply_config`` update setting fields (``key=value``)."""
    return {
        "kind": kind,
        "name": name,
        "change": {"op": "patch", "set": [[k, str(v)] for k, v in assignments.items()]},
        "actor": actor,
    }


def config_set(
    kind: str, name: str, spec: Mapping[str, Any], actor: str, expected_generation: int | None = None
) -> dict[str, Any]:
    """Input of the pool's ``apply_config`` update replacing a whole spec."""
    return {
        "kind": kind,
        "name": name,
        "change": {"op": "set", "spec": dict(spec), "expected_generation": expected_generation},
        "actor": actor,
    }
