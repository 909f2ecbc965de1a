from app.engine.detokenizer import Detokenizer


def _stream(tokenizer, text, stop=()):
    ids = tokenizer.encode(text, add_special_tokens=False)
    d = Detokenizer(tokenizer, tuple(stop))
    parts = [d.step([i]) for i in ids[:-1]] + [d.step(ids[-1:], final=True)]
    return "".join(parts), d


def test_streamed_text_equals_full_decode(tiny):
    text = "Héllo wörld — naïve café 😀 done."
    out, _ = _stream(tiny.tokenizer, text)
    assert out == tiny.tokenizer.decode(tiny.tokenizer.encode(text, add_special_tokens=False))


def test_stop_string_cuts_text_and_is_not_sent(tiny):
    out, d = _stream(tiny.tokenizer, "one two three STOP four five", stop=["STOP"])
    assert out == "one two three " and d.stopped


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tiny):
    out, d = _stream(tiny.tokenizer, "say ST and then more", stop=["STOP"])
    assert out == "say ST and then more" and not d.stopped


def test_long_streams_equal_the_full_decode_token_by_token(tiny):
    """The windowed decoding equals decoding every id at once, for text with multi-byte characters split
    across byte tokens, leading spaces and newlines, fed one token at a time."""
    text = ("Ünïcödé 😀😀 and 中文字符 mixed with spaces   and\nnewlines\t tabs — dashes… " * 8).strip()
    ids = tiny.tokenizer.encode(text, add_special_tokens=False)
    d = Detokenizer(tiny.tokenizer)
    parts = [d.step([i]) for i in ids]
    parts.append(d.step([], final=True))
    assert "".join(parts) == tiny.tokenizer.decode(ids)
