"""Reading FineTuneJob manifests from files: YAML errors and validation errors as plain lines."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune import api, render, sweep_api
from kubetune.settings import DEFAULT_TRAINER_IMAGE


class _Loader(yaml.SafeLoader):
    """YAML as the API server reads it: a repeated key is an error (not "last one wins"), and
    timestamps stay strings (JSON has no dates)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@dataclass
class Loaded:
    """The valid jobs of one file and one line per problem."""

    jobs: list[api.FineTuneJob] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    sweeps: list[sweep_api.FineTuneSweep] = field(default_factory=list)


def _name_of(document: Any, index: int) -> str:
    if isinstance(document, dict):
        meta = document.get("metadata")
        if isinstance(meta, dict) and isinstance(meta.get("name"), str):
            return meta["name"]
    return f"<document {index}>"


def check_documents(documents: list[Any], where: str) -> Loaded:
    """Validate FineTuneJob documents; documents of other kinds are ignored."""
    result = Loaded()
    for index, document in enumerate(documents, start=1):
        if document is None:
            continue
        name = _name_of(document, index)
        if not isinstance(document, dict):
            result.problems.append(
                f"{where}: {name}: <document>: expected a mapping, got {type(document).__name__}"
            )
            continue
        if document.get("kind") == sweep_api.KIND:
            try:
                result.sweeps.append(sweep_api.parse_sweep(document))
            except sweep_api.SweepInvalid as error:
                result.problems += [f"{where}: {name}: {line}" for line in error.lines]
            continue
        if document.get("kind") not in (api.KIND, None):
            continue
        try:
            job = api.parse_job(document)
        except ValidationError as error:
            result.problems += [f"{where}: {name}: {line}" for line in api.format_errors(error)]
            continue
        too_big = render.size_problems(job, default_image=DEFAULT_TRAINER_IMAGE)
        result.problems += [f"{where}: {name}: {line}" for line in too_big]
        if not too_big:
            result.jobs.append(job)
    return result


def load_file(path: str | Path) -> Loaded:
    """Load every FineTuneJob in a (multi-document) YAML or JSON file."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        return Loaded(problems=[f"{path}: cannot read: {error.strerror or error}"])
    try:
        documents = list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        return Loaded(problems=[f"{path}: invalid YAML{where}: {problem}"])
    result = check_documents(documents, str(path))
    if not result.jobs and not result.sweeps and not result.problems:
        result.problems.append(f"{path}: no {api.KIND} found")
    return result
