"""sync_protocol stays pure: it imports nothing that does I/O."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sync_protocol"

ALLOWED = {
    "__future__",
    "collections",
    "dataclasses",
    "enum",
    "hashlib",
    "types",
    "typing",
    "zlib",
    "msgpack",
    "msgspec",  # the push payload's typed reader: pure (C, no I/O)
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_sync_protocol_imports_only_pure_modules() -> None:
    files = sorted(PACKAGE.glob("*.py"))
    assert files, "sync_protocol has no modules"
    for path in files:
        bad = _imports(path) - ALLOWED
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_importing_sync_protocol_loads_no_io_module() -> None:
    probe = (
        "import sys, msgpack, msgspec, hashlib, zlib; before = set(sys.modules);"
        "import sync_protocol, sync_protocol.session, sync_protocol.checksum;"
        "bad = {'asyncio','socket','sqlite3','aiohttp','asyncpg','aiosqlite','ssl','select',"
        "'selectors','random','time','threading','os'} & (set(sys.modules) - before);"
        "print(','.join(sorted(bad)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"sync_protocol pulled in I/O modules: {out}"
