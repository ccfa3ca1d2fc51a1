import sys
import textwrap
import types

from pipeline.fingerprint import canonical_json, checksum_files, code_version, fingerprint


def _module(name: str, source: str) -> types.ModuleType:
    import linecache

    filename = f"<{name}>"
    source = textwrap.dedent(source)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    mod = types.ModuleType(name)
    mod.__file__ = filename
    exec(compile(source, filename, "exec"), mod.__dict__)
    sys.modules[name] = mod
    return mod


def test_canonical_json_ignores_key_order():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1})
    assert fingerprint({"b": 1, "a": 2}) == fingerprint({"a": 2, "b": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 1.5})


def test_code_version_ignores_docstrings_and_comments_not_code():
    base = code_version(_module("m1", 'def f(x):\n    """Doc."""\n    return x + 1\n'))
    same = code_version(_module("m1", 'def f(x):\n    """Other doc."""\n    # note\n    return x + 1\n'))
    changed = code_version(_module("m1", 'def f(x):\n    """Doc."""\n    return x + 2\n'))
    assert base == same
    assert base != changed


def test_checksum_files_uses_relative_names_and_stat_cache(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(sub)
    files = [tmp_path / "a" / "config.json", tmp_path / "b" / "config.json"]
    cache = tmp_path / "stat.json"
    first = checksum_files(tmp_path, files, stat_cache=cache)
    assert cache.exists()
    assert checksum_files(tmp_path, files, stat_cache=cache) == first
    (tmp_path / "b" / "config.json").write_text("changed")
    assert checksum_files(tmp_path, files, stat_cache=cache) != first
