"""The audit chain's canonical form: what an entry's hash covers must never drift.

Entries already stored (at the edge and in the cloud) were hashed over ``json.dumps`` of their
chained fields with sorted keys and no spaces; ``canonical_json`` writes the usual values
itself for speed, and must give that text byte for byte for any entry.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from shared.audit_chain import CHAINED_FIELDS, GENESIS, canonical_json, entry_hash, verify

_values = st.one_of(
    st.none(),
    st.text(),  # any code point: accents, emoji, quotes, control characters, surrogates
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=3),
)
_entries = st.dictionaries(st.sampled_from([*CHAINED_FIELDS, "hash", "extra"]), _values)


def _reference(entry: dict[str, Any]) -> str:
    chained = {name: entry.get(name) for name in CHAINED_FIELDS}
    return json.dumps(chained, sort_keys=True, separators=(",", ":"))


@given(_entries)
def test_the_canonical_text_is_json_dumps_with_sorted_keys_for_any_entry(entry: dict) -> None:
    assert canonical_json(entry) == _reference(entry)


@given(st.text(min_size=64, max_size=64), _entries)
def test_the_hash_covers_the_previous_hash_and_the_canonical_text(prev: str, entry: dict) -> None:
    expected = hashlib.sha256(f"{prev}\n{_reference(entry)}".encode()).hexdigest()
    assert entry_hash(prev, entry) == expected


def test_a_known_entry_keeps_its_known_hash() -> None:
    """Pinned: a change of the canonical form would orphan every chain already stored."""
    entry = {"position": 1, "at_ms": 1_700_000_000_000, "employee_id": "mia",
             "device_id": "dev_1", "action": "add_line",
             "detail": '{"changes":[{"id":"ln_1","name":"Crème brûlée"}]}'}  # fmt: skip
    assert canonical_json(entry) == (
        '{"action":"add_line","at_ms":1700000000000,"detail":"{\\"changes\\":[{\\"id\\":'
        '\\"ln_1\\",\\"name\\":\\"Cr\\u00e8me br\\u00fbl\\u00e9e\\"}]}",'
        '"device_id":"dev_1","employee_id":"mia","position":1}'
    )
    hashed = {**entry, "prev_hash": GENESIS, "hash": entry_hash(GENESIS, entry)}
    assert hashed["hash"] == "9f665cd2597746612ce9c7a96d5af94d16944e5e9c582e46303262f6cec6843b"
    assert verify([hashed]).ok
    assert not verify([{**hashed, "detail": hashed["detail"].replace("è", "e")}]).ok
