"""The order in which `make test`'s workers take the test files (tests/conftest.py)."""

from file_seconds import ROOT, longest_first, stored


def test_longest_first_puts_unlisted_files_first_then_descending_seconds():
    seconds = {"short.py": 5, "long.py": 300, "middle.py": 40, "tie.py": 40}
    paths = ["short.py", "middle.py", "new.py", "long.py", "tie.py"]
    assert longest_first(paths, seconds) == ["new.py", "long.py", "middle.py", "tie.py", "short.py"]


def test_stored_seconds_name_existing_test_files():
    # A renamed or deleted file left in the table would order nothing; refresh the table
    # with tests/file_seconds.py.
    seconds = stored()
    assert seconds and all(value >= 0 for value in seconds.values())
    missing = [path for path in seconds if not (ROOT / path).is_file()]
    assert not missing, missing


def test_collection_is_in_longest_first_order(request):
    files = list(dict.fromkeys(item.nodeid.split("::")[0] for item in request.session.items))
    assert files == longest_first(files, stored())
