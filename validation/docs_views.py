"""GX Data Docs page views that compile each Jinja template once per process.

GX's page views (great_expectations.render.view) make a new Jinja Environment for every view they
build, and with it an empty template cache: every Data Docs build compiled the same ~56 templates
again, ~1 s of CPU of a 5.7 s validation on a 2-core host (the expectations and validations
sections and the index each compile the base page and the blocks they share). These views are GX's
own with one shared bytecode cache (Jinja's documented hook for this): a template's compiled code is
kept by its name and source checksum, so an edited template is compiled again. The docs site
(validation/runner.py) names them in its site_section_builders and site_index_builder config.
"""
from __future__ import annotations

from great_expectations.render.view import DefaultJinjaIndexPageView, DefaultJinjaPageView
from jinja2 import BytecodeCache, Environment
from jinja2.bccache import Bucket


class _InMemory(BytecodeCache):
    """Compiled templates by bucket key (template name and file); the bucket checks the source's
    checksum and Jinja's version on load, and compiles again on a mismatch."""

    def __init__(self) -> None:
        self._code: dict[str, bytes] = {}

    def load_bytecode(self, bucket: Bucket) -> None:
        code = self._code.get(bucket.key)
        if code is not None:
            bucket.bytecode_from_string(code)

    def dump_bytecode(self, bucket: Bucket) -> None:
        self._code[bucket.key] = bucket.bytecode_to_string()


# One per process: the templates are GX's package files, the same for every site and build
COMPILED = _InMemory()


class _CompiledOnce:
    """Sets the shared cache on the Environment GX's view made (its __init__ takes no cache)."""

    env: Environment

    def __init__(self, custom_styles_directory: str | None = None, custom_views_directory: str | None = None) -> None:
        super().__init__(custom_styles_directory, custom_views_directory)  # type: ignore[call-arg]
        self.env.bytecode_cache = COMPILED


class PageView(_CompiledOnce, DefaultJinjaPageView):
    """GX's page view (the expectation suites' and validation results' pages)."""


class IndexPageView(_CompiledOnce, DefaultJinjaIndexPageView):
    """GX's index page view."""
