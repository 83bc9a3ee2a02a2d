"""Work below the checks' priority in a server thread: a short-lived thread of its own
niceness (Linux keeps a niceness a thread; the thread's ends with it)."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger("dedup")

T = TypeVar("T")


def niceness_above_this_thread(niceness: int) -> int:
    """This thread's niceness plus `niceness`, capped at 19 (the lowest priority)."""
    return min(19, os.getpriority(os.PRIO_PROCESS, 0) + niceness)


def below_this_thread(niceness: int, work: Callable[[], T]) -> T:
    """`work`'s result, run in a thread `niceness` above this one's (capped at 19); here
    where that is not Linux or `niceness` is 0. Its exceptions are raised here."""
    if niceness <= 0 or sys.platform != "linux":
        return work()
    nice = niceness_above_this_thread(niceness)

    def lowered() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError as error:
            log.warning("work meant to run below the checks keeps their priority: %s", error)

    with ThreadPoolExecutor(1, thread_name_prefix="dedup-niced", initializer=lowered) as pool:
        return pool.submit(work).result()
