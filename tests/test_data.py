from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import pytest
from datasets import Dataset
from transformers import BertTokenizerFast

import mlc_text.data as data_module
from mlc_text.data import (
    CORPORA,
    NoisyCorpus,
    add_label_noise,
    load_corpus,
    load_user_files,
    prepare_corpus,
    resolve_data_dir,
    save_noise_report,
    split_clean_noisy,
    tokenize_corpus,
)
from mlc_text.data_config import DataArguments, NoiseArguments

WORDS = ["good", "bad", "movie", "food", "great", "awful", "service", "plot", "long", "short"]


def make_rows(num_rows: int, num_classes: int = 3, seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(num_rows) % num_classes).tolist()
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(num_rows)]
    return {"text": texts, "label": labels}


def write(tmp_path, name: str, rows: dict[str, list]) -> str:
    """Writes `rows` with `Dataset.from_dict` in the format the extension names."""
    path = str(tmp_path / name)
    dataset = Dataset.from_dict(rows)
    if name.endswith(".csv"):
        dataset.to_csv(path, index=False)
    elif name.endswith(".parquet"):
        dataset.to_parquet(path)
    else:
        dataset.to_json(path, lines=True)
    return path


def write_lines(tmp_path, name: str, rows: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def user_args(train_file: str, **overrides) -> DataArguments:
    settings = {"train_file": train_file, "num_clean_per_class": 5, "validation_size": 10}
    return DataArguments(**{**settings, **overrides})


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if any data is read: argument errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the arguments were checked")

    monkeypatch.setattr(data_module, "_load", refuse)


# ---------------------------------------------------------------------------------------- named corpora
def test_corpora_table():
    assert set(CORPORA) == {"ag_news", "yelp_polarity", "yelp_review_full", "imdb"}
    assert CORPORA["ag_news"].hub_id == "fancyzhx/ag_news"
    assert CORPORA["ag_news"].label_names == ("World", "Sports", "Business", "Sci/Tech")
    assert CORPORA["yelp_review_full"].hub_id == "Yelp/yelp_review_full"
    assert len(CORPORA["yelp_review_full"].label_names) == 5
    assert CORPORA["imdb"].label_names == ("neg", "pos")
    assert CORPORA["yelp_polarity"].label_names == ("negative", "positive")


def test_resolve_data_dir(monkeypatch):
    monkeypatch.setenv("MLC_TEXT_DATA_DIR", "/from/env")
    assert resolve_data_dir("/given") == "/given"
    assert resolve_data_dir() == "/from/env"
    monkeypatch.delenv("MLC_TEXT_DATA_DIR")
    assert resolve_data_dir() is None


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_load_corpus_from_the_shared_folder(name, data_dir, monkeypatch):
    monkeypatch.setenv("MLC_TEXT_DATA_DIR", data_dir)
    splits, label_names = load_corpus(name)
    meta = json.loads(open(os.path.join(data_dir, name, "meta.json")).read())
    assert label_names == list(CORPORA[name].label_names)
    assert len(label_names) == len(meta["label_names"])
    for split in ("train", "test"):
        assert splits[split].column_names == ["text", "label"]
        assert len(splits[split]) == meta["num_rows"][split]
        labels = np.asarray(splits[split].with_format("numpy")["label"])
        assert labels.min() == 0 and labels.max() == len(label_names) - 1


def test_unknown_corpus_lists_the_names():
    with pytest.raises(ValueError, match="corpus must be one of ag_news, .*imdb, got 'ag-news'"):
        load_corpus("ag-news")


@pytest.mark.parametrize("offline", [True, False])
def test_load_corpus_says_where_to_put_files(tmp_path, monkeypatch, offline):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'fancyzhx/ag_news' on the Hub")

    monkeypatch.setattr(data_module.datasets, "load_dataset", unreachable)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1") if offline else monkeypatch.delenv(name, raising=False)
    expected = os.path.join(str(tmp_path), "ag_news", "train.jsonl")
    with pytest.raises(ValueError, match=f"{expected}.*MLC_TEXT_DATA_DIR"):
        load_corpus("ag_news", data_dir=str(tmp_path))


def test_load_corpus_needs_both_splits(tmp_path):
    (tmp_path / "imdb").mkdir()
    write(tmp_path, "imdb/train.jsonl", make_rows(6, 2))
    with pytest.raises(ValueError, match=r"has no test\.\{jsonl,json,csv,parquet\} file"):
        load_corpus("imdb", data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------- user files
@pytest.mark.parametrize("extension", ["csv", "jsonl", "parquet"])
def test_user_files_in_every_format(tmp_path, extension):
    rows = make_rows(12)
    rows = {"sentence": rows["text"], "y": rows["label"], "extra": list(range(12))}
    train = write(tmp_path, f"train.{extension}", rows)
    test = write(tmp_path, f"test.{extension}", {key: values[:4] for key, values in rows.items()})
    splits, label_names = load_user_files(train, test, text_column="sentence", label_column="y")
    assert label_names == ["0", "1", "2"]
    assert splits["train"].column_names == ["text", "label"]
    assert splits["train"]["text"] == rows["sentence"]
    assert splits["test"]["label"] == rows["y"][:4]


def test_string_labels_are_mapped_for_every_split(tmp_path):
    names = ["sports", "business", "world"]
    train = write(
        tmp_path, "train.csv", {"text": ["a", "b", "c", "d"], "label": ["world", "sports", "business", "world"]}
    )
    test = write(tmp_path, "test.jsonl", {"text": ["e", "f"], "label": ["business", "sports"]})
    splits, label_names = load_user_files(train, test)
    assert label_names == sorted(names)
    assert splits["train"]["label"] == [2, 1, 0, 2]
    assert splits["test"]["label"] == [0, 1]


def test_integer_like_string_labels_sort_numerically(tmp_path):
    train = write_lines(tmp_path, "train.jsonl", [{"text": str(i), "label": str(i)} for i in (10, 2, 1)])
    splits, label_names = load_user_files(train)
    assert label_names == ["1", "2", "10"]
    assert splits["train"]["label"] == [2, 1, 0]


def test_noisy_label_column(tmp_path):
    rows = {"text": ["a", "b", "c", "d"], "gold": [0, -1, 1, None], "weak": [1, 1, 0, 0]}
    train = write(tmp_path, "train.jsonl", rows)
    splits, _ = load_user_files(train, label_column="gold", noisy_label_column="weak")
    assert splits["train"]["label"] == [0, -1, 1, -1]
    assert splits["train"]["noisy_label"] == [1, 1, 0, 0]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("train.txt", "a\n", r"train file '.*train\.txt' must end in one of \.jsonl, \.json, \.csv, \.parquet"),
        ("missing.csv", None, r"train file '.*missing\.csv' does not exist"),
        ("train.csv", "text,label\n", r"train file '.*train\.csv'.*no rows"),
        ("train.jsonl", "", r"train file '.*train\.jsonl' is empty"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        load_user_files(str(tmp_path / name))


def test_missing_file_is_refused_before_reading(tmp_path):
    train = write(tmp_path, "train.csv", make_rows(6))
    with pytest.raises(ValueError, match=r"test file '.*nope\.csv' does not exist"):
        load_user_files(train, test_file=str(tmp_path / "nope.csv"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"text_column": "review"}, "column 'review' not found in train .*its columns are: text, label"),
        ({"label_column": "stars"}, "column 'stars' not found in train .*its columns are: text, label"),
        ({"noisy_label_column": "weak"}, "column 'weak' not found in train"),
    ],
)
def test_missing_columns(tmp_path, overrides, message):
    train = write(tmp_path, "train.csv", make_rows(6))
    with pytest.raises(ValueError, match=message):
        load_user_files(train, **overrides)


def test_labels_outside_zero_to_k(tmp_path):
    train = write(tmp_path, "train.csv", make_rows(6, 3))
    test = write(tmp_path, "test.csv", {"text": ["a", "b"], "label": [1, 5]})
    with pytest.raises(ValueError, match=r"labels must be in 0..2 .*got 5 in test column 'label' \(row 1\)"):
        load_user_files(train, test)
    negative = write(tmp_path, "negative.csv", {"text": ["a", "b"], "label": [1, -1]})
    with pytest.raises(ValueError, match="labels must be in 0..1 .*got -1 in train"):
        load_user_files(negative)
    with pytest.raises(ValueError, match=r"labels must be in 0..1 \(the given label_names\), got 2"):
        load_user_files(train, label_names=["no", "yes"])


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("mixed.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n'),
        ("mixed.csv", "text,label\na,1\nb,pos\n"),
    ],
)
def test_mixed_label_types(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match="labels mix integers and strings .*'pos'"):
        load_user_files(str(tmp_path / name))


