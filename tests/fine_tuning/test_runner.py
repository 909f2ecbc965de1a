"""The job runner's choices that need no model: "auto" hyperparameters and the label an F1 is scored on."""

from fine_tuning.runner import AUTO_LR_MULTIPLIERS, positive_label, resolve_hyperparameters


def test_auto_hyperparameters():
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    # ~4,000 examples seen, 3 to 10 epochs; batches of 16; the multiplier search only with a validation file
    assert resolve_hyperparameters(auto, 3902, True) == (3, 16, list(AUTO_LR_MULTIPLIERS))
    assert resolve_hyperparameters(auto, 800, False) == (5, 16, [1.0])
    assert resolve_hyperparameters(auto, 12, True)[:2] == (10, 12)
    assert resolve_hyperparameters(auto, 40_000, True)[0] == 3
    given = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.3}
    assert resolve_hyperparameters(given, 3902, True) == (2, 4, [0.3])
    assert resolve_hyperparameters({}, 3902, False) == (3, 16, [1.0])  # absent means "auto"


def test_positive_label_is_the_rarer_of_two():
    spec = {"task_type": "classify", "labels": ["ham", "spam"]}
    assert positive_label(spec, {"ham": 90, "spam": 10}) == "spam"
    assert positive_label(spec, {"ham": 5, "spam": 5}) == "ham"  # a tie: the first
    assert positive_label({"task_type": "classify", "labels": ["a", "b", "c"]}, {}) is None
    assert positive_label({"task_type": "extract", "labels": ["person", "place"]}, {}) is None
