"""Counts in the sentences commands print: "1 row", "2 rows", never "1 rows"."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` with `noun`, in the plural (`noun` + "s" unless given) unless n is exactly 1:
    counted(1, "row") is "1 row", counted(2, "loss", "losses") is "2 losses"."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"
