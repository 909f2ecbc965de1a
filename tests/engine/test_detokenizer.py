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
