"""Print README.md's numbered set-up command N (the one-line ```bash block under "**N. ...**").

``.ci/run`` runs command 2 exactly as the README writes it, so CI proves what a reader would type.
Stdlib only: it runs before anything is installed. Exits 1 when the command cannot be found.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_command(number: int, text: str | None = None) -> str:
    text = README.read_text(encoding="utf-8") if text is None else text
    pattern = rf"^\*\*{number}\. [^\n]*\n.*?^```bash\n(.*?)^```"
    match = re.search(pattern, text, flags=re.MULTILINE | re.DOTALL)
    if match is None:
        raise LookupError(f"README.md has no '**{number}. ...**' paragraph followed by a ```bash block")
    lines = [line for line in match.group(1).splitlines() if line.strip()]
    if len(lines) != 1:
        raise LookupError(f"README.md command {number} is not one line: {lines!r}")
    return lines[0].strip()


def main(argv: list[str]) -> int:
    number = int(argv[1]) if len(argv) > 1 else 2
    try:
        print(readme_command(number))
    except LookupError as exc:
        print(f"readme_command: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
