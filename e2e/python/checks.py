"""Counting assertions shared by the client checks: a failed check raises, so the script exits
non-zero with the message; the count is printed at the end."""

import time

passed = 0


def check(condition, message):
    global passed
    passed += 1
    if not condition:
        raise AssertionError(message)


def expect(exception, call, what):
    """`call()` must raise `exception`."""
    try:
        call()
    except exception:
        check(True, what)
        return
    raise AssertionError(f"{what}: no {exception.__name__}")


def poll(read, done, what, seconds=60):
    """Calls `read()` until `done(result)`; returns that result."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        result = read()
        if done(result):
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what} never finished")
