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
