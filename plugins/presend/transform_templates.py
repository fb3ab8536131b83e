"""Work dbt repeats for every node of a build, done once per process instead.

- Jinja: dbt compiles each node's SQL, each test's and each of its rendered arguments from
  its text with a new Jinja environment every time (dbt_common.clients.jinja.get_template):
  lexing, parsing and generating Python for templates whose text is the same from one build
  to the next, and often from one test to the next (every primary_key test's SQL is one
  line calling the test macro). share_compiled_templates() keeps the compiled code of each
  text per kind of dbt environment; each template still gets its own globals, as before.
  dbt's macros have their own cache already (transform._compile_templates).
- agate: every query result dbt loads into a table (get_columns_in_relation of each
  incremental model, each test's result) builds a type tester with new date and time types,
  whose parser (parsedatetime's Calendar) rebuilds its locale tables each time, and so does
  the empty table of each statement that returns no rows. dbt shares one tester for the
  default case across threads already; share_type_testers() shares one per set of
  text-only columns the same way, and builds empty tables without one.

Both together: ~0.2 s of the Python time of an incremental build at 1M contacts (py-spy),
on the threads that run the models. Called where presend warms dbt up (transform.preload_dbt),
so the processes it forks inherit them; they change nothing a node renders or returns.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

# Distinct template texts a process keeps: a project's nodes, tests and test arguments come
# to a few hundred; an edited project adds its new texts.
_MAX_TEMPLATES = 4096
_applied = False


def share_compiled_templates() -> bool:
    """Cache the code dbt's Jinja environments compile, by text (once per process); False
    if dbt_common is not shaped as this was written for (1.x): then nothing changes."""
    global _applied
    if _applied:
        return True
    import jinja2
    from dbt_common.clients import jinja

    fuzz = jinja.MacroFuzzEnvironment  # NativeSandboxEnvironment is one too
    if "compile" in vars(fuzz) or not issubclass(jinja.NativeSandboxEnvironment, fuzz):
        return False
    uncached = jinja2.Environment.compile
    codes: dict[tuple, Any] = {}

    def compile(
        self: Any,
        source: Any,
        name: str | None = None,
        filename: str | None = None,
        raw: bool = False,
        defer_init: bool = False,
    ) -> Any:
        if raw or not isinstance(source, str):  # Python source, or a parsed template
            return uncached(self, source, name, filename, raw, defer_init)
        # The code Jinja generates depends on the environment's class, extensions, lexer
        # (syntax options; Jinja shares one lexer between environments with the same) and
        # code options, which dbt's get_environment sets alike for every node; not on its
        # globals or undefined type, which the code reads from the environment and context
        # it runs with.
        key = (
            type(self),
            tuple(sorted(self.extensions)),
            self.lexer,
            self.optimized,
            self.autoescape,
            self.finalize,
            self.is_async,
            source,
            name,
            filename,
            defer_init,
        )
        code = codes.get(key)
        if code is None:
            code = uncached(self, source, name, filename, raw, defer_init)
            if len(codes) < _MAX_TEMPLATES:
                codes[key] = code
        return code

    fuzz.compile = compile
    _applied = True
    return True


def share_type_testers() -> bool:
    """One agate type tester per set of text-only columns, as dbt_common already shares its
    default one, and none for an empty table (the result of every statement that returns
    no rows); once per process. False if dbt_common is not shaped as expected."""
    from dbt_common.clients import agate_helper

    build = getattr(agate_helper, "build_type_tester", None)
    if build is None:
        return False
    if getattr(build, "_presend_shared", False):
        return True

    @functools.lru_cache(maxsize=256)
    def shared(text_columns: tuple[str, ...], string_null_values: tuple[str, ...] | None) -> Any:
        return build(text_columns, string_null_values=string_null_values)

    def build_type_tester(
        text_columns: Iterable[str], string_null_values: Iterable[str] | None = ("null", "")
    ) -> Any:
        nulls = None if string_null_values is None else tuple(string_null_values)
        return shared(tuple(text_columns), nulls)

    def empty_table() -> Any:
        # As dbt_common's, without a type tester to find the types of no columns.
        return agate_helper.agate.Table(rows=[], column_names=[], column_types=[])

    build_type_tester._presend_shared = True
    agate_helper.build_type_tester = build_type_tester
    agate_helper.empty_table = empty_table
    return True
