"""What the bench scripts share: the peak resident memory of the process while a block of code runs."""
from __future__ import annotations

import threading
import time


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


class PeakRSS:
    """Samples the resident set size every 2 ms while the block runs: ``peak - base`` is the block's own rise."""

    def __enter__(self):
        self.base = rss()
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss())
