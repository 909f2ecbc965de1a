from app.task_types.encoding import bio_tags, decode_entities, extract_encoding
from training.data import entities_from_bio, extract_example


def test_extract_encoding_points_at_each_words_first_token_in_the_second_copy(tiny):
    tok = tiny.tokenizer
    text = "Justin Bieber   visited Paris-Nord today"
    enc = extract_encoding(tok, text)
    n = (len(enc.ids) - 1) // 2
    assert enc.ids[:n] == enc.ids[n + 1:]  # the text twice, around the separator
    assert enc.tagged_words == list(range(len(enc.words))) and len(enc.positions) == 5
    for (start, end), pos in zip(enc.words, enc.positions):
        piece = tok.decode([enc.ids[pos]]).strip()
        assert piece and text[start:end].startswith(piece)


def test_bio_decoding_gives_character_offsets(tiny):
    text = "Justin Bieber visited Paris today"
    enc = extract_encoding(tiny.tokenizer, text)
    tags = bio_tags(["person", "geo-loc"])
    ids = [tags.index(t) for t in ["B-person", "I-person", "O", "B-geo-loc", "O"]]
    assert decode_entities(text, enc, ids, tags) == [
        {"text": "Justin Bieber", "label": "person", "start": 0, "end": 13},
        {"text": "Paris", "label": "geo-loc", "start": 22, "end": 27}]
    # a stray I- tag still decodes to a well-formed entity; out-of-range ids read as O
    ids = [tags.index("I-geo-loc"), 99, 0, 0, 0]
    assert decode_entities(text, enc, ids, tags) == [{"text": "Justin", "label": "geo-loc", "start": 0, "end": 6}]


def test_training_targets_agree_with_the_data(tiny):
    row = {"tokens": ["I", "love", "New", "York", "and", "Eli"],
           "tags": ["O", "O", "B-geo-loc", "I-geo-loc", "O", "B-person"]}
    text, ents = entities_from_bio(row["tokens"], row["tags"])
    assert text == "I love New York and Eli"
    assert ents == [{"label": "geo-loc", "start": 7, "end": 15}, {"label": "person", "start": 20, "end": 23}]
    tags = bio_tags(["person", "geo-loc"])
    ex = extract_example(tiny.tokenizer, row, ["person", "geo-loc"])
    assert [tags[t] for t in ex.targets] == row["tags"]
