"""Loaded by every Python process of a test's Ray node (its PYTHONPATH names this folder): an audit hook that
refuses any file access under $SEGPIPE_TEST_HIDDEN, the flow machine's folder, so a node that still reads or writes
the flow's run folder, photos or params fails, as it would on a machine of its own. (os.stat raises no audit event:
a path may look present; its content cannot be read.)"""

import os
import sys

_HIDDEN = os.path.normpath(os.environ.get("SEGPIPE_TEST_HIDDEN", "")) if os.environ.get("SEGPIPE_TEST_HIDDEN") else ""
_EVENTS = {"open": 1, "os.listdir": 1, "os.scandir": 1, "os.mkdir": 1, "os.remove": 1, "os.rmdir": 1,
           "os.rename": 2, "os.link": 2, "os.symlink": 2, "os.chdir": 1, "shutil.copyfile": 2, "shutil.rmtree": 1}


def _hidden(path) -> bool:
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False            # a file descriptor
    p = os.fsdecode(path)
    if not os.path.isabs(p):
        try:
            p = os.path.join(os.getcwd(), p)
        except OSError:
            return False
    p = os.path.normpath(p)
    return p == _HIDDEN or p.startswith(_HIDDEN + os.sep)


def _guard(event: str, args: tuple) -> None:
    n = _EVENTS.get(event)
    if n and any(_hidden(a) for a in args[:n]):
        raise PermissionError(f"{event} {args[:n]}: the flow machine's folder {_HIDDEN} is not on this Ray node")


if _HIDDEN:
    sys.addaudithook(_guard)
