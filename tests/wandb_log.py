"""Read the records of a W&B ``.wandb`` transaction log (LevelDB log format) with W&B's own protobufs."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

HEADER = 7  # ":W&B", magic (2 bytes), version (1 byte)
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def run_config(path: Path) -> dict[str, Any]:
    """The run's config as W&B would sync it: key -> value."""
    config: dict[str, Any] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
    return config


def history(path: Path, key: str) -> list[Any]:
    """Every logged value of one metric, in order."""
    values = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                if (item.key or "/".join(item.nested_key)) == key:
                    values.append(json.loads(item.value_json))
    return values


def run_header(path: Path) -> dict[str, Any]:
    """Name, tags and group of the run as W&B recorded them."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return {"name": record.run.display_name, "tags": list(record.run.tags), "group": record.run.run_group}
    raise ValueError(f"{path}: no run record")


def artifacts(path: Path) -> list[dict[str, Any]]:
    """Logged artifacts: name, type, metadata and manifest entries (path -> reference)."""
    found = []
    for record in records(path):
        if record.WhichOneof("record_type") == "artifact":
            art = record.artifact
            found.append({"name": art.name, "type": art.type,
                          "metadata": json.loads(art.metadata) if art.metadata else {},
                          "files": {m.path: m.ref for m in art.manifest.contents}})
    return found


def logged_keys(path: Path) -> set[str]:
    keys = set()
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return keys


def final_summary(path: Path) -> dict[str, Any]:
    """The run summary (last value per key) as W&B would sync it."""
    summary: dict[str, Any] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary
