"""How every benchmark hands over its result: its lines printed, and written to `--out` where one is given."""
from pathlib import Path


def emit(lines: list[str], out: str | Path | None) -> None:
    """Print `lines`; with `out`, also write them to that file."""
    print("\n".join(lines))
    if out:
        write(lines, out)


def write(lines: list[str], out: str | Path) -> None:
    """`lines` to the file `out`, its folder made where missing."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n")
