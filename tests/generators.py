"""Hypothesis strategies shared by the protocol tests."""

from __future__ import annotations

from hypothesis import strategies as st

from sync_protocol import Change, Op

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=24)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(max_size=40),
    st.binary(max_size=40),
)
field_maps = st.dictionaries(st.text(min_size=1, max_size=12), scalars, max_size=6)


@st.composite
def change_runs(draw: st.DrawFn, origin: str | None = None) -> list[Change]:
    """A node's contiguous run of arbitrary (wire-valid) changes."""
    node = origin or draw(ids)
    first = draw(st.integers(min_value=1, max_value=2**40))
    count = draw(st.integers(min_value=1, max_value=20))
    out = []
    for i in range(count):
        op = draw(st.sampled_from(list(Op)))
        fields = {} if op is Op.DELETE else draw(field_maps)
        old = draw(st.one_of(st.none(), field_maps)) if op is Op.UPDATE else None
        out.append(
            Change(
                node,
                first + i,
                draw(ids),
                draw(ids),
                op,
                fields,
                draw(st.integers(min_value=0, max_value=2**62)),
                draw(st.integers(min_value=0, max_value=2**62)),
                old,
            )
        )
    return out
