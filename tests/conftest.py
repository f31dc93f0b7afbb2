"""Shared test setup.

MS_DEV_HOST_BLOCKING_RUN=1 must be in the environment before mindspore starts its runtime: without
it the runtime's queue busy-waits on one of the two cores (see ../shared/notes). Setting it here
makes a bare ``pytest`` behave like the README's command.
"""
import json
import os

from recast_ms.cli import configure_environment

configure_environment()  # MS_DEV_HOST_BLOCKING_RUN=1, GLOG_v=3: what every command applies at start-up


def pytest_configure(config):
    # run by CI like every other test (no skip-by-default); `-m "not slow"` leaves them out of a quick local loop
    # process-group and signal tests run in their own single-process pytest pass (.ci/run's second command): in an
    # xdist worker the launcher's TERM cleanup left msrun's processes behind (seen 2026-12-06; single-process passes)
    # a pytest started as a background job (`cmd &`, nohup) inherits SIGINT / SIGTERM / SIGHUP ignored, and so would
    # every command a test starts: the signal tests would then test the shell, not the project (seen 2026-12-06)
    import signal

    for sig, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL),
                         (signal.SIGHUP, signal.SIG_DFL)):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, handler)
    config.addinivalue_line("markers", "serial: signal / process-cleanup test, run outside pytest-xdist (-m serial)")
    config.addinivalue_line("markers", "slow: runs a script or command end to end (seconds to a minute each)")
    # xdist's default hands each worker a block of ~60 consecutive tests and refills in blocks: one worker could be
    # left alone with a 2-minute test at the end while the other idles. Refill one test at a time instead (the
    # order below then decides who runs what)
    if getattr(config.option, "maxschedchunk", "absent") is None:
        config.option.maxschedchunk = 1


# seconds each long test took (`pytest --durations=0` of a `.ci/run`, 2026-12-07, tests of 15 s and more)
_DURATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")


def pytest_collection_modifyitems(config, items):
    """The long tests first, longest first, the rest in file order: on two workers the last test to finish is then
    a short one (longest-processing-time-first scheduling). A stale or missing entry only changes the order."""
    try:
        with open(_DURATIONS) as f:
            seconds = json.load(f)
    except (OSError, ValueError):
        return
    items.sort(key=lambda item: -seconds.get(item.nodeid, 0))  # stable: the rest keep their order