def test_other_bad_labels(tmp_path):
    unseen = write(tmp_path, "test.csv", {"text": ["a"], "label": ["neutral"]})
    train = write(tmp_path, "train.csv", {"text": ["a", "b"], "label": ["neg", "pos"]})
    with pytest.raises(
        ValueError, match=r"label 'neutral' in test column 'label' \(row 0\) is not among the training"
    ):
        load_user_files(train, unseen)
    single = write(tmp_path, "single.csv", {"text": ["a", "b"], "label": [0, 0]})
    with pytest.raises(ValueError, match="at least 2 classes, the labels hold 1"):
        load_user_files(single)
    missing = write_lines(tmp_path, "missing.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": None}])
    with pytest.raises(ValueError, match=r"missing label in train column 'label' \(row 1\)"):
        load_user_files(missing)
    fractional = write(tmp_path, "fractional.csv", {"text": ["a", "b"], "label": [0.0, 1.5]})
    with pytest.raises(ValueError, match="whole numbers or strings, got 1.5"):
        load_user_files(fractional)
    no_text = write_lines(tmp_path, "no_text.jsonl", [{"text": "a", "label": 0}, {"text": None, "label": 1}])
    with pytest.raises(ValueError, match="text column 'text' has 1 missing value.*first at row 1"):
        load_user_files(no_text)


