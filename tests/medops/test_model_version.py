"""medops.model_version: the model repository layout, metadata.json schema, version listing and rollout state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medops.model_version import (
    METADATA_SCHEMA,
    ModelVersionError,
    RolloutState,
    append_history,
    list_versions,
    read_history,
    read_metadata,
    read_rollout_state,
    under_rollout,
    version_dir,
    write_json,
    write_rollout_state,
)


def _version(repo: Path, name: str, version: int, **meta: object) -> Path:
    folder = repo / name / str(version)
    folder.mkdir(parents=True)
    write_json(folder / "metadata.json", {"schema": METADATA_SCHEMA, "class_names": ["malignant", "benign"],
                                          "input": {"name": "image", "channels": 1, "size": 28, "window": [40, 400]},
                                          **meta})
    return folder


def test_versions_are_listed_numerically_and_latest_is_the_highest(tmp_path: Path) -> None:
    for v in (2, 10, 9):
        _version(tmp_path, "m", v)
    (tmp_path / "m" / "notes").mkdir()  # not a version
    assert list_versions(tmp_path / "m") == [2, 9, 10]
    assert list_versions(tmp_path / "absent") == []
    assert version_dir(tmp_path, "m") == tmp_path / "m" / "10"
    assert version_dir(tmp_path, "m", 9) == tmp_path / "m" / "9"
    with pytest.raises(ModelVersionError, match=r"versions: \[2, 9, 10\]"):
        version_dir(tmp_path, "m", 3)
    with pytest.raises(ModelVersionError, match="no version folders"):
        version_dir(tmp_path, "other")


def test_metadata_is_typed(tmp_path: Path) -> None:
    meta = read_metadata(_version(tmp_path, "m", 1, max_batch_size=16, operating_point={"threshold": 0.3},
                                  lineage={"run_id": "r"}))
    assert meta.version == "1" and meta.class_names == ["malignant", "benign"] and meta.max_batch_size == 16
    assert meta.input.name == "image" and (meta.input.channels, meta.input.size) == (1, 28)
    assert meta.input.window == (40.0, 400.0)
    assert meta.operating_point == {"threshold": 0.3} and meta.lineage == {"run_id": "r"} and meta.parity == []


def test_unknown_or_incomplete_metadata_is_refused_with_the_file(tmp_path: Path) -> None:
    folder = _version(tmp_path, "m", 1)
    (folder / "metadata.json").write_text(json.dumps({"class_names": ["a", "b"], "input": {}}))
    with pytest.raises(ModelVersionError, match=r"metadata schema None is not supported.*re-export"):
        read_metadata(folder)
    (folder / "metadata.json").write_text(json.dumps({"schema": METADATA_SCHEMA, "class_names": ["a"]}))
    with pytest.raises(ModelVersionError, match=r"lacks \['input'\]"):
        read_metadata(folder)
    with pytest.raises(ModelVersionError, match="not a version written by python -m export"):
        read_metadata(tmp_path)


def test_rollout_state_and_history_round_trip(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    assert not under_rollout(tmp_path, "m") and read_rollout_state(model) == RolloutState()
    write_rollout_state(model, RolloutState(production=3, previous=[1, 2], candidate=4, mode="canary",
                                            canary_share=0.1))
    state = read_rollout_state(model)
    assert under_rollout(tmp_path, "m") and state.served_versions == [3, 4] and state.updated
    append_history(model, {"action": "promote", "version": 3})
    append_history(model, {"action": "rollback", "to": 2})
    history = read_history(model)
    assert [h["action"] for h in history] == ["promote", "rollback"] and history[0]["model"] == "m"
