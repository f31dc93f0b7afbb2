"""Shared test setup.

MS_DEV_HOST_BLOCKING_RUN=1 must be in the environment before mindspore starts its runtime: without
it the runtime's queue busy-waits on one of the two cores (see ../shared/notes). Setting it here
makes a bare ``pytest`` behave like the README's command.
"""
from recast_ms.cli import configure_environment

configure_environment()  # MS_DEV_HOST_BLOCKING_RUN=1, GLOG_v=3: what every command applies at start-up
