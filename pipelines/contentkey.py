"""Content keys of the stages, built from what `dvc.yaml` says each stage depends on.

A stage's key hashes exactly what DVC compares to decide that a stage is stale:

- its code: every `deps` entry of the stage that no stage produces (pipelines/*.py, segpipe/*.py), each by
  its md5, which is the hash DVC 3 records for a file dependency in `dvc.lock`;
- its params: the values of the `params` keys the stage lists (`train`, `data.classes`, ...), as DVC records them;
- its data: the keys of the upstream stages it reads, and for the first stage the DVC hash of the dataset
  (the `md5` of `data/raw` in `dvc.lock` or `data/raw.dvc`: the data version `fetch` returns).

Where DVC hashes an upstream *output* folder, the key takes the upstream *key*: the two agree whenever the stages
are deterministic, and the key never misses a change that DVC would see (a changed output has a changed cause).
`python -m pipelines.contentkey` prints every stage's key and its parts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines.common import parser
from segpipe.storage import file_digest

KEY_CHARS = 32


class ContentKeyError(ValueError):
    """dvc.yaml or params.yaml cannot give a stage's key (unknown stage, missing param, unsupported entry)."""


def file_md5(path: Path) -> str:
    """md5 of the file's bytes: what DVC 3 stores as a file dependency's `md5` in dvc.lock."""
    return file_digest(path, "md5")


def digest(obj: Any, chars: int = KEY_CHARS) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:chars]


def lookup(params: dict, dotted: str, source: Path) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ContentKeyError(f"param `{dotted}` (listed in dvc.yaml) is not in {source}")
        node = node[part]
    return node


def _template_regex(path: str) -> str:
    """`artifacts/infer/${key}` -> a regex matching `artifacts/infer/<anything without a slash>`."""
    return "/".join("[^/]+" if "${" in part else re.escape(part) for part in path.split("/"))


@dataclass(frozen=True)
class StageSpec:
    """A dvc.yaml stage reduced to what its key needs: code files and params keys."""

    name: str
    code: tuple[str, ...]
    params: tuple[str, ...]


class StageKeys:
    """Keys for the stages of one project checkout (`root`, holding dvc.yaml) and one params file."""

    def __init__(self, params_file: Path | str = "params.yaml", root: Path | str = ".", dvc_yaml: str = "dvc.yaml"):
        self.root = Path(root)
        self.params_file = Path(params_file)
        path = self.root / dvc_yaml
        if not path.is_file():
            raise ContentKeyError(f"{path} not found: stage keys are built from dvc.yaml's deps and params")
        self.stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
        self.params = yaml.safe_load(self.params_file.read_text()) or {}
        produced = set()
        for st in self.stages.values():
            body = st.get("do", st)
            produced |= {next(iter(o)) if isinstance(o, dict) else o for o in body.get("outs", [])}
        # templated outs (artifacts/infer/${key}) match any value of the template
        self._produced = [re.compile(_template_regex(p)) for p in produced]
        self._md5: dict[str, str] = {}

    def spec(self, stage: str) -> StageSpec:
        if stage not in self.stages:
            raise ContentKeyError(f"Wrong stage `{stage}`, stages in {self.root / 'dvc.yaml'}: {sorted(self.stages)}")
        body = self.stages[stage].get("do", self.stages[stage])   # foreach stages keep deps/params under `do`
        code = []
        for dep in body.get("deps", []):
            if "${" in dep or self._is_output(dep):
                continue      # data: an upstream stage's output, keyed by that stage's key instead
            if self._is_tracked_data(dep):
                continue      # the dataset brought in by `dvc add`/`dvc import-url`: keyed by its data version
            if not (self.root / dep).is_file():
                raise ContentKeyError(f"dvc.yaml stage `{stage}` depends on {dep}, which is not a file here "
                                      "(only code files and upstream outputs are supported as deps)")
            code.append(dep)
        params = []
        for entry in body.get("params", []):
            if not isinstance(entry, str):
                raise ContentKeyError(f"dvc.yaml stage `{stage}`: params entry {entry!r} names another file; "
                                      "only keys of the default params.yaml are supported")
            params.append(entry)
        return StageSpec(stage, tuple(code), tuple(params))

    def _is_tracked_data(self, path: str) -> bool:
        """Tracked by a `.dvc` file (`data/raw.dvc` for data/raw or a folder above it), not by a stage."""
        parts = Path(path).parts
        return any((self.root / Path(*parts[:i]).parent / f"{parts[i - 1]}.dvc").is_file()
                   for i in range(1, len(parts) + 1))

    def _is_output(self, path: str) -> bool:
        """Produced by a stage: an out itself, inside one, or a folder holding some (artifacts/retrain/r1)."""
        for pat in self._produced:
            if pat.fullmatch(path) or pat.match(path) and path[pat.match(path).end():].startswith("/"):
                return True
            if any(pat.fullmatch("/".join(path.split("/") + ["x"] * extra)) for extra in (1, 2)):
                return True
        return False

    def md5(self, rel: str) -> str:
        if rel not in self._md5:
            self._md5[rel] = file_md5(self.root / rel)
        return self._md5[rel]

    def parts(self, stage: str, upstream: list[str] | tuple[str, ...] = (), item: dict | None = None,
              extra: dict | None = None) -> dict:
        """What the key hashes, readable: shown by the CLI and stored beside each stage's result."""
        spec = self.spec(stage)
        return {"stage": stage, "item": item or {},
                "code": {rel: self.md5(rel) for rel in spec.code},
                "params": {k: lookup(self.params, k, self.params_file) for k in spec.params},
                "upstream": list(upstream), "extra": extra or {}}

    def key(self, stage: str, upstream: list[str] | tuple[str, ...] = (), item: dict | None = None,
            extra: dict | None = None) -> str:
        """`<stage>-<32 hex>`: equal exactly when code, params, upstream keys and item are equal."""
        return f"{stage}-{digest(self.parts(stage, upstream, item, extra))}"

    def params_hash(self, chars: int = 6) -> str:
        """A short hash of the whole params file's values (comments and order do not count)."""
        return digest(self.params, chars)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data-version", required=True, help="the dataset's DVC hash (`python -m pipelines.fetch`)")
    a = p.parse_args()
    keys = StageKeys(a.params)
    v = keys.key("validate", [a.data_version])
    s = keys.key("split", [v])
    for name, k in (("validate", v), ("split", s)):
        print(f"{name:10s} {k}")
    print(json.dumps({"validate": keys.parts("validate", [a.data_version]), "split": keys.parts("split", [v])},
                     indent=2))


if __name__ == "__main__":
    main()
