"""Force notebook execution in CI, keep the cache for writing at a desk; and make sure
every figure reaches the page as an image.

myst-nb's cache keys only on cell text, so a chapter whose imported package code
changed would be served stale outputs from the cache. That is a convenience while
writing, never acceptable for the published book: when ``CI=true`` (CI sets it) or
``SCRATCHLM_FORCE_EXECUTION=1``, every chapter is executed from scratch.

A kernel started with ``MPLBACKEND`` set (``Agg`` is common on headless machines, and
CI sets it for the tests) keeps that backend instead of IPython's inline one, and then
a glued figure has no image to show: the page gets the text ``<Figure size ...>``. The
kernels inherit this process's environment, so the variable is dropped here, and a
figure that still comes out as text is a build warning, which CI turns into an error.
"""

import os

from docutils import nodes
from sphinx.util import logging

logger = logging.getLogger(__name__)


def _force_in_ci(app, config) -> None:
    if os.environ.get("CI") == "true" or os.environ.get("SCRATCHLM_FORCE_EXECUTION") == "1":
        config.nb_execution_mode = "force"


def _inline_figures(app, config) -> None:
    os.environ.pop("MPLBACKEND", None)


def _refuse_figures_as_text(app, doctree, docname) -> None:
    for block in doctree.findall(nodes.literal_block):
        if block.astext().startswith("<Figure size"):
            logger.warning(
                "a matplotlib figure reached the page as text, not an image "
                "(was the kernel's MPLBACKEND set?)",
                location=block,
            )


def setup(app):
    app.connect("config-inited", _force_in_ci)
    app.connect("config-inited", _inline_figures)
    app.connect("doctree-resolved", _refuse_figures_as_text)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
