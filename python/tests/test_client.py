"""The client against a real dev server and a real worker (process substrate)."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest

import murmur
from murmur import messages as m
from murmur.signing import verify_signature

from conftest import Deployment


async def until(what: str, check, timeout: float = 90.0):  # type: ignore[no-untyped-def]
    """Waits for ``check()`` to return something truthy (a condition, not a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert loop.time() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.1)


def slug() -> str:
    return f"py-{secrets.token_hex(3)}"


async def test_spawn_runs_the_command_and_its_output_comes_back(admin: murmur.Murmur) -> None:
    agent = await admin.spawn(slug(), ["sh", "-c", "echo hello from $MURMUR_VM; exit 0"])
    status = await agent.wait(murmur.Phase.COMPLETED, timeout=120)
    assert status.exit_code == 0
    assert status.output_tail is not None and "hello from 1" in status.output_tail
    assert murmur.Phase.RUNNING in status.reached
    assert status.vm is not None


async def test_a_failing_command_ends_failed_and_wait_says_so(admin: murmur.Murmur) -> None:
    agent = await admin.spawn(slug(), ["sh", "-c", "echo oops >&2; exit 3"])
    with pytest.raises(murmur.FailedPrecondition, match="ended in PHASE_FAILED without reaching PHASE_COMPLETED"):
        await agent.wait(murmur.Phase.COMPLETED, timeout=120)
    status = await agent.status()
    assert status.exit_code == 3 and status.phase == murmur.Phase.FAILED


async def test_kill_ends_a_running_agent_and_a_second_kill_says_it_ended(admin: murmur.Murmur) -> None:
    agent = await admin.spawn(slug(), ["sleep", "300"], on_idle=murmur.OnIdle.KEEP_ALIVE)
    await agent.wait(murmur.Phase.RUNNING, timeout=120)
    await agent.kill()
    status = await agent.status()
    assert status.phase == murmur.Phase.CANCELED
    with pytest.raises(murmur.FailedPrecondition, match="has already ended"):
        await agent.kill()


COUNT = ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i; sleep 1; done"]


async def test_sleep_stops_the_agent_and_wake_resumes_it_on_the_same_vm(admin: murmur.Murmur) -> None:
    agent = await admin.spawn(slug(), COUNT)
    running = await agent.wait(murmur.Phase.RUNNING, timeout=120)
    assert running.vm is not None and not running.asleep

    asleep = await agent.sleep()
    assert asleep.phase == murmur.Phase.SLEEPING and asleep.asleep
    assert asleep.vm == running.vm
    # The answer is the status the query reads too.
    assert (await agent.status()).asleep
    # Sleeping an agent already asleep answers at once with the same status.
    assert (await agent.sleep()).phase == murmur.Phase.SLEEPING

    awake = await agent.wake()
    assert awake.phase == murmur.Phase.RUNNING and not awake.asleep
    assert awake.vm == running.vm
    assert murmur.Phase.SLEEPING in awake.reached

    changed = await agent.set_on_idle("keep-alive")
    assert changed.on_idle == murmur.OnIdle.KEEP_ALIVE
    assert (await agent.status()).on_idle == murmur.OnIdle.KEEP_ALIVE
    with pytest.raises(murmur.InvalidArgument, match="cannot be set at runtime"):
        await agent.set_on_idle("terminate")
    assert (await agent.status()).on_idle == murmur.OnIdle.KEEP_ALIVE

    await agent.kill()
    assert (await agent.status()).phase == murmur.Phase.CANCELED


async def test_an_ended_agent_cannot_sleep_wake_or_change_on_idle(admin: murmur.Murmur) -> None:
    agent = await admin.spawn(slug(), ["true"])
    await agent.wait(murmur.Phase.COMPLETED, timeout=120)
    with pytest.raises(murmur.FailedPrecondition, match="has already ended"):
        await agent.sleep()
    with pytest.raises(murmur.FailedPrecondition, match="has already ended"):
        await agent.wake()
    with pytest.raises(murmur.FailedPrecondition, match="has already ended"):
        await agent.set_on_idle(murmur.OnIdle.SLEEP)


async def test_on_idle_terminate_and_unknown_modes_are_refused_before_any_call(admin: murmur.Murmur) -> None:
    # No such agent: a call would answer NOT_FOUND; the refusal comes first.
    nobody = admin.agent("nobody-here")
    with pytest.raises(murmur.InvalidArgument, match="cannot be set at runtime"):
        await nobody.set_on_idle("terminate")
    with pytest.raises(murmur.InvalidArgument, match='unknown --on-idle "hibernate"'):
        await nobody.set_on_idle("hibernate")
    with pytest.raises(murmur.InvalidArgument, match="unknown --on-idle"):
        await admin.spawn(slug(), ["true"], on_idle="hibernate")


