"""A submitted request's events, moved from the scheduler's thread to the server's event loop:
the one bridge the OpenAI server (block events) and the playground (step events) stream from."""

from __future__ import annotations

import asyncio


class Relay:
    """Submits ``prepared`` (on the event loop's thread) and queues its events: block events, or
    with ``steps`` every denoiser step's; ``events()`` yields them until the request is done."""

    def __init__(self, runtime, prepared, steps: bool = False):
        self.runtime = runtime
        self.prepared = prepared
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        listener = {"on_step" if steps else "on_block": self._put}
        self.ticket = runtime.submit(prepared, on_done=lambda _: self._put(None), **listener)

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def events(self):
        while (event := await self.queue.get()) is not None:
            yield event

    def cancel_if_running(self) -> None:
        if not self.ticket.done.is_set():
            self.ticket.cancel()  # its rows leave the batch before the next denoiser step
