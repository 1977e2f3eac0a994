"""Copies the generated result files into the README, between their markers.

  default-model <- docs/default-model.md   (benchmarks/default_model.py)
  speed         <- docs/bench-*.md          (gqsa-gguf bench --out-dir docs)
  quality       <- docs/quality-ablation.md (benchmarks/oneshot_ablation.py)

Nothing in those README sections is typed by hand: rerun the generators, then this script.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def replace_section(text: str, key: str, body: str) -> str:
    m = re.search(rf"(<!-- BEGIN {key}[^\n]*-->\n)(.*?)(<!-- END {key} -->)", text, re.S)
    if not m:
        raise SystemExit(f"README.md has no '{key}' markers")
    return text[:m.start(2)] + body.rstrip("\n") + "\n" + text[m.end(2):]


def demote(md: str) -> str:
    """Headings one level down, so a file's '# Title' sits under the README's sections."""
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", md, flags=re.M)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    sections = {}
    if (DOCS / "default-model.md").exists():
        sections["default-model"] = (DOCS / "default-model.md").read_text()
    bench = sorted(DOCS.glob("bench-*.md"))
    if bench:
        parts = ["### Speed (`gqsa-gguf bench`)", ""]
        for p in bench:
            png = p.with_suffix(".png")
            parts += [p.read_text().rstrip(), ""]
            if png.exists():
                parts += [f"![{p.stem}](docs/{png.name})", ""]
        parts.append("Regenerate: the command under a table, with `--out-dir docs` added, then "
                     "`python scripts/update_readme.py`. Numbers from different machines do not compare.")
        sections["speed"] = "\n".join(parts) + "\n"
    if (DOCS / "quality-ablation.md").exists():
        q = (DOCS / "quality-ablation.md").read_text()
        png = DOCS / "quality-ablation.png"
        sections["quality"] = (demote(q).rstrip() + "\n\n"
                               + (f"![quality](docs/{png.name})\n\n" if png.exists() else "")
                               + "The paper's method before these changes, with its training stages, the "
                                 "learning-rate sweep and the diagnosis of the massive activation: "
                                 "`docs/quality.md`.\n")
    for key, body in sections.items():
        text = replace_section(text, key, body)
    readme.write_text(text)
    print("updated README sections: " + ", ".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
