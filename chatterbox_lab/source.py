"""Show the code of a change on a notebook page, read from the package's own source.

A notebook that teaches a step shows the lines that make it. Pasting them would drift from the
package the moment someone edits it; reading them with `inspect` keeps the page and the package
the same code. `show_code(...)` returns a `CodeView`: syntax-highlighted code in Jupyter, plain
text elsewhere, each block captioned with its file and line numbers. `beside=` puts upstream's
code next to ours where the comparison teaches.

This is a foundation module: it imports no subpackage of chatterbox_lab.
"""
from __future__ import annotations

import html
import importlib
import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


@dataclass(frozen=True)
class SourceBlock:
    """The source of one object: its code, dedented, and where it lives."""

    name: str
    path: str  # relative to the directory that holds the object's top-level package
    first_line: int
    last_line: int
    code: str

    @property
    def caption(self) -> str:
        return f"{self.name} · {self.path}, lines {self.first_line}–{self.last_line}"


@dataclass(frozen=True)
class CodeView:
    """Ours (one or more blocks), and optionally upstream's blocks to show beside them.

    Jupyter picks `_repr_html_` (two columns when `beside` is set) or `_repr_markdown_` (fenced
    Python, one block after another); a terminal or a log gets `str()`, plain text.
    """

    ours: tuple
    beside: tuple = ()

    def __str__(self) -> str:
        return "\n\n".join(f"# {block.caption}\n{block.code}" for block in self.ours + self.beside)

    __repr__ = __str__

    def _repr_markdown_(self) -> str:
        return "\n\n".join(f"*{block.caption}*\n\n```python\n{block.code}\n```" for block in self.ours + self.beside)

    def _repr_html_(self) -> str:
        left = "".join(_html_block(block) for block in self.ours)
        if not self.beside:
            return left
        right = "".join(_html_block(block) for block in self.beside)
        # A table, not CSS columns: notebook viewers that strip stylesheets still keep tables.
        return (f"<table><tr><th>ours</th><th>upstream</th></tr>"
                f'<tr><td style="vertical-align:top">{left}</td>'
                f'<td style="vertical-align:top">{right}</td></tr></table>')


def show_code(*objects, beside=None) -> CodeView:
    """The source of `objects` (functions, classes, methods, modules or "module:qualname"
    strings) for a notebook cell, with `beside` (one such object or a list of them) next to it."""
    if not objects:
        raise ValueError("show_code needs at least one object: a function, class, method, module "
                         "or a 'module:qualname' string such as 'chatterbox_lab.decode.kv_cache:StaticKVCache'")
    if beside is None:
        beside = ()
    elif not isinstance(beside, (list, tuple)):
        beside = (beside,)
    return CodeView(tuple(source_block(o) for o in objects), tuple(source_block(o) for o in beside))


def source_block(target) -> SourceBlock:
    """One object's source as a `SourceBlock` (see `show_code` for what `target` may be)."""
    obj = resolve(target) if isinstance(target, str) else target
    obj = _unwrapped(obj)
    if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismethod(obj)):
        raise TypeError(f"show_code cannot read the source of {target!r} ({type(target).__name__}): pass a "
                        "function, class, method or module, or a 'module:qualname' string")
    try:
        lines, start = inspect.getsourcelines(obj)
        file = inspect.getsourcefile(obj)
    except (OSError, TypeError) as error:
        raise ValueError(f"{_name_of(obj)} has no Python source to show ({error}); it is built in or "
                         "defined in a notebook cell: pass an object defined in a .py file") from None
    first = max(start, 1)  # a module starts at line 0 for inspect
    return SourceBlock(name=_name_of(obj), path=_relative_path(obj, file), first_line=first,
                       last_line=first + len(lines) - 1, code=textwrap.dedent("".join(lines)).rstrip("\n"))


def resolve(spec: str):
    """The object a "module:qualname" string names (or the module itself, without ":qualname")."""
    module_name, _, qualname = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"show_code could not import {module_name!r} from {spec!r} ({error}); "
                         "write the module's dotted name, e.g. 'chatterbox.models.t3.t3:T3.inference'") from None
    for part in filter(None, qualname.split(".")):
        if not hasattr(obj, part):
            raise ValueError(f"{_name_of(obj)} has no attribute {part!r} (from {spec!r}); check the "
                             "qualname after the colon")
        obj = getattr(obj, part)
    return obj


def _unwrapped(obj):
    """The plain function behind a property, a static or class method, or a decorator that kept
    `__wrapped__` (functools.wraps, torch.compile, lru_cache)."""
    if isinstance(obj, property):
        obj = obj.fget
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    try:
        return inspect.unwrap(obj)
    except ValueError:  # a cycle of __wrapped__: show the outermost object
        return obj


def _name_of(obj) -> str:
    if isinstance(obj, ModuleType):
        return obj.__name__
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _relative_path(obj, file: str) -> str:
    """`file` relative to the directory holding the object's top-level package, so the caption
    reads `chatterbox_lab/decode/kv_cache.py` or `chatterbox/models/t3/t3.py` on any machine."""
    module = obj if inspect.ismodule(obj) else inspect.getmodule(obj)
    top = importlib.import_module(module.__name__.split(".")[0]) if module else None
    root = getattr(top, "__file__", None)
    path = Path(file).resolve()
    if root and Path(root).name == "__init__.py":
        try:
            return path.relative_to(Path(root).resolve().parent.parent).as_posix()
        except ValueError:
            pass
    return path.name


def _html_block(block: SourceBlock) -> str:
    caption = f"<p><em>{html.escape(block.caption)}</em></p>"
    try:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer
    except ImportError:  # plain, still readable
        return f"{caption}<pre>{html.escape(block.code)}</pre>"
    # Inline styles (noclasses): the colours survive where the notebook's stylesheet does not.
    formatter = HtmlFormatter(noclasses=True, linenos="inline", linenostart=block.first_line)
    return caption + highlight(block.code, PythonLexer(), formatter)