async def test_an_agent_spawned_with_on_idle_sleep_sleeps_once_its_command_exits(admin: murmur.Murmur) -> None:
    agent = await admin.spawn(slug(), ["true"], on_idle="sleep")
    status = await agent.wait(murmur.Phase.SLEEPING, timeout=120)
    # The phase is set once the VM is asleep.
    assert status.phase == murmur.Phase.SLEEPING and status.asleep
    assert status.on_idle == murmur.OnIdle.SLEEP
    assert status.exit_code == 0
    assert murmur.Phase.TASK_COMPLETE in status.reached
    # Woken, it is idle with its VM (its command is done).
    awake = await agent.wake()
    assert awake.phase == murmur.Phase.IDLE and not awake.asleep and awake.vm == status.vm
    await agent.kill()
    assert (await agent.status()).phase == murmur.Phase.CANCELED


def test_the_power_and_on_idle_requests_have_the_workers_shapes() -> None:
    # The worker signs over every field of what it decoded, without `auth`.
    assert m.power_request() == {}
    assert m.on_idle_request(m.OnIdle.SLEEP) == {"on_idle": "sleep"}
    assert m.on_idle_request(m.OnIdle.parse("keep_alive")) == {"on_idle": "keep-alive"}
    assert (m.OP_SLEEP, m.OP_WAKE, m.OP_ON_IDLE) == ("agent.sleep", "agent.wake", "agent.on-idle")
    # `asleep` is left out of the status when false.
    assert not m.AgentStatus.from_json({"phase": "PHASE_RUNNING"}).asleep
    assert m.AgentStatus.from_json({"phase": "PHASE_SLEEPING", "asleep": True}).asleep
    assert m.Phase.parse("sleeping") == m.Phase.SLEEPING and not m.Phase.SLEEPING.terminal


async def test_a_second_spawn_of_a_running_slug_is_refused(admin: murmur.Murmur) -> None:
    name = slug()
    agent = await admin.spawn(name, ["sleep", "300"])
    with pytest.raises(murmur.FailedPrecondition, match=f"agent {name} is already running"):
        await admin.spawn(name, ["true"])
    await agent.kill()


async def test_an_unknown_agent_is_not_found(admin: murmur.Murmur) -> None:
    with pytest.raises(murmur.NotFound, match="no agent with slug nobody-here"):
        await admin.agent("nobody-here").status()


async def test_flush_returns_the_count_of_warm_vms_it_destroyed(admin: murmur.Murmur) -> None:
    await admin.config.patch("workspace", "default", min_idle="2")

    async def two_warm() -> dict | None:
        status = await admin.pool.status()
        states = [vm["state"] for vm in status["vms"]]
        return status if states.count("warm") == 2 and states.count("booting") == 0 else None

    before = await until("two warm VMs", two_warm)
    result = await admin.pool.flush()
    assert isinstance(result, murmur.FlushResult)
    assert result.flushed == 2
    assert len(result.vms) == 2
    assert result.generation == before["generation"] + 1
    await admin.config.patch("workspace", "default", min_idle="1")


async def test_config_patch_answers_the_new_document_and_get_reads_it(admin: murmur.Murmur) -> None:
    doc = await admin.config.patch("pool-config", "default", max_vms="7")
    assert doc["spec"]["max_vms"] == 7
    snapshot = await admin.config.get()
    assert snapshot["pool_config"]["spec"]["max_vms"] == 7
    with pytest.raises(murmur.InvalidArgument):
        await admin.config.patch("pool-config", "default", max_vms="-1")


async def test_a_viewer_gets_the_same_permission_denied_as_the_cli(
    deployment: Deployment, admin: murmur.Murmur, tmp_path: Path
) -> None:
    viewer = deployment.issue("vic", "viewer")
    mm = await deployment.client(viewer)
    with pytest.raises(murmur.PermissionDenied) as caught:
        await mm.pool.flush()
    cli = deployment.cli(["pool", "flush"], viewer, tmp_path)
    assert cli.returncode == 1
    assert str(caught.value) == cli.stderr.splitlines()[0]
    with pytest.raises(murmur.PermissionDenied):
        await mm.spawn(slug(), ["true"])
    # Reading is allowed.
    assert (await mm.pool.status())["tenant"] == deployment.tenant


