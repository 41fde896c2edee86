"""Start-up, from process start to the first step: its phases and its stop signals.

Every rank reports the phase it is in (``orchestrator.protocol.STARTUP_PHASES``, in order) in
its heartbeat, and ``orchestrator.runtime.faults.Watchdog`` ends a rank that stays in
one phase longer than ``faults.startup_timeout_s``, naming the phase, the rank
and (on rank 0) the ranks behind.

A stop signal (SIGUSR1/SIGTERM: SLURM's time limit, preemption, ``scancel``)
during start-up ends the rank at once with ``EXIT_REQUEUE``: there is nothing
to save yet, and the main thread may sit in a C call for minutes (a
rendezvous, an index build), where Python's signal handlers do not run. So
the signals stay blocked in every thread and a small thread takes them with
``sigtimedwait``. When training starts, ``StartupSignals.stop`` hands them to
``faults.StopRequest``, which then checkpoints at the end of a step.

No torch here: the worker starts this before it imports torch and DeepSpeed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from orchestrator.protocol import EXIT_REQUEUE, STOP_SIGNALS


class StartupSignals:
    """Ends the process with ``EXIT_REQUEUE`` on SIGUSR1/SIGTERM until ``stop()``.

    ``start()`` blocks the signals in the calling thread first (threads
    started later inherit the mask), so call it before any other thread starts.
    """

    def __init__(self) -> None:
        self.phase = "process start"
        self.who = f"pid {os.getpid()}"  # "rank N" once the rank is known
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="startup-signals", daemon=True)

    def start(self) -> StartupSignals:
        # Threads started before this one (when a process other than the worker
        # calls us late) may not block the signals; the handler covers them.
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, _frame: self._exit(signum))
        signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._done.is_set()

    def stop(self) -> None:
        """From now on the signals are the caller's (still blocked: unblock them to receive)."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._done.is_set():
            info = signal.sigtimedwait(STOP_SIGNALS, 0.2)
            if info is None:
                continue
            if self._done.is_set():  # start-up just ended: the training loop's handler takes it
                os.kill(os.getpid(), info.si_signo)
                return
            self._exit(info.si_signo)

    def _exit(self, signum: int) -> None:
        name = signal.Signals(signum).name
        print(
            f"StopInStartup: {self.who} got {name} in start-up phase '{self.phase}': "
            f"nothing to save yet, exiting {EXIT_REQUEUE} (requeue)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_REQUEUE)
