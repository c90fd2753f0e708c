"""Runs one measurement in a fresh process, so that its peak resident memory is its own."""
import multiprocessing
import statistics
import time
from pathlib import Path


def _resident_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(build, args, repeats, summary, queue) -> None:
    run = build(*args)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _resident_mib("VmRSS")
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    queue.put((summary(times[1:]), _resident_mib("VmHWM") - base))


def time_and_peak_memory(build, args: tuple, repeats: int = 3,
                         summary=statistics.median) -> tuple[float, float]:
    """Seconds of ``build(*args)()`` (``summary`` of the runs after a warm-up: median, or min
    on a machine shared with other jobs) and its peak MiB above what ``build`` left allocated.

    ``build`` must be a module-level function (it is pickled into a spawned process) that
    prepares the inputs and returns a no-argument callable doing one measured run. Linux only
    (reads /proc/self/status).
    """
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    child = spawn.Process(target=_measure, args=(build, args, repeats, summary, queue))
    child.start()
    result = queue.get()
    child.join()
    return result
