"""Runs one measurement in a fresh process, so that its peak resident memory is its own."""
import multiprocessing
import resource
import statistics
import time


def _measure(build, args, repeats, queue) -> None:
    run = build(*args)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    queue.put((statistics.median(times[1:]), peak_mib))


def time_and_peak_memory(build, args: tuple, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of ``build(*args)()`` and peak MiB above what ``build`` itself allocated.

    ``build`` must be a module-level function (it is pickled into a spawned process) that
    prepares the inputs and returns a no-argument callable doing one measured run.
    """
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    child = spawn.Process(target=_measure, args=(build, args, repeats, queue))
    child.start()
    result = queue.get()
    child.join()
    return result