# ------------------------------------------------------------------------------------ clean / noisy split
def test_split_is_stratified_and_disjoint():
    dataset = Dataset.from_dict(make_rows(90, 3))
    clean, noisy = split_clean_noisy(dataset, 3, num_clean_per_class=7, seed=0)
    assert np.bincount(clean["label"], minlength=3).tolist() == [7, 7, 7]
    assert set(clean["index"]).isdisjoint(noisy["index"])
    assert sorted(list(clean["index"]) + list(noisy["index"])) == list(range(90))
    assert clean["index"] == sorted(clean["index"]) and noisy["index"] == sorted(noisy["index"])
    assert [dataset[i]["text"] for i in clean["index"]] == clean["text"]


def test_split_is_seeded():
    dataset = Dataset.from_dict(make_rows(90, 3))
    first = split_clean_noisy(dataset, 3, num_clean_per_class=5, seed=1)[0]["index"]
    assert first == split_clean_noisy(dataset, 3, num_clean_per_class=5, seed=1)[0]["index"]
    assert first != split_clean_noisy(dataset, 3, num_clean_per_class=5, seed=2)[0]["index"]


def test_split_by_clean_fraction():
    labels = [0] * 50 + [1] * 25 + [2] * 3
    dataset = Dataset.from_dict({"text": ["x"] * len(labels), "label": labels})
    clean, noisy = split_clean_noisy(dataset, 3, clean_fraction=0.1, seed=0)
    assert np.bincount(clean["label"], minlength=3).tolist() == [5, 3, 1]  # round half up, at least 1
    assert len(noisy) == len(labels) - 9


def test_split_keeps_an_existing_index_and_leaves_unknown_labels_noisy():
    dataset = Dataset.from_dict(
        {"text": list("abcdef"), "label": [0, 1, -1, 0, 1, -1], "index": [50, 51, 52, 53, 54, 55]}
    )
    clean, noisy = split_clean_noisy(dataset, 2, num_clean_per_class=2, seed=0)
    assert clean["index"] == [50, 51, 53, 54]
    assert noisy["index"] == [52, 55]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_clean_per_class": 11},
            r"class 1 \(Sports\) has 10 training rows, fewer than the 11 clean rows asked",
        ),
        ({}, "exactly one of num_clean_per_class and clean_fraction"),
        ({"num_clean_per_class": 2, "clean_fraction": 0.1}, "exactly one of num_clean_per_class and clean_fraction"),
        ({"clean_fraction": 1.0}, r"clean_fraction must be in \(0, 1\), got 1.0"),
        ({"num_clean_per_class": -1}, "num_clean_per_class must be an integer >= 0, got -1"),
    ],
)
def test_split_errors(kwargs, message):
    dataset = Dataset.from_dict({"text": ["x"] * 40, "label": [0] * 15 + [1] * 10 + [2] * 10 + [3] * 5})
    names = ["World", "Sports", "Business", "Sci/Tech"]
    with pytest.raises(ValueError, match=message):
        split_clean_noisy(dataset, 4, label_names=names, **kwargs)


