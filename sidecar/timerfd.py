"""A deadline as a file descriptor (Linux `timerfd`): readable once CLOCK_MONOTONIC passes it.

Why not a Trio cancel scope: the node's receive loop already waits on one epoll set of its
own (`node.py`), and a timer that is just one more descriptor in that set makes "the next
heartbeat is due" and "a packet came" the same cheap wake-up. A cancel scope's deadline
instead raises `Cancelled` through Trio's machinery and needs a new scope each time; on an
idle leader, which wakes only for its heartbeats, that was about a quarter of its CPU.
Python has `os.timerfd_create` only from 3.13, so this calls libc through ctypes (which the
process has loaded anyway).
"""

from __future__ import annotations

import ctypes
import math
import os

__all__ = ["Deadline"]

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


_libc = ctypes.CDLL(None, use_errno=True)
_create = _libc.timerfd_create
_create.argtypes = (ctypes.c_int, ctypes.c_int)
_create.restype = ctypes.c_int
_settime = _libc.timerfd_settime
_settime.argtypes = (
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(_Itimerspec),
    ctypes.POINTER(_Itimerspec),
)
_settime.restype = ctypes.c_int


class Deadline:
    """One timerfd on CLOCK_MONOTONIC (`time.monotonic()`'s clock); one shot, re-armable.

    `set(when)` arms it for the monotonic instant `when` (math.inf disarms it); setting it
    again replaces the old deadline and clears a pending expiry, so the descriptor is
    readable exactly while the newest deadline has passed and nobody has moved it since.
    """

    def __init__(self) -> None:
        self._fd = -1
        fd: int = _create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"timerfd_create: {os.strerror(errno)}")
        self._fd = fd
        self._spec = _Itimerspec()
        self.when = math.inf

    def fileno(self) -> int:
        return self._fd

    def set(self, when: float) -> None:
        """Fire at monotonic `when` (an instant already past fires at once)."""
        value = self._spec.it_value
        if math.isinf(when):
            value.tv_sec = value.tv_nsec = 0  # all zero: disarmed
        else:
            # Zero would disarm: an instant at or before the clock's origin fires at 1 ns.
            nanoseconds = max(1, int(when * 1e9))
            value.tv_sec, value.tv_nsec = divmod(nanoseconds, 1_000_000_000)
        if _settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"timerfd_settime: {os.strerror(errno)}")
        self.when = when

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # like a socket: an object dropped unclosed frees its fd
        self.close()
