"""Run names: safe as a folder and an S3 prefix, and owned by one flow run.

A run's outputs go to runs/<name>/ locally and under s3://<bucket>/runs/<name>/; a name given by hand (the flow's
`run_name`) must not climb out of either, and must not pour a second run's files into a first run's folder.
"""

from __future__ import annotations

import json
import re

from segpipe.storage import ArtifactExistsError, ArtifactStore

# one path component: no separators, no leading dot ('.', '..', hidden), printable ASCII only, short enough for
# every file system and S3 key limit together with the stage paths below it
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# beside the runs, not under runs/<name>/: a run that fails before its first stage leaves its prefix empty
OWNER_KEY = "run-owners/{name}.json"


class RunNameError(ValueError):
    """The run name cannot be used: unsafe as a path, or another run's."""


def check_run_name(name: str) -> str:
    """`name` when it is one safe path component; RunNameError naming the rule otherwise."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise RunNameError(
            f"run name {name!r} cannot be a folder and an S3 prefix: use 1-64 of A-Z a-z 0-9 . _ - , starting "
            "with a letter or digit (no '/', '..', spaces or control characters)")
    return name


def claim(store: ArtifactStore, name: str, owner: str) -> None:
    """Make flow run `owner` the owner of run `name`, atomically across machines (a conditional write of
    run-owners/<name>.json). The same owner again (a retry of that flow run) is fine; another run's name fails
    before any work, naming that run."""
    key = OWNER_KEY.format(name=check_run_name(name))
    body = json.dumps({"flow_run": owner}, sort_keys=True).encode()
    try:
        store.put_bytes(body, key)
    except ArtifactExistsError:
        theirs = json.loads(store.get_bytes(key)).get("flow_run")
        raise RunNameError(
            f"run name {name!r} is taken: {store.url(f'runs/{name}/')} holds the outputs of flow run {theirs}; "
            "choose another run_name (or leave it empty for a fresh one)") from None
