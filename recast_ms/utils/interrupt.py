"""Signals for the commands: Ctrl-C kept a SIGINT through MindSpore's graph runs, and a command that runs its
stages as child processes stops them before it exits (this module imports nothing heavy, so a command can call
it before numpy or MindSpore start their threads)."""
import _thread
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

STOP_GRACE_S = 5.0  # as scripts/launch_msrun.sh: TERM, then KILL
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class RunInterrupted(BaseException):
    """SIGINT / SIGTERM during a run (a BaseException so no ``except Exception`` swallows it)."""


def route_sigint() -> None:
    """Keep Ctrl-C a SIGINT. MindSpore's graph runner installs, at every graph run, a C SIGINT handler that
    kills the process with SIGTERM, so a Ctrl-C would read as SIGTERM. Here SIGINT is blocked (every thread
    started later inherits the mask, so MindSpore's handler never runs) and a watcher thread hands each one to
    the main thread's Python handler. Call first thing in a command, before numpy or MindSpore is imported:
    threads they started earlier would keep SIGINT unblocked. Child processes inherit the block; the
    project's commands route it again."""
    if getattr(route_sigint, "done", False) or threading.current_thread() is not threading.main_thread():
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def watch():
        while True:
            signal.sigwaitinfo({signal.SIGINT})
            _thread.interrupt_main(signal.SIGINT)  # runs the Python handler (KeyboardInterrupt unless replaced)

    threading.Thread(target=watch, name="sigint", daemon=True).start()
    route_sigint.done = True


def _stop(proc, grace=STOP_GRACE_S):
    """TERM the child's process group, KILL it if its leader outlives ``grace`` seconds; reaps the leader."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone already
            pass
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            pass


def run_child(cmd, what: str, hint: str, *, log_path: Optional[str] = None, cwd: Optional[str] = None) -> int:
    """Run one stage (``what`` names it in the message) in its own process group and return its exit status;
    its output goes to ``log_path`` (appended) or to this process's terminal. SIGINT / SIGTERM / SIGHUP stop the
    child's whole group (TERM, then KILL) before this process exits 128 + signal with one line ending in
    ``hint``: a stage left running would run twice at once in one run directory when the command is rerun."""

    def interrupted(signum, frame):
        raise RunInterrupted(signum)

    previous = {sig: signal.signal(sig, interrupted) for sig in STOP_SIGNALS
                if signal.getsignal(sig) is not signal.SIG_IGN}  # nohup's SIGHUP, a background job's SIGINT
    proc = None
    log = open(log_path, "a") if log_path else None
    try:
        if log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
        # a session of its own: a terminal's Ctrl-C reaches only this process, which stops the child's whole group
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT if log else None, cwd=cwd,
                                start_new_session=True)
        # polled, not waited for in the kernel: a SIGINT that route_sigint hands to this thread (it is blocked
        # here) runs the handler only once Python code runs again, which a blocking wait never does
        while (rc := proc.poll()) is None:
            time.sleep(0.2)
    except RunInterrupted as e:
        for sig in STOP_SIGNALS:  # a second Ctrl-C must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        if proc is not None:
            _stop(proc)
        print(f"\n{what}: interrupted by {signal.Signals(e.args[0]).name}; stopped its process"
              f"{f' (pid {proc.pid})' if proc else ''}; {hint}", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.args[0]) from None
    finally:
        if log:
            log.close()
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    return rc
