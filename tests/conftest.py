"""Shared test setup.

MS_DEV_HOST_BLOCKING_RUN=1 must be in the environment before mindspore starts its runtime: without
it the runtime's queue busy-waits on one of the two cores (see ../shared/notes). Setting it here
makes a bare ``pytest`` behave like the README's command.
"""
import os

os.environ.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")
os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ log: errors only
