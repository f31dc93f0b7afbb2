"""Shared test setup.

MS_DEV_HOST_BLOCKING_RUN=1 must be in the environment before mindspore starts its runtime: without
it the runtime's queue busy-waits on one of the two cores (see ../shared/notes). Setting it here
makes a bare ``pytest`` behave like the README's command.
"""
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
