"""Print one of the README's two set-up commands: `main` or `test`.

The README marks each with an HTML comment (<!-- main-command -->, <!-- test-command -->)
followed by a fenced bash block; CI runs exactly that text.
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_command(which: str, readme: Path = README) -> str:
    text = readme.read_text()
    match = re.search(rf"<!-- {which}-command -->\s*```bash\n(.*?)\n```", text, re.S)
    if not match:
        raise SystemExit(f"README.md has no <!-- {which}-command --> block")
    return match.group(1).strip()


if __name__ == "__main__":
    print(readme_command(sys.argv[1] if len(sys.argv) > 1 else "test"))
