"""Text loading and cleaning, the vectorizer, and the tf.data windows."""

import numpy as np
import pytest

import keras_nanogpt as kn


def test_pride_and_prejudice_is_cleaned():
    text = kn.data.load_text("pride_and_prejudice")
    assert text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\n\n\nChapter 1\n")
    assert "It is a truth universally acknowledged" in text[:300]
    assert text.endswith("had been the means of uniting them.\n")
    assert "\r" not in text and "\ufeff" not in text and "Gutenberg" not in text
    assert "“" in text  # curly quotes kept


def test_tinyshakespeare_is_untouched():
    text = kn.data.load_text("tinyshakespeare")
    assert text.startswith("First Citizen:\nBefore we proceed any further")
    assert len(text) == 1115394


def test_gutenberg_cleaning_of_a_local_file(tmp_path):
    path = tmp_path / "book.txt"
    raw = ("\ufeffThe Project Gutenberg EBook of X\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
           "\r\nProduced by Someone\r\n\r\nThe story.\r\nThe end.\r\n\r\nEnd of the Project Gutenberg EBook of X\r\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nLicence text.\r\n")
    path.write_bytes(raw.encode("utf-8"))
    assert kn.data.load_text(path) == "The story.\nThe end.\n"
    assert kn.data.clean_text("plain\r\ntext") == "plain\ntext"


def test_several_gutenberg_books_in_one_file_are_all_kept(tmp_path):
    def book(title, body):
        return (f"The Project Gutenberg EBook of {title}\r\n\r\n*** START OF THE PROJECT GUTENBERG EBOOK "
                f"{title.upper()} ***\r\nProduced by Someone\r\n\r\n{body}\r\n\r\nEnd of the Project Gutenberg "
                f"EBook of {title}\r\n*** END OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\r\n"
                f"Licence of {title}.\r\n")

    path = tmp_path / "books.txt"
    path.write_bytes(("\ufeff" + book("One", "First story.\r\nIt ends.") + book("Two", "Second story.")
                      + book("Three", "Third story.")).encode("utf-8"))
    text = kn.data.load_text(path)
    assert text == "First story.\nIt ends.\n\nSecond story.\n\nThird story.\n"
    assert "Licence" not in text and "Gutenberg" not in text and "Produced" not in text


def test_char_vectorizer_round_trips_exactly(small_text, char_vectorizer):
    ids = kn.data.encode(char_vectorizer, small_text)
    assert len(ids) == len(small_text) and ids.min() >= 2
    assert kn.data.decode(char_vectorizer, ids) == small_text
    assert char_vectorizer.vocabulary_size() == len(set(small_text)) + 2


def test_word_vectorizer():
    vectorizer = kn.data.make_vectorizer("It is a truth. It is known!\nA truth", level="word")
    assert kn.data.decode(vectorizer, kn.data.encode(vectorizer, "a TRUTH, it is")) == "a truth it is"
    assert set(vectorizer.get_vocabulary()[2:]) == {"it", "is", "a", "truth", "known"}


def test_max_tokens_limits_the_vocabulary(small_text):
    vectorizer = kn.data.make_vectorizer(small_text, max_tokens=10)
    assert vectorizer.vocabulary_size() == 10
    assert kn.data.encode(vectorizer, "\u4e00")[0] == 1  # out of vocabulary


def test_windows_shift_by_one_and_do_not_overlap(small_text, char_vectorizer):
    train, val = kn.data.make_datasets(small_text, char_vectorizer, sequence_length=50, batch_size=8,
                                       validation_split=0.1, seed=0)
    ids = kn.data.encode(char_vectorizer, small_text)
    split = int(round(len(ids) * 0.9))
    batches = list(train)
    assert all(tuple(x.shape) == (8, 50) and tuple(y.shape) == (8, 50) for x, y in batches)
    assert len(batches) == ((split - 1) // 50) // 8
    train_text = small_text[:split]
    for x, y in batches[:3]:
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            window = kn.data.decode(char_vectorizer, np.concatenate([row_x, row_y[-1:]]))
            assert window in train_text
    val_x = np.concatenate([np.asarray(x) for x, _ in val])
    val_text = small_text[split:]
    for row in val_x:
        assert kn.data.decode(char_vectorizer, row) in val_text
    assert len(val_x) == (len(ids) - split - 1) // 50


def test_training_windows_are_reshuffled_each_epoch(small_text, char_vectorizer):
    train, _ = kn.data.make_datasets(small_text, char_vectorizer, 32, 4, seed=1)
    first, second = [np.asarray(next(iter(train))[0]) for _ in range(2)]
    assert not np.array_equal(first, second)


def test_random_sampling_like_nanogpt(small_text, char_vectorizer):
    train, val = kn.data.make_datasets(small_text, char_vectorizer, 32, 4, sampling="random", seed=0,
                                       validation_split=0.2)
    ids = kn.data.encode(char_vectorizer, small_text)
    starts = set()
    for x, y in train.take(20):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
        for row in x:
            starts.add(kn.data.decode(char_vectorizer, row))
    assert any(small_text.find(window) % 32 for window in starts)  # not only aligned offsets
    train_part = small_text[:int(round(len(ids) * 0.8))]
    assert all(window in train_part for window in starts)
    assert val is not None


@pytest.mark.parametrize("sampling", kn.data.SAMPLINGS)
def test_pipelines_do_not_autotune(small_text, char_vectorizer, sampling):
    # tf.data's autotuning thread makes deleting an iterator (the end of every fit) wait up to a minute.
    for dataset in kn.data.make_datasets(small_text, char_vectorizer, 32, 4, sampling=sampling):
        assert dataset.options().autotune.enabled is False
        assert len(list(dataset.take(3))) == 3


def test_no_validation_set():
    text = "abcdefgh" * 50
    train, val = kn.data.make_datasets(text, kn.data.make_vectorizer(text), 8, 2, validation_split=0)
    assert val is None and len(list(train)) == (400 - 1) // 8 // 2


@pytest.mark.parametrize("kwargs, argument", [
    (dict(sequence_length=0), "sequence_length"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(validation_split=1.0), "validation_split"),
    (dict(validation_split=-0.1), "validation_split"),
    (dict(sampling="strided"), "sampling"),
    (dict(sequence_length=5000), "too short"),
])
def test_bad_dataset_arguments(kwargs, argument, small_text, char_vectorizer):
    arguments = dict(sequence_length=32, batch_size=4)
    arguments.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=argument):
        kn.data.make_datasets(small_text, char_vectorizer, **arguments)


def test_bad_loading_and_vectorizer_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        kn.data.load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="level"):
        kn.data.make_vectorizer("some text", level="syllable")
    with pytest.raises(ValueError, match="empty"):
        kn.data.make_vectorizer("   ")