def test_split_names_a_class_missing_from_training():
    dataset = Dataset.from_dict({"text": ["x"] * 4, "label": [0, 0, 2, 2]})
    with pytest.raises(ValueError, match=r"class 1 \(b\) is missing from the training data"):
        split_clean_noisy(dataset, 3, num_clean_per_class=1, label_names=["a", "b", "c"])


# ------------------------------------------------------------------------------------------------ noise
def test_add_label_noise():
    dataset = Dataset.from_dict(make_rows(10_000, 4))
    noisy, report = add_label_noise(dataset, "flip", 0.3, 4, seed=0)
    true = np.asarray(noisy["true_label"])
    labels = np.asarray(noisy["label"])
    np.testing.assert_array_equal(true, dataset["label"])
    np.testing.assert_array_equal(noisy["is_corrupted"], labels != true)
    assert abs(report["realised_rate"] - 0.3) < 0.02
    assert report["type"] == "flip" and report["rate"] == 0.3 and len(report["transition_matrix"]) == 4
    again, _ = add_label_noise(dataset, "flip", 0.3, 4, seed=0)
    assert again["label"] == noisy["label"]
    with pytest.raises(ValueError, match="already has a true_label column"):
        add_label_noise(noisy, "flip", 0.3, 4, seed=0)


# ---------------------------------------------------------------------------------------------- prepare
def ag_news_args(**overrides) -> DataArguments:
    settings = {"corpus": "ag_news", "num_clean_per_class": 10, "validation_size": 50}
    settings.update(max_train_samples=400, max_test_samples=100)
    return DataArguments(**{**settings, **overrides})


def test_prepare_named_corpus(data_dir, monkeypatch):
    monkeypatch.setenv("MLC_TEXT_DATA_DIR", data_dir)
    corpus = prepare_corpus(ag_news_args(), NoiseArguments(noise_type="uniform", noise_rate=0.4))
    assert isinstance(corpus, NoisyCorpus) and corpus.name == "ag_news" and corpus.hub_id == "fancyzhx/ag_news"
    assert corpus.noise_report["rows"] == {"train": 400, "clean": 40, "validation": 50, "test": 100}
    assert set(corpus.train.column_names) == {"text", "label", "true_label", "is_corrupted", "index"}
    assert set(corpus.clean.column_names) == {"text", "label", "true_label", "index"}
    assert corpus.clean["label"] == corpus.clean["true_label"]
    assert np.bincount(corpus.clean["label"]).tolist() == [10] * 4
    indices = [set(split["index"]) for split in (corpus.train, corpus.clean, corpus.validation)]
    assert all(a.isdisjoint(b) for i, a in enumerate(indices) for b in indices[i + 1 :])
    assert set(corpus.validation.column_names) == set(corpus.train.column_names)  # held out with noisy labels
    assert corpus.train["index"] != sorted(corpus.train["index"])  # shuffled: the files are ordered by source
    first_test_rows = load_corpus("ag_news")[0]["test"][:100]["text"]
    assert corpus.test["text"] != first_test_rows  # a random subset, not the first rows
    report = corpus.noise_report
    assert report["type"] == "uniform" and report["rate"] == 0.4 and report["num_rows"] == 400
    assert report["realised_rate"] == np.mean(np.asarray(corpus.train["label"]) != corpus.train["true_label"])


def test_prepare_is_deterministic(data_dir):
    args = ag_news_args(
        data_dir=data_dir, corpus="yelp_review_full", validation_source="clean", num_clean_per_class=20
    )
    noise = NoiseArguments(noise_type="flip", noise_rate=0.3, noise_seed=3)
    first, second = prepare_corpus(args, noise), prepare_corpus(args, noise)
    for split in ("train", "clean", "validation", "test"):
        assert getattr(first, split)[:] == getattr(second, split)[:]
    assert first.noise_report == second.noise_report
    other = prepare_corpus(args, NoiseArguments(noise_type="flip", noise_rate=0.3, noise_seed=4))
    assert other.train["index"] == first.train["index"]  # the noise seed leaves the split alone
    assert other.train["label"] != first.train["label"]
    shuffled = prepare_corpus(ag_news_args(data_dir=data_dir, corpus="yelp_review_full", split_seed=1), noise)
    assert shuffled.clean["index"] != first.clean["index"]


