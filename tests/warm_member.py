"""A module the warm-process tests run as a member (`python -m tests.warm_member <what> ...`)."""

import atexit
import os
import signal
import sys
import threading
import time

PRELOADED = "torch" in sys.modules      # before this module imports anything heavy itself


def main(what: str, *rest: str) -> None:
    if what == "report":
        print(f"argv={sys.argv[1:]}")
        print(f"cwd={os.getcwd()}")
        print(f"env={sorted(k for k in os.environ if k.startswith('WARM_'))}")
        print(f"preloaded={PRELOADED} name={__name__}")
        print(f"site={getattr(sys, 'warm_site', None)}")       # set by a test's sitecustomize at start-up
        print("to stderr", file=sys.stderr)
    elif what == "exit":
        sys.exit(int(rest[0]))
    elif what == "raise":
        raise ValueError("a member's own error")
    elif what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif what == "finish":      # a normal interpreter end: threads joined, then atexit handlers
        atexit.register(lambda: print("atexit ran", flush=True))
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", flush=True))).start()
    elif what == "pool":        # a thread pool still open at the end (kept alive, as a reference cycle may keep it)
        from concurrent.futures import ThreadPoolExecutor
        global POOL
        POOL = ThreadPoolExecutor(1)
        POOL.submit(print, "pool used", flush=True).result()
    elif what == "orphan":      # leaves a process holding its stdout, as a data loader's worker may
        import subprocess
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(20)"])
        print("member done")
    elif what == "tag":         # many lines, to check concurrent members keep theirs apart
        for i in range(200):
            print(f"{rest[0]} {i}")


if __name__ == "__main__":
    main(*sys.argv[1:])


class Odd(Exception):
    """An exception that cannot be pickled back (its __init__ wants two arguments)."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def imported(name: str) -> bool:
    """Whether `name` was imported by the time this forked call ran (the server imports what a request needs)."""
    return name in sys.modules


def answer(x: int, *, fail: str = "") -> dict:
    """What the warm-call tests call in a forked process."""
    import logging
    logging.getLogger("segpipe.warmtest").info("computing %d", x)
    print(f"pid={os.getpid()} preloaded={'torch' in sys.modules}")
    if fail == "value":
        raise ValueError(f"no answer for {x}")
    if fail == "odd":
        raise Odd(1, 2)
    if fail == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return {"x": x, "square": x * x}

