"""How the book's pages look: numbered figures, crisp images, math without a network.

A Sphinx extension (listed in ``_config.yml``) holding the few presentation rules that no
configuration value expresses:

* **Figures are numbered by chapter.** ``Figure 3.2`` is the second numbered figure of
  ``book/03_*.md`` (appendix pages ``9N_*`` are lettered: ``Figure A.1``). Sphinx alone numbers
  figures through the whole book unless the table of contents is numbered, and a numbered table
  of contents would number the chapter titles twice (they carry their number already).
* **2x figures are shown at their natural size.** The shared style ``book.mplstyle`` renders at
  192 dpi, twice the CSS pixel. A PNG records its dpi; an output image whose dpi is above 96 gets
  the width it has at 96 dpi, so it is sharp on high-density screens and no larger than intended.
* **MathJax comes from the book.** ``static/mathjax/tex-svg-full.js`` is served from ``_static``,
  so formulas render offline; SVG output draws its own glyphs and needs no font files.
* **No script twice.** sphinx-thebe and sphinx-togglebutton add their inline scripts both to
  the registry and to the builder (once with filename ``None``, once ``""``), so a page carried
  each twice and the browser reported ``THEBE_JS_URL`` as declared twice.
* **No "Book — Book" in the home page's tab** (``templates/layout.html``).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

STATIC = Path(__file__).parent / "static"
TEMPLATES = Path(__file__).parent / "templates"
MATHJAX = "mathjax/tex-svg-full.js"  # relative to _static
CSS_PIXELS_PER_INCH = 96
CHAPTER = re.compile(r"(?:^|/)(\d\d)_[^/]*$")


def _configure(app, config) -> None:
    if str(STATIC) not in map(str, config.html_static_path):
        config.html_static_path.append(str(STATIC))
    config.templates_path.append(str(TEMPLATES))  # layout.html: no "Book - Book" tab title
    config.mathjax_path = MATHJAX


def png_dpi(path: Path) -> tuple[int, float] | None:
    """A PNG's pixel width and its dpi (from the pHYs chunk), or None if it records none."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)  # pHYs comes before the image data
    except OSError:
        return None
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    width = struct.unpack(">I", data[16:20])[0]
    at = data.find(b"pHYs")
    if at < 0:
        return None
    per_x, _, unit = struct.unpack(">IIB", data[at + 4 : at + 13])
    if unit != 1 or per_x == 0:  # 1: pixels per metre
        return None
    return width, per_x * 0.0254


def _natural_size_images(app, doctree) -> None:
    """Give each high-dpi output PNG the width it has at 96 dpi (see the module docstring)."""
    from docutils import nodes

    for image in doctree.findall(nodes.image):
        if any(key in image for key in ("width", "height", "scale")):
            continue
        candidate = (image.get("candidates") or {}).get("image/png") or image.get("uri", "")
        if not candidate.endswith(".png"):
            continue
        found = png_dpi(Path(app.srcdir) / candidate.lstrip("/"))  # "/x": srcdir-relative
        if found is None or found[1] <= CSS_PIXELS_PER_INCH * 1.1:
            continue
        width, dpi = found
        image["width"] = f"{round(width * CSS_PIXELS_PER_INCH / dpi)}px"
        image["classes"].append("hidpi")


def chapter_label(docname: str) -> str | int | None:
    """The figure-number prefix of a page: 3 for book/03_word2vec, "A" for book/90_plumbing."""
    match = CHAPTER.search(docname)
    if match is None:
        return None
    number = int(match.group(1))
    return chr(ord("A") + number - 90) if number >= 90 else number


def _number_by_chapter(app, env) -> list[str]:
    """Renumber every numbered figure (and table, code block) as chapter.n, in page order."""
    renumbered = []
    for docname, by_type in env.toc_fignumbers.items():
        label = chapter_label(docname)
        if label is None:
            continue
        for numbers in by_type.values():
            in_order = sorted(numbers, key=lambda node_id: numbers[node_id])
            for n, node_id in enumerate(in_order, start=1):
                numbers[node_id] = (label, n)
        renumbered.append(docname)
    return renumbered


def _one_of_each_script(app, pagename, templatename, context, doctree) -> None:
    """No script twice (sphinx-thebe's and sphinx-togglebutton's inline ones come twice)."""
    scripts, seen = [], set()
    for script in context.get("script_files", []):
        key = (
            getattr(script, "filename", str(script)) or None,  # "" and None: both inline
            tuple(sorted((getattr(script, "attributes", None) or {}).items())),
        )
        if key not in seen:
            seen.add(key)
            scripts.append(script)
    # In place: it is the builder's own list, and handlers after this one still add to it.
    context["script_files"][:] = scripts


def setup(app):
    app.connect("config-inited", _configure)
    app.connect("doctree-read", _natural_size_images, priority=900)  # after image candidates
    app.connect("env-get-updated", _number_by_chapter, priority=900)  # after Sphinx numbers
    app.connect("html-page-context", _one_of_each_script, priority=100)
    app.add_css_file("book.css")
    app.add_js_file("book.js", defer="defer")
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