async def test_a_forged_credential_is_unauthenticated(deployment: Deployment, admin: murmur.Murmur) -> None:
    token, key = deployment.credentials["admin"].split("~", 1)
    header, claims, sig = token.split(".")
    forged_sig = ("A" if sig[0] != "A" else "B") + sig[1:]
    mm = await deployment.client(f"{header}.{claims}.{forged_sig}~{key}")
    with pytest.raises(murmur.Unauthenticated, match="identity token signature is invalid"):
        await mm.pool.flush()
    # A real token with somebody else's key: the request signature does not verify.
    other = deployment.issue("mallory", "murmur-tenant-admin").split("~", 1)[1]
    mm = await deployment.client(f"{token}~{other}")
    with pytest.raises(murmur.Unauthenticated, match="request signature"):
        await mm.pool.flush()


async def test_a_request_signed_in_python_is_accepted_once(deployment: Deployment, admin: murmur.Murmur) -> None:
    ctx = admin.context
    message = m.flush_request(False, ctx.developer, ctx.workspace)
    message["auth"] = ctx.require_credential().sign(m.OP_FLUSH, m.pool_workflow_id(ctx.tenant), message)
    reply = await admin._update_pool("flush", message)
    assert "generation" in reply
    with pytest.raises(murmur.Unauthenticated, match="already used"):
        await admin._update_pool("flush", message)


async def test_a_request_signed_by_the_cli_verifies_in_python(
    deployment: Deployment, admin: murmur.Murmur, tmp_path: Path
) -> None:
    out = deployment.cli(["auth", "sign", "flush"], deployment.credentials["admin"], tmp_path)
    assert out.returncode == 0, out.stderr
    signed = json.loads(out.stdout)
    target = m.pool_workflow_id(deployment.tenant)
    assert verify_signature(signed["auth"], m.OP_FLUSH, target, signed)
    assert not verify_signature(signed["auth"], m.OP_FLUSH, target, {**signed, "nuke": True})
    assert not verify_signature(signed["auth"], m.OP_NUKE, target, signed)


async def test_from_config_reads_the_project_files_like_the_cli(
    deployment: Deployment, admin: murmur.Murmur, tmp_path: Path
) -> None:
    (tmp_path / ".murmur").mkdir()
    (tmp_path / ".murmur" / "murmur.yaml").write_text(f"tenant: {deployment.tenant}\nworkspace: default\n")
    login = deployment.cli(["auth", "login", "--token", deployment.credentials["admin"]], "", tmp_path)
    assert login.returncode == 0, login.stderr
    env = deployment.env()
    env.pop("MURMUR_TENANT", None)
    mm = await murmur.Murmur.from_config(cwd=tmp_path, env=env)
    assert (mm.context.tenant, mm.context.developer, mm.context.task_queue) == (
        deployment.tenant, "ana", deployment.task_queue,
    )
    agent = await mm.spawn(slug(), ["true"])
    assert (await agent.wait(murmur.Phase.COMPLETED, timeout=120)).exit_code == 0


async def test_nuke_terminates_agents_and_the_pool_serves_again(admin: murmur.Murmur) -> None:
    agent = await admin.spawn(slug(), ["sleep", "300"])
    await agent.wait(murmur.Phase.RUNNING, timeout=120)
    result = await admin.pool.flush(nuke=True)
    assert isinstance(result, murmur.NukeResult)
    assert result.terminated >= 1 and result.deleted >= 1
    assert (await agent.status()).phase == murmur.Phase.CANCELED
    after = await admin.spawn(slug(), ["true"])
    assert (await after.wait(murmur.Phase.COMPLETED, timeout=120)).exit_code == 0


def test_the_sync_wrapper_spawns_and_waits(deployment: Deployment) -> None:
    from murmur import sync

    with sync.Murmur.connect(
        tenant=deployment.tenant, credential=deployment.credentials["admin"],
        address=deployment.address, task_queue=deployment.task_queue,
    ) as mm:
        agent = mm.spawn(slug(), ["sh", "-c", "echo sync"])
        status = agent.wait("completed", timeout=120)
        assert status.output_tail is not None and "sync" in status.output_tail


def test_the_sync_wrapper_sleeps_and_wakes(deployment: Deployment) -> None:
    from murmur import sync

    with sync.Murmur.connect(
        tenant=deployment.tenant, credential=deployment.credentials["admin"],
        address=deployment.address, task_queue=deployment.task_queue,
    ) as mm:
        agent = mm.spawn(slug(), COUNT, on_idle="keep-alive")
        agent.wait("running", timeout=120)
        assert agent.sleep().phase == murmur.Phase.SLEEPING
        assert agent.wake().phase == murmur.Phase.RUNNING
        assert agent.set_on_idle("sleep").on_idle == murmur.OnIdle.SLEEP
        with pytest.raises(murmur.InvalidArgument, match="cannot be set at runtime"):
            agent.set_on_idle("terminate")
        agent.kill()
        with pytest.raises(murmur.FailedPrecondition, match="has already ended"):
            agent.sleep()
