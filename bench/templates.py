"""Fill the configuration and Lua templates kept in bench/conf/."""
from __future__ import annotations

import re
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent / "conf"


def fill(template: str, **values: object) -> str:
    """The template with every @NAME@ replaced; a placeholder left unfilled is an error."""
    text = (CONF_DIR / template).read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise ValueError(f"{template}: no value for {', '.join(sorted(set(left)))}")
    return text
