"""The README's job-file key tables, made from the schemas in the code.

`python tools/readme_keys.py` prints them; `python tools/readme_keys.py --write`
puts them between the markers in README.md. `tests/unit/test_docs.py` checks the
README holds exactly what this prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pserver.config.schema import Key, keys, shown_default
from trainer.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- keys:start -->", "<!-- keys:end -->"


def _row(k: Key) -> str:
    if k.required:
        shown = "required"
    elif k.shown is not None:
        shown = k.shown
    else:
        shown = f"`{shown_default(k)!r}`".replace("|", "\\|")
    return f"| `{k.name}` | {k.type} | {shown} | {k.doc} |"


def tables() -> str:
    out = []
    for title, cls in SECTIONS:
        out += [f"**[{title}]**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [_row(k) for k in keys(cls)]
        out.append("")
    return "\n".join(out).rstrip()


def current(readme: str) -> str:
    return readme.split(START, 1)[1].split(END, 1)[0].strip()


if __name__ == "__main__":
    text = tables()
    if "--write" in sys.argv:
        path = ROOT / "README.md"
        readme = path.read_text()
        head, rest = readme.split(START, 1)
        path.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")
    else:
        print(text)
