"""Job scripts from templates: `{{ name }}` placeholders, nothing else (no logic in templates).

The templates under launch/templates/ are plain bash a cluster admin can read; `${VAR}` is left alone.
A user may copy one, edit it and pass it back with `--template PATH`.
"""

from __future__ import annotations

import re
from pathlib import Path

from loopstack.errors import UserError

TEMPLATES = Path(__file__).resolve().parent / "templates"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def load_template(name: str, override: str | None = None) -> tuple[str, str]:
    """(text, origin) of a shipped template, or of the user's copy given with --template."""
    path = Path(override) if override else TEMPLATES / name
    try:
        return path.read_text(), str(path)
    except OSError as err:
        raise UserError(f"--template {path}: cannot read ({err.strerror or err})") from None


def render(text: str, values: dict[str, object], origin: str = "template") -> str:
    """Replace every `{{ key }}`; an unknown key is the user's (edited template's) mistake."""
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - values.keys())
    if unknown:
        raise UserError(f"{origin}: unknown placeholder(s) {', '.join('{{' + k + '}}' for k in unknown)}; "
                        f"known: {', '.join(sorted(values))}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)
