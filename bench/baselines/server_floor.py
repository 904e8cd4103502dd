"""The floor a Temporal server sets under murmur's spawn: the latency of the two calls a warm
spawn is made of, done on a workflow that does nothing else (Python SDK worker, same server).

- update-with-start of a new trivial workflow (what `murmur spawn` does to start an agent);
- an update of a running trivial workflow (what the agent's claim does to the pool).

Prints the median and max of 20 calls each (5 more first, as warm-up, not counted).
"""

import argparse
import asyncio
import statistics
import time
import uuid

from temporalio import workflow
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.worker import Worker

WARM_UP = 5
CALLS = 20


@workflow.defn
class Trivial:
    """Runs until it has answered `expected` updates."""

    def __init__(self) -> None:
        self.answered = 0

    @workflow.run
    async def run(self, expected: int) -> None:
        await workflow.wait_condition(lambda: self.answered >= expected)

    @workflow.update
    async def hello(self) -> str:
        self.answered += 1
        return "hi"


def report(what: str, latencies_ms: list[float]) -> None:
    counted = latencies_ms[WARM_UP:]
    print(f"{what}: median {statistics.median(counted):.1f} ms, max {max(counted):.1f} ms")


async def main(address: str) -> None:
    client = await Client.connect(address)
    task_queue = "floor-" + uuid.uuid4().hex[:6]
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[Trivial],
        max_concurrent_workflow_task_polls=10,
        nonsticky_to_sticky_poll_ratio=0.5,
    ):
        latencies = []
        for i in range(WARM_UP + CALLS):
            started = time.monotonic()
            start = WithStartWorkflowOperation(
                Trivial.run,
                1,
                id=f"{task_queue}-{i}",
                task_queue=task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            )
            await client.execute_update_with_start_workflow(
                Trivial.hello, start_workflow_operation=start
            )
            latencies.append((time.monotonic() - started) * 1000)
            await asyncio.sleep(0.2)
        report("update-with-start of a trivial workflow", latencies)

        running = await client.start_workflow(
            Trivial.run, WARM_UP + CALLS, id=f"{task_queue}-running", task_queue=task_queue
        )
        latencies = []
        for _ in range(WARM_UP + CALLS):
            started = time.monotonic()
            await running.execute_update(Trivial.hello)
            latencies.append((time.monotonic() - started) * 1000)
            await asyncio.sleep(0.1)
        report("update of a running trivial workflow", latencies)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:7233")
    asyncio.run(main(parser.parse_args().address))