def test_noisy_labels_do_not_depend_on_the_caps(data_dir):
    noise = NoiseArguments(noise_type="uniform", noise_rate=0.5)
    small = prepare_corpus(ag_news_args(data_dir=data_dir, max_train_samples=100), noise)
    large = prepare_corpus(ag_news_args(data_dir=data_dir, max_train_samples=300), noise)
    assert large.train[:100] == small.train[:]


@pytest.mark.parametrize("source", ["clean", "none"])
def test_prepare_validation_sources(data_dir, source):
    corpus = prepare_corpus(
        ag_news_args(data_dir=data_dir, validation_source=source, validation_size=8), NoiseArguments()
    )
    if source == "none":
        assert corpus.validation is None
        return
    assert len(corpus.validation) == 8 and len(corpus.clean) == 32
    assert corpus.validation["label"] == corpus.validation["true_label"]
    assert set(corpus.validation["index"]).isdisjoint(corpus.clean["index"])


def test_prepare_without_noise_or_clean_rows(data_dir):
    corpus = prepare_corpus(ag_news_args(data_dir=data_dir, num_clean_per_class=0), NoiseArguments(noise_type="none"))
    assert len(corpus.clean) == 0 and "true_label" in corpus.clean.column_names
    assert corpus.train["label"] == corpus.train["true_label"]
    assert corpus.noise_report["realised_rate"] == 0.0


def test_prepare_user_files_with_real_noise(tmp_path, caplog):
    gold = [i % 2 if i % 3 else None for i in range(60)]
    weak = [(i + (i % 5 == 0)) % 2 for i in range(60)]
    train = write(tmp_path, "weak.jsonl", {"text": [f"row {i}" for i in range(60)], "gold": gold, "weak": weak})
    test = write(tmp_path, "gold_test.jsonl", {"text": ["a", "b"], "gold": [0, 1]})
    args = user_args(train, test_file=test, label_column="gold", noisy_label_column="weak")
    corpus = prepare_corpus(args, NoiseArguments(noise_type="uniform"))
    assert "noise_type='uniform' is ignored" in caplog.text
    assert corpus.name == "custom" and corpus.label_names == ["0", "1"]
    assert all(gold[i] is not None for i in corpus.clean["index"])  # clean rows need a known true label
    for row in corpus.train:
        assert row["label"] == weak[row["index"]]
        assert row["true_label"] == (-1 if gold[row["index"]] is None else gold[row["index"]])
    report = corpus.noise_report
    assert report["type"] == "real" and report["transition_matrix"] is None
    assert report["rows_with_true_label"] == sum(row >= 0 for row in corpus.train["true_label"])


def test_prepare_user_files_with_a_validation_file(tmp_path):
    train = write(tmp_path, "train.parquet", make_rows(60, 3))
    validation = write(tmp_path, "dev.csv", make_rows(9, 3, seed=1))
    corpus = prepare_corpus(user_args(train, validation_file=validation), NoiseArguments(noise_type="flip"))
    assert len(corpus.validation) == 9 and corpus.validation["label"] == corpus.validation["true_label"]
    assert len(corpus.train) == 45 and corpus.test is None


def test_heldout_validation_must_leave_training_rows(tmp_path):
    train = write(tmp_path, "train.csv", make_rows(30, 3))
    with pytest.raises(
        ValueError, match=r"validation_size=15 leaves no noisy training rows \(the noisy pool has 15\)"
    ):
        prepare_corpus(user_args(train, validation_size=15), NoiseArguments())


def test_matrix_shape_is_checked_for_user_files(tmp_path):
    train = write(tmp_path, "train.csv", make_rows(30, 3))
    noise = NoiseArguments(noise_type="matrix", noise_matrix="[[0.9, 0.1], [0.1, 0.9]]")
    with pytest.raises(ValueError, match=r"must be 3 x 3, got shape \(2, 2\)"):
        prepare_corpus(user_args(train), noise)


