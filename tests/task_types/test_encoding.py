import pytest

from app.task_types.encoding import best_bio_path, bio_tags, decode_entities, extract_encoding
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


def _valid_bio(path: list[int], tags: list[str]) -> bool:
    for k, j in enumerate(path):
        if tags[j].startswith("I-") and (k == 0 or tags[path[k - 1]][2:] != tags[j][2:]):
            return False
    return True


def test_best_bio_path_is_the_best_valid_sequence():
    """Against brute force over every tag sequence, on random scores: valid BIO, and no valid sequence
    scores higher."""
    import itertools
    import random

    tags = bio_tags(["person", "loc"])  # O, B-person, I-person, B-loc, I-loc
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 4)
        logprobs = [[rng.uniform(-5, 0) for _ in tags] for _ in range(n)]
        path = best_bio_path(logprobs, tags)
        assert len(path) == n and _valid_bio(path, tags)
        best = max(sum(logprobs[k][j] for k, j in enumerate(p))
                   for p in itertools.product(range(len(tags)), repeat=n) if _valid_bio(list(p), tags))
        assert sum(logprobs[k][j] for k, j in enumerate(path)) == pytest.approx(best)


def test_best_bio_path_keeps_a_valid_argmax_and_repairs_an_invalid_one():
    tags = bio_tags(["person"])  # O, B-person, I-person
    lp = [[-0.1, -3, -3], [-3, -0.2, -2], [-3, -2, -0.1]]  # argmax O B I: valid
    assert best_bio_path(lp, tags) == [0, 1, 2]
    lp = [[-0.1, -3, -3], [-3, -1.0, -0.5], [-3, -2, -0.1]]  # argmax O I I: invalid, B I is the best repair
    assert best_bio_path(lp, tags) == [0, 1, 2]
    assert best_bio_path([], tags) == []
