"""Running a connector's tasks until it is stopped."""

from __future__ import annotations

import asyncio


async def gather_until_stopped(tasks: list[asyncio.Task[None]], stopped: asyncio.Event) -> None:
    """Await ``tasks``; when ``stop()`` has set ``stopped`` and cancelled them, end quietly.

    A task's own failure propagates, and so does a cancellation of the caller
    itself; either way every task is cancelled and awaited before returning.
    """
    try:
        await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        # stop() cancelled our children: a normal end. Our own cancellation propagates.
        if not stopped.is_set() or (current and current.cancelling()):
            raise
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
