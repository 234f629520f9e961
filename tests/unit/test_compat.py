"""The private internals of pinned libraries the project uses (sentiment_ray/compat.py) are
where compat expects them, on the installed versions: a version bump that moves one fails
here, loudly, before it fails a user's run."""

from sentiment_ray import compat


def test_every_private_internal_is_where_compat_expects_it():
    assert compat.check() == []


def test_compat_is_the_only_module_that_reaches_into_private_internals():
    import re
    from pathlib import Path

    package = Path(compat.__file__).parent
    private = re.compile(r"_initial_num_input_tokens_seen|_ChunkedLogProbFunction|\._brackets\b|\._rungs\b")
    users = sorted(
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p.name != "compat.py" and private.search(p.read_text(encoding="utf-8"))
    )
    assert users == []
