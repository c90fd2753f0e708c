"""How a torchrun (DDP) process of ``train.py`` ends.

Under CPU load a gloo rank sometimes aborted *after* its work was done, in PyTorch's C++
teardown ("terminate called without an active exception", no Python frame left), and torchrun
then failed the whole run. A finished rank therefore meets the others at a barrier, destroys the
process group, lets Python shut down as usual (threads, pools, ``atexit`` handlers: log files,
temporary folders, DataLoader workers) and leaves through ``os._exit`` from the last exit hook,
before the interpreter's and C++'s teardown.

``train.py`` imports this module first, so that its hook is registered before any other and
therefore runs after all of them (``atexit`` runs hooks in reverse order).
"""
import atexit
import os
import sys

_finished_cleanly = False


def _leave_before_native_teardown() -> None:
    if _finished_cleanly:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


atexit.register(_leave_before_native_teardown)


def leave_process_group(finished: bool) -> None:
    """Ends a rank's part in the process group.

    Arguments
    ---------
    finished : whether this rank's ``main`` returned. A failed rank does not wait at the barrier
        (the others would never come): torchrun stops the rest. A finished rank whose barrier
        fails (another rank died) says so in one line and exits with 1. A rank with nothing
        left to do (the n-gram task counts on the main process only) waits here, within the
        process group's timeout, as SpeechBrain's ``run_on_main`` waits.
    """
    import torch.distributed
    from speechbrain.utils.distributed import ddp_barrier

    global _finished_cleanly
    if finished:
        try:  # gloo: a peer that died closes the connection; nccl: torchrun's SIGTERM ends it
            ddp_barrier()
        except RuntimeError as error:
            print(f"error: rank {torch.distributed.get_rank()} finished, but another process "
                  f"did not ({str(error).splitlines()[0]}); see its output above", file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)
    torch.distributed.destroy_process_group()
    _finished_cleanly = finished
