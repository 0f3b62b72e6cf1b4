"""Prometheus' part: scrape a URL once a second, timing each scrape as Prometheus does
(request sent to body read).

    python -m bench.scraper URL COUNT OUT

OUT gets {"ms": [...], "bytes": [...]}. Bounded: COUNT scrapes, one a second.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path


def main() -> None:
    url, count, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    timings: list[float] = []
    sizes: list[int] = []
    start = time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, start + i - time.monotonic()))  # a fixed one-second grid
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
        timings.append((time.perf_counter() - t0) * 1000)
        sizes.append(len(body))
    out.write_text(json.dumps({"ms": timings, "bytes": sizes}))


if __name__ == "__main__":
    main()
