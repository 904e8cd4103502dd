"""Acquisitions per second of Temporal's `resource_pool` sample, its pool workflow unchanged.

`--clients` acquirer workflows each acquire `--per-client` resources in turn (each one kept,
detached, so nothing is released), from a pool with a resource for every acquisition: nobody
waits, as in murmur's "hand-out only" claim-throughput phase. Prints one line with the rate.

The sample is not copied here: pass a checkout of github.com/temporalio/samples-python with
`--samples` (README.md beside this file names the commit measured).
"""

import argparse
import asyncio
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from temporalio import workflow
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.worker import Worker


def samples_checkout() -> Path:
    """The `--samples` argument, read before anything imports the sample."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--samples", type=Path)
    known, _ = parser.parse_known_args()
    if known.samples is None or not (known.samples / "resource_pool").is_dir():
        sys.exit("resource_pool_rate.py: --samples must name a samples-python checkout")
    return known.samples


sys.path.insert(0, str(samples_checkout()))
from resource_pool.pool_client.resource_pool_workflow import (  # noqa: E402
    ResourcePoolWorkflow,
    ResourcePoolWorkflowInput,
)

with workflow.unsafe.imports_passed_through():
    from resource_pool.pool_client import ResourcePoolClient


@dataclass
class AcquirerInput:
    pool_id: str
    count: int


@workflow.defn
class Acquirer:
    """Acquires `count` resources one after another and keeps each."""

    @workflow.run
    async def run(self, inp: AcquirerInput) -> None:
        pool = ResourcePoolClient(inp.pool_id)
        for _ in range(inp.count):
            async with pool.acquire_resource() as resource:
                resource.detach()


async def main(address: str, clients: int, per_client: int) -> None:
    client = await Client.connect(address)
    task_queue = "rp-baseline-" + uuid.uuid4().hex[:6]
    pool_id = "resource_pool-" + task_queue
    total = clients * per_client
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[ResourcePoolWorkflow, Acquirer],
        max_cached_workflows=1000,
    ):
        await client.start_workflow(
            ResourcePoolWorkflow.run,
            ResourcePoolWorkflowInput(resources={f"r{i}": None for i in range(total)}, waiters=[]),
            id=pool_id,
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        started = time.monotonic()
        handles = [
            await client.start_workflow(
                Acquirer.run,
                AcquirerInput(pool_id, per_client),
                id=f"{task_queue}-a{c}",
                task_queue=task_queue,
            )
            for c in range(clients)
        ]
        for handle in handles:
            await handle.result()
        took = time.monotonic() - started
        print(
            f"resource_pool sample: {total} acquisitions by {clients} acquirers "
            f"in {took:.2f} s = {total / took:.1f}/s"
        )
        await client.get_workflow_handle(pool_id).terminate()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, required=True, help="samples-python checkout")
    parser.add_argument("--address", default="127.0.0.1:7233")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--per-client", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(main(args.address, args.clients, args.per_client))
