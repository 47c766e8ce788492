"""The README's job-file key tables, made from the schemas in the code.

`python tools/readme_keys.py` prints them; `python tools/readme_keys.py --write`
puts them between the markers in README.md. `tests/test_docs.py` checks the
README holds exactly what this prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- keys:start -->", "<!-- keys:end -->"


def _row(name: str, typ: type, default: object, doc: str, required: bool = False) -> str:
    shown = "required" if required else f"`{default!r}`".replace("|", "\\|")
    return f"| `{name}` | {typ.__name__} | {shown} | {doc} |"


def tables() -> str:
    from ckpt.config import KEYS as CKPT
    from pserver.config import NAMED_SCHEMAS, SCHEMAS
    from trainer.config import DATA_KEYS, TRAINER_KEYS
    from trainer.models import MODEL_SCHEMA

    sections = [(f"[{s}]", keys) for s, keys in SCHEMAS.items()]
    sections += [(f"[{s}.NAME]", keys) for s, keys in NAMED_SCHEMAS.items()]
    sections += [("[trainer]", TRAINER_KEYS), ("[data]", DATA_KEYS)]
    out = []
    for title, keys in sections:
        out += [f"**{title}**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for k in keys:
            required = k.default is None and k.name != "seed"
            default = "derived" if k.name == "seed" and k.default is None else k.default
            out.append(_row(k.name, k.type, default, k.doc, required))
        out.append("")
    out += ["**[model]**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    out += [_row(k.name, k.type, k.default, k.doc) for k in MODEL_SCHEMA]
    out += ["", "**[checkpoint]**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    out += [_row(n, t, d, doc) for n, (t, d, doc) in CKPT.items()]
    return "\n".join(out).replace("`'derived'`", "derived")


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
