"""Run names: one safe path component, owned by one flow run (a conditional write in the real S3 store)."""

from __future__ import annotations

import pytest

from flows.runnames import RunNameError, check_run_name, claim
from segpipe.storage import ArtifactStore

pytestmark = pytest.mark.services


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", ".hidden", "..", "", "a b", "tab\there", "new\nline",
                                  "é", "x" * 65, "a\\b", "-leading-dash"])
def test_unsafe_names_are_refused_naming_the_rule(name):
    with pytest.raises(RunNameError, match="cannot be a folder and an S3 prefix"):
        check_run_name(name)


@pytest.mark.parametrize("name", ["nightly-2026-12-03", "run_1.b", "A", "x" * 64])
def test_safe_names_pass(name):
    assert check_run_name(name) == name


def test_a_name_is_one_flow_runs_and_its_retry_keeps_it(s3_env, tmp_path):
    store = ArtifactStore(s3_env, prefix=f"names-{tmp_path.name}")
    claim(store, "nightly", "flow-run-a")
    claim(store, "nightly", "flow-run-a")               # a retry of the same flow run: the same name, no error
    with pytest.raises(RunNameError, match="is taken: .* flow run flow-run-a"):
        claim(store, "nightly", "flow-run-b")
    claim(store, "other", "flow-run-b")                  # another name is free
    with pytest.raises(RunNameError):
        claim(store, "../escape", "flow-run-b")          # checked before anything is written
    assert store.list("run-owners/") == ["run-owners/nightly.json", "run-owners/other.json"]
