"""CPU used by other processes while a benchmark runs: the VMs are shared, so every table says
how busy the rest of the machine was. Shared by the benchmark scripts in this folder."""

from __future__ import annotations

import contextlib
import os
import time


class CpuMeter:
    """Share of all CPUs used, between start() and stop(), by processes other than ours."""

    def __init__(self) -> None:
        import psutil

        self.psutil, self.me = psutil, psutil.Process()
        self.start()

    def _mine(self) -> float:
        t = self.me.cpu_times()  # children_*: our finished (reaped) child processes
        total = t.user + t.system + t.children_user + t.children_system
        for child in self.me.children(recursive=True):
            with contextlib.suppress(self.psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return total

    def _busy(self) -> tuple[float, float]:
        t = self.psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq, getattr(t, "steal", 0.0)

    def start(self) -> None:
        self.t0, self.mine0 = time.monotonic(), self._mine()
        self.busy0, self.steal0 = self._busy()

    def stop(self) -> tuple[float, float, float]:
        """(share of all CPUs used by other processes, share stolen by the hypervisor, CPU
        seconds used by us and our children) since start()."""
        wall = (time.monotonic() - self.t0) * (os.cpu_count() or 1)
        mine = self._mine() - self.mine0
        busy, steal = self._busy()
        other = max(busy - self.busy0 - mine, 0.0) / wall
        return other, (steal - self.steal0) / wall, mine
