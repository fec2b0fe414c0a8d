"""Force notebook execution in CI, keep the cache for writing at a desk.

myst-nb's cache keys only on cell text, so a chapter whose imported package code
changed would be served stale outputs from the cache. That is a convenience while
writing, never acceptable for the published book: when ``CI=true`` (CI sets it) or
``SCRATCHLM_FORCE_EXECUTION=1``, every chapter is executed from scratch.
"""

import os


def _force_in_ci(app, config) -> None:
    if os.environ.get("CI") == "true" or os.environ.get("SCRATCHLM_FORCE_EXECUTION") == "1":
        config.nb_execution_mode = "force"


def setup(app):
    app.connect("config-inited", _force_in_ci)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
