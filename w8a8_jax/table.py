"""Plain-text tables for reports and the command line."""

from collections.abc import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Left-aligned columns separated by two spaces, a dashed rule under the header."""
    cells = [tuple(str(cell) for cell in row) for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
