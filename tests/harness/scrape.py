"""Reading the exporter's metrics over HTTP, and waiting for them to show something."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float | None:
    for s in samples(text):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


async def scrape(
    url: str, path: str = "/metrics", headers: dict[str, str] | None = None
) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url + path, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def scrape_until(url: str, ready: Callable[[str], bool], deadline: float = 45) -> str:
    """Scrape until `ready(body)` holds: an event to wait for, not a fixed sleep."""
    end = time.monotonic() + deadline
    while True:
        _, _, body = await scrape(url)
        if ready(body) or time.monotonic() > end:
            return body
        await _tick()


async def _tick() -> None:
    await asyncio.sleep(0.1)


async def wait_until(check: Callable[[], bool], deadline: float) -> bool:
    """Poll a blocking `check` (an API query, say) off the event loop until it holds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if await asyncio.to_thread(check):
            return True
        await asyncio.sleep(0.5)
    return False
