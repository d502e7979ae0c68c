"""show_code renders the package's own source for a notebook page, captioned with file and lines."""
import inspect

import pytest

from chatterbox_lab import show_code
from chatterbox_lab.decode import kv_cache
from chatterbox_lab.decode.kv_cache import StaticKVCache, cache_len_for


def test_a_function_shows_its_own_lines_with_file_and_line_numbers():
    view = show_code(cache_len_for)
    (block,) = view.ours
    lines, start = inspect.getsourcelines(cache_len_for)
    assert block.path == "chatterbox_lab/decode/kv_cache.py"
    assert (block.first_line, block.last_line) == (start, start + len(lines) - 1)
    assert block.code.startswith("def cache_len_for(")
    assert f"lines {start}–{start + len(lines) - 1}" in str(view)


def test_a_method_is_dedented_and_a_string_names_the_same_object():
    method = next(name for name, _ in inspect.getmembers(StaticKVCache, inspect.isfunction) if not name.startswith("__"))
    by_object = show_code(getattr(StaticKVCache, method))
    by_name = show_code(f"chatterbox_lab.decode.kv_cache:StaticKVCache.{method}")
    assert by_object == by_name
    assert by_object.ours[0].code.startswith("def ")


def test_a_module_starts_at_line_one_and_several_objects_stay_in_order():
    view = show_code(kv_cache, StaticKVCache)
    assert view.ours[0].first_line == 1
    assert view.ours[0].last_line == len(inspect.getsource(kv_cache).splitlines())
    assert view.ours[1].code.startswith("class StaticKVCache")


def test_jupyter_gets_highlighted_markdown_and_html_a_terminal_plain_text():
    view = show_code(cache_len_for)
    assert "```python\ndef cache_len_for(" in view._repr_markdown_()
    assert "kv_cache.py" in view._repr_html_() and "<table" not in view._repr_html_()
    assert "```" not in str(view) and "<" not in str(view).splitlines()[0]


def test_upstream_beside_ours_is_two_columns_in_html_and_one_after_the_other_in_text():
    view = show_code(cache_len_for, beside="chatterbox.models.t3.t3:T3.inference")
    assert view.beside[0].path == "chatterbox/models/t3/t3.py"
    page = view._repr_html_()
    assert "<table" in page and page.index("cache_len_for") < page.index("T3.inference")
    text = str(view)
    assert text.index("def cache_len_for") < text.index("def inference")


@pytest.mark.parametrize("bad, says", [
    ((), "at least one object"),
    ((3,), "pass a function, class, method or module"),
    (("chatterbox_lab.no_such_module:f",), "could not import"),
    (("chatterbox_lab.decode.kv_cache:NoSuchThing",), "has no attribute 'NoSuchThing'"),
    ((len,), "pass a function, class, method or module"),
])
def test_bad_input_says_what_to_pass(bad, says):
    with pytest.raises((TypeError, ValueError), match=says):
        show_code(*bad)


def test_code_defined_in_a_notebook_cell_is_refused_with_a_reason():
    namespace = {}
    exec(compile("def made_in_a_cell():\n    return 1\n", "<cell>", "exec"), namespace)
    with pytest.raises(ValueError, match="defined in a .py file"):
        show_code(namespace["made_in_a_cell"])
