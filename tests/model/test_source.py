"""The converted model cache is readable by other users: an image converts it as root at build time and
serves it as an unprivileged user (the server once failed there with Permission denied on config.json)."""

import stat

from app.model.source import convert_gguf, embedded_gguf


def test_a_converted_checkpoint_is_readable_by_everyone(tmp_path):
    target = convert_gguf(embedded_gguf(), tmp_path)
    for path in [target, *target.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = 0o555 if path.is_dir() else 0o444
        assert mode & want == want, (path, oct(mode))


def test_the_cache_key_follows_the_bytes_not_the_path(tmp_path):
    """Each clone installs the wheel at its own path: one conversion must serve them all, and any change
    of the file's bytes must give another key (a stale conversion is never served)."""
    import os
    import shutil

    from app.model.source import _conversion_key

    original = embedded_gguf()
    copy = tmp_path / "elsewhere" / original.name
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    os.utime(copy, (1_000_000, 1_000_000))
    assert _conversion_key(copy) == _conversion_key(original)

    with copy.open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert _conversion_key(copy) != _conversion_key(original)
