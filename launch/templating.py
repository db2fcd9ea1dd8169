"""Job scripts from templates: `{{ name }}` placeholders, nothing else (no logic in templates).

The templates under launch/templates/ are plain bash a cluster admin can read; `${VAR}` is left alone.
A user may copy one, edit it and pass it back with `--template PATH`.

No substituted value can end its line: `render` refuses any value holding a control character (a
newline would end an `#SBATCH` block or a comment and start a command), whatever the template. A value
of several lines is a `Lines`, whose lines are checked one by one and joined by the code's separator.
Callers check values against stricter rules first (launch/slurm.py), so their errors name the config key.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from loopstack.errors import UserError

TEMPLATES = Path(__file__).resolve().parent / "templates"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass(frozen=True)
class Lines:
    """A value of several lines (e.g. `#SBATCH` lines, a command continued with ` \\`): each line is checked
    on its own, the separator (which may hold the newline) comes from the code, never from a config."""

    lines: tuple[str, ...]
    sep: str = "\n"

    def __str__(self) -> str:
        return self.sep.join(self.lines)


def control_char(text: str) -> str | None:
    """The first character of `text` that could end or disguise a line (C0/C1 controls such as newline,
    carriage return, tab, escape; Unicode format, line and paragraph separators), or None."""
    for c in text:
        category = unicodedata.category(c)
        if category[0] == "C" or category in ("Zl", "Zp"):
            return c
    return None


def check_line(what: str, value: str) -> str:
    """`value` unchanged if it fits on one line of a script; a one-line UserError naming `what` if not."""
    c = control_char(value)
    if c is not None:
        raise UserError(f"{what} {value!r}: contains the control character {c!r}, which would end its line in "
                        f"the job script (and could start a command there)")
    return value


def load_template(name: str, override: str | None = None) -> tuple[str, str]:
    """(text, origin) of a shipped template, or of the user's copy given with --template."""
    path = Path(override) if override else TEMPLATES / name
    try:
        return path.read_text(), str(path)
    except OSError as err:
        raise UserError(f"--template {path}: cannot read ({err.strerror or err})") from None


def render(text: str, values: dict[str, object], origin: str = "template") -> str:
    """Replace every `{{ key }}`; an unknown key is the user's (edited template's) mistake. No value may hold
    a control character (a `Lines` value: none of its lines), so a value never spans lines of the script."""
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - values.keys())
    if unknown:
        raise UserError(f"{origin}: unknown placeholder(s) {', '.join('{{' + k + '}}' for k in unknown)}; "
                        f"known: {', '.join(sorted(values))}")
    for key, value in values.items():
        for line in value.lines if isinstance(value, Lines) else (str(value),):
            check_line(f"{origin}: the value of {{{{{key}}}}}", line)
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)