@pytest.mark.parametrize(
    ("data_overrides", "noise_overrides", "message"),
    [
        ({"max_length": 4}, {}, "max_length must be an integer >= 8, got 4"),
        ({"clean_fraction": 1.5}, {}, r"clean_fraction must be in \(0, 1\), got 1.5"),
        ({"validation_source": "test"}, {}, "validation_source must be one of heldout, clean, none, got 'test'"),
        ({"validation_size": 0}, {}, "validation_size must be an integer >= 1, got 0"),
        ({"max_train_samples": -1}, {}, "max_train_samples must be an integer >= 0 or None, got -1"),
        ({"corpus": "sst2"}, {}, "corpus must be one of ag_news, .*, got 'sst2'"),
        ({"corpus": None}, {}, "set corpus .* or train_file, got neither"),
        ({"train_file": "train.csv"}, {}, "train_file are for your own files, got them with corpus='ag_news'"),
        ({}, {"noise_rate": 1.3}, r"noise_rate must be in \[0, 1\], got 1.3"),
        (
            {},
            {"noise_type": "symmetric"},
            "noise_type must be one of uniform, flip, matrix, instance, none, got 'symmetric'",
        ),
        ({}, {"noise_type": "matrix"}, "noise_type='matrix' needs noise_matrix"),
        ({}, {"noise_type": "matrix", "noise_matrix": "[[1, 0], [0, 1]]"}, r"must be 4 x 4, got shape \(2, 2\)"),
        (
            {},
            {"noise_type": "matrix", "noise_matrix": json.dumps([[0.5, 0.1, 0.1, 0.1]] + np.eye(4)[1:].tolist())},
            "rows must sum to 1, got row 0 summing to 0.8",
        ),
    ],
)
def test_arguments_are_checked_before_loading(no_loading, data_overrides, noise_overrides, message):
    with pytest.raises(ValueError, match=message):
        prepare_corpus(ag_news_args(**data_overrides), NoiseArguments(**noise_overrides))


def test_user_file_paths_are_checked_before_loading(no_loading, tmp_path):
    with pytest.raises(ValueError, match=r"train file '.*absent\.jsonl' does not exist"):
        prepare_corpus(DataArguments(train_file=str(tmp_path / "absent.jsonl")), NoiseArguments())


def test_save_noise_report(tmp_path):
    _, report = add_label_noise(Dataset.from_dict(make_rows(30, 3)), "uniform", 0.2, 3, seed=0)
    path = save_noise_report(report, str(tmp_path / "run" / "noise_report.json"))
    assert json.loads(open(path).read()) == report


# --------------------------------------------------------------------------------------------- tokenize
@pytest.fixture
def tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "row", "a", "b"]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def test_tokenize_corpus(tmp_path, tokenizer):
    train = write(tmp_path, "train.jsonl", make_rows(60, 3))
    test = write(tmp_path, "test.jsonl", make_rows(6, 3, seed=1))
    corpus = prepare_corpus(user_args(train, test_file=test, max_length=8), NoiseArguments())
    entered = []

    @contextlib.contextmanager
    def main_process_first():
        entered.append(True)
        yield

    tokenized = tokenize_corpus(corpus, tokenizer, max_length=8, main_process_first=main_process_first())
    assert entered == [True]
    assert "text" not in tokenized.train.column_names
    for column in ("input_ids", "attention_mask", "label", "true_label", "is_corrupted", "index"):
        assert column in tokenized.train.column_names
    assert "true_label" in tokenized.clean.column_names and "label" in tokenized.test.column_names
    lengths = [len(ids) for ids in tokenized.train["input_ids"]]
    assert max(lengths) == 8 and min(lengths) < 8  # truncated, not padded
    assert tokenized.train["label"] == corpus.train["label"]


def test_tokenize_corpus_refuses_short_max_length(tmp_path, tokenizer):
    corpus = prepare_corpus(user_args(write(tmp_path, "train.csv", make_rows(60, 3))), NoiseArguments())
    with pytest.raises(ValueError, match="max_length must be an integer >= 8, got 7"):
        tokenize_corpus(corpus, tokenizer, max_length=7)


def test_zero_lifts_the_caps(data_dir):
    capped = prepare_corpus(ag_news_args(data_dir=data_dir, corpus="imdb", max_test_samples=10), NoiseArguments())
    uncapped = prepare_corpus(ag_news_args(data_dir=data_dir, corpus="imdb", max_test_samples=0), NoiseArguments())
    assert len(capped.test) == 10 and len(uncapped.test) > 10
