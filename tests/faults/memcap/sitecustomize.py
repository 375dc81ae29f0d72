"""Fault injection for scenario 9, on PYTHONPATH only in that test: a training process (`pipelines.train`, or the
warm server that forks the members) gets an address-space limit of $SEGPIPE_FAULT_MEMCAP_GIB, so a member whose
training step needs more really runs out of memory (the allocator fails, as on a full host), while a smaller
member under the same cap finishes."""

import os
import resource

_cap = os.environ.get("SEGPIPE_FAULT_MEMCAP_GIB")
if _cap:
    with open("/proc/self/cmdline", "rb") as _f:
        _argv = _f.read().split(b"\0")
    # a fresh training process, or the warm server its members are forked from (flows.warm; they inherit the cap)
    if b"pipelines.train" in _argv or b"pipelines.retrain" in _argv or any(b"flows.warm" in a for a in _argv):
        _bytes = int(float(_cap) * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (_bytes, _bytes))
