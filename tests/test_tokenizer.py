"""Tokenizer: ids equal llama.cpp's and transformers' on the packaged GGUF models.

Reference ids are stored in tests/data/tokenizer_<model>.json (written by
tests/fixtures/make_tokenizer_fixtures.py); the ``reference`` tests also compare live when
llama-cpp-python or transformers is installed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest

from meshpy.errors import CheckpointFormatError, InvalidArgumentError
from meshpy.tokenizer import IncrementalDecoder, Tokenizer, known_gguf_pre_tokenizers

DATA = Path(__file__).parent / "data"
FIXTURE_SCRIPT = Path(__file__).parent / "fixtures" / "make_tokenizer_fixtures.py"
MODELS = ["smollm2", "gemma3"]

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed")
needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")


@functools.cache
def fixture(model: str) -> dict[str, Any]:
    with (DATA / f"tokenizer_{model}.json").open(encoding="utf-8") as f:
        return json.load(f)


def stored(model: str, library: str) -> dict[str, Any]:
    refs = fixture(model)[library]
    assert refs is not None, (
        f"tests/data/tokenizer_{model}.json has no {library} reference; rerun "
        "tests/fixtures/make_tokenizer_fixtures.py with it installed"
    )
    return refs


def gguf_metadata(path: Path) -> dict[str, Any]:
    """GGUF key -> value, read with the independent gguf package."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="session")
def smollm2_metadata(smollm2_gguf: Path) -> dict[str, Any]:
    return gguf_metadata(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_metadata)


@pytest.fixture(scope="session")
def gemma3_metadata(gemma3_gguf: Path) -> dict[str, Any]:
    return gguf_metadata(gemma3_gguf)


@pytest.fixture(scope="session")
def gemma3_tokenizer(gemma3_metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gemma3_metadata)


@pytest.fixture(params=MODELS)
def model(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tokenizer(request: pytest.FixtureRequest, model: str) -> Tokenizer:
    return request.getfixturevalue(f"{model}_tokenizer")


@pytest.fixture
def gguf_path(request: pytest.FixtureRequest, model: str) -> Path:
    return request.getfixturevalue(f"{model}_gguf")


def mismatches(tokenizer: Tokenizer, texts: list[str], expected: list[list[int]], add_special: bool) -> list[str]:
    out = []
    for text, ids in zip(texts, expected, strict=True):
        got = tokenizer.encode(text, add_special_tokens=add_special)
        if got != ids:
            out.append(f"{text!r}: got {got}, expected {ids}")
    return out


# -- ids against the stored references ------------------------------------------------------


@pytest.mark.parametrize("add_special", [True, False], ids=["with_special", "without_special"])
def test_ids_equal_stored_llama_cpp(tokenizer: Tokenizer, model: str, add_special: bool) -> None:
    refs = stored(model, "llama_cpp")
    key = "with_special" if add_special else "without_special"
    assert mismatches(tokenizer, fixture(model)["texts"], refs[key], add_special) == []


@pytest.mark.parametrize("add_special", [True, False], ids=["with_special", "without_special"])
def test_ids_equal_stored_transformers(smollm2_tokenizer: Tokenizer, add_special: bool) -> None:
    refs = stored("smollm2", "transformers")
    key = "with_special" if add_special else "without_special"
    assert mismatches(smollm2_tokenizer, fixture("smollm2")["texts"], refs[key], add_special) == []


def variant_cases() -> list[tuple[str, str]]:
    return [(model, name) for model in MODELS for name in (fixture(model)["llama_cpp_variants"] or {"missing": None})]


@pytest.mark.parametrize(("model", "variant"), variant_cases())
def test_metadata_variants_equal_stored_llama_cpp(request: pytest.FixtureRequest, model: str, variant: str) -> None:
    """The model's vocabulary with some metadata changed (other tokenizer.ggml.pre regexes on
    SmolLM2, add_space_prefix on Gemma), against llama.cpp loading the same metadata."""
    refs = stored(model, "llama_cpp_variants")[variant]
    metadata = request.getfixturevalue(f"{model}_metadata")
    tok = Tokenizer.from_gguf_metadata({**metadata, **refs["metadata"]})
    texts = fixture(model)["texts"]
    assert mismatches(tok, texts, refs["with_special"], True) == []
    assert mismatches(tok, texts, refs["without_special"], False) == []
    for ids, expected in zip(refs["with_special"], refs["detokenize"], strict=True):
        assert tok.decode(ids) == expected


def test_pre_tokenizer_choice_changes_ids(smollm2_metadata: dict[str, Any]) -> None:
    """The fixture texts tell the regex families apart (so the comparisons above can fail)."""
    texts = fixture("smollm2")["texts"]
    corpus = {
        pre: [Tokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.pre": pre}).encode(t) for t in texts]
        for pre in ("smollm", "llama3", "default")
    }
    assert corpus["smollm"] != corpus["llama3"] != corpus["default"] != corpus["smollm"]


def test_space_prefix_changes_ids(gemma3_metadata: dict[str, Any], gemma3_tokenizer: Tokenizer) -> None:
    prefixed = Tokenizer.from_gguf_metadata({**gemma3_metadata, "tokenizer.ggml.add_space_prefix": True})
    assert prefixed.encode("Hello") == [2, gemma3_tokenizer.token_to_id("▁Hello")]
    assert gemma3_tokenizer.encode("Hello") == [2, gemma3_tokenizer.token_to_id("Hello")]
    assert prefixed.decode(prefixed.encode("Hello", add_special_tokens=False)) == "Hello"


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("smollm", [" ", "1", "2", "3", "4", "5", "a", "'s"]),
        ("gpt-2", [" 12345", "a", "'s"]),
        ("llama3", [" ", "123", "45", "a", "'s"]),
        ("qwen2", [" ", "1", "2", "3", "4", "5", "a", "'s"]),
        ("default", [" ", "123", "45", "a", "'", "s"]),
    ],
)
def test_pre_tokenizer_splits_digits_as_llama_cpp(
    smollm2_metadata: dict[str, Any], pre: str, pieces: list[str]
) -> None:
    tok = Tokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.pre": pre})
    got = [piece for piece, _ in tok.backend.pre_tokenizer.pre_tokenize_str(" 12345a's")]
    assert got == [p.replace(" ", "Ġ") for p in pieces]


def test_fixture_texts_exercise_byte_fallback_and_specials(gemma3_tokenizer: Tokenizer) -> None:
    texts = fixture("gemma3")["texts"]
    ids = [i for t in texts for i in gemma3_tokenizer.encode(t, add_special_tokens=False)]
    byte_tokens = [i for i in ids if gemma3_tokenizer.id_to_token(i).startswith("<0x")]
    assert byte_tokens, "no text falls back to <0x..> byte tokens"
    assert gemma3_tokenizer.token_to_id("<start_of_turn>") in ids
    assert gemma3_tokenizer.token_to_id("<b>") in ids  # a user-defined token


# -- live references --------------------------------------------------------------------------


class LlamaVocabs:
    """llama.cpp vocabularies (vocab_only) by path, closed at the end of the session."""

    def __init__(self) -> None:
        self._open: dict[str, Any] = {}

    def __call__(self, path: Path) -> Any:
        import llama_cpp

        key = str(path)
        if key not in self._open:
            # verbose=False would leave a /dev/null handle open (a ResourceWarning at exit)
            self._open[key] = llama_cpp.Llama(model_path=key, vocab_only=True, verbose=True)
        return self._open[key]

    def close(self) -> None:
        for llm in self._open.values():
            llm.close()
        self._open.clear()


@pytest.fixture(scope="session")
def llama_vocab() -> Any:
    vocabs = LlamaVocabs()
    yield vocabs
    vocabs.close()


@pytest.mark.reference
@needs_llama_cpp
@pytest.mark.parametrize("add_special", [True, False], ids=["with_special", "without_special"])
def test_ids_equal_live_llama_cpp(
    tokenizer: Tokenizer, gguf_path: Path, model: str, add_special: bool, llama_vocab: LlamaVocabs
) -> None:
    llm = llama_vocab(gguf_path)
    texts = fixture(model)["texts"]
    expected = [llm.tokenize(t.encode("utf-8"), add_bos=add_special, special=True) for t in texts]
    assert mismatches(tokenizer, texts, expected, add_special) == []


# llama.cpp also ends generation on fill-in-the-middle tokens and on "</s>" (which in Gemma's
# vocabulary is the HTML strikethrough tag); meshpy stops on end-of-text/turn tokens only.
LLAMA_CPP_ONLY_STOPS = {"<reponame>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<|fim_repo|>", "<fim_pad>",
                        "<|fim_pad|>", "<fim-pad>", "<PAD>", "<|file_sep|>", "</s>"}


@pytest.mark.reference
@needs_llama_cpp
def test_special_ids_equal_live_llama_cpp(tokenizer: Tokenizer, gguf_path: Path, llama_vocab: LlamaVocabs) -> None:
    import llama_cpp

    vocab = llama_vocab(gguf_path)._model.vocab
    assert tokenizer.vocab_size == llama_cpp.llama_vocab_n_tokens(vocab)
    assert tokenizer.bos_id == llama_cpp.llama_vocab_bos(vocab)
    assert tokenizer.eos_id == llama_cpp.llama_vocab_eos(vocab)
    eog = {i for i in range(tokenizer.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert tokenizer.stop_ids <= eog
    assert {tokenizer.id_to_token(i) for i in eog - tokenizer.stop_ids} <= LLAMA_CPP_ONLY_STOPS


FUZZ_POOL = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" * 3)
    + list(" \n\t\r.,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`")
    + list("éèàüöñçßøåœ日本語中文한국어ſK²٣①")
    + ["🎉", "👍🏽", "\u00a0", "\u3000", "\u200b", "\u0301", "\U00020000", "\x01", "\x7f", "\x85"]
    + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<b>"]
    + ["'s", "'S", "'ll", "'Re", "  ", "   ", "\n\n", " \n", "\r\n"]
)


def fuzz_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_POOL) for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.mark.reference
@needs_llama_cpp
def test_random_texts_equal_live_llama_cpp(
    tokenizer: Tokenizer, gguf_path: Path, llama_vocab: LlamaVocabs
) -> None:
    llm = llama_vocab(gguf_path)
    texts = fuzz_texts(300, 2024)
    expected = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in texts]
    assert mismatches(tokenizer, texts, expected, True) == []


def fixture_script() -> Any:
    spec = importlib.util.spec_from_file_location("make_tokenizer_fixtures", FIXTURE_SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.reference
@needs_llama_cpp
def test_pre_tokenizer_variants_equal_live_llama_cpp(
    smollm2_metadata: dict[str, Any], smollm2_gguf: Path, tmp_path: Path
) -> None:
    """Each regex family on SmolLM2's vocabulary, on the fixture texts and random ones."""
    import llama_cpp

    script = fixture_script()
    texts = fixture("smollm2")["texts"] + fuzz_texts(200, 7)
    for name, overrides in script.VARIANTS["smollm2"].items():
        path = tmp_path / "vocab.gguf"
        script.write_vocab_only_gguf(smollm2_gguf, path, overrides)
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=True)
        try:
            expected = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]
        finally:
            llm.close()
        tok = Tokenizer.from_gguf_metadata({**smollm2_metadata, **overrides})
        assert mismatches(tok, texts, expected, False) == [], name


@pytest.fixture(scope="session")
def transformers_smollm2(smollm2_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.mark.reference
@needs_transformers
@pytest.mark.parametrize("add_special", [True, False], ids=["with_special", "without_special"])
def test_ids_equal_live_transformers(
    smollm2_tokenizer: Tokenizer, transformers_smollm2: Any, add_special: bool
) -> None:
    texts = fixture("smollm2")["texts"]
    expected = [transformers_smollm2.encode(t, add_special_tokens=add_special) for t in texts]
    assert mismatches(smollm2_tokenizer, texts, expected, add_special) == []


# -- decoding ---------------------------------------------------------------------------------


def test_decode_round_trips(tokenizer: Tokenizer, model: str) -> None:
    for text in fixture(model)["texts"]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_decode_equals_stored_llama_cpp(tokenizer: Tokenizer, model: str) -> None:
    refs = stored(model, "llama_cpp")
    for ids, expected in zip(refs["with_special"], refs["detokenize"], strict=True):
        assert tokenizer.decode(ids) == expected


def test_decode_equals_stored_transformers(smollm2_tokenizer: Tokenizer) -> None:
    refs = stored("smollm2", "transformers")
    for ids, expected in zip(refs["without_special"], refs["decode"], strict=True):
        assert smollm2_tokenizer.decode(ids) == expected


def test_decode_skips_special_tokens(tokenizer: Tokenizer) -> None:
    assert tokenizer.bos_id is not None and tokenizer.eos_id is not None
    ids = [tokenizer.bos_id, *tokenizer.encode("Hello there", add_special_tokens=False), tokenizer.eos_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello there"
    assert tokenizer.decode(ids) == tokenizer.bos_text + "Hello there" + tokenizer.eos_text


def test_decode_matches_backend_decoder(tokenizer: Tokenizer, model: str) -> None:
    """The llama.cpp-style piece table agrees with the rebuilt tokenizers decoder."""
    for text in fixture(model)["texts"]:
        ids = tokenizer.encode(text)
        for skip in (False, True):
            assert tokenizer.decode(ids, skip) == tokenizer.backend.decode(ids, skip_special_tokens=skip)


def stream(tokenizer: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip)
    return [decoder.add(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("skip", [False, True], ids=["keep_special", "skip_special"])
def test_incremental_decoder_equals_decode(tokenizer: Tokenizer, model: str, skip: bool) -> None:
    for text in fixture(model)["texts"]:
        ids = tokenizer.encode(text)
        assert "".join(stream(tokenizer, ids, skip)) == tokenizer.decode(ids, skip)


def test_incremental_decoder_holds_incomplete_characters(tokenizer: Tokenizer) -> None:
    # a character with no token of its own: byte-level pieces or <0x..> byte fallback
    char = next(c for c in ("🎉", "\U0002a6d6", "\U00020000") if len(tokenizer.encode(c, add_special_tokens=False)) > 1)
    ids = tokenizer.encode(char, add_special_tokens=False)
    pieces = stream(tokenizer, ids, False)
    assert pieces[:-2] == [""] * (len(ids) - 1) and pieces[-2] == char and pieces[-1] == ""


def random_id_sequences(tokenizer: Tokenizer, count: int, seed: int) -> list[list[int]]:
    """Id sequences with many lone UTF-8 bytes (byte-level pieces, <0x..> tokens) mixed in."""
    rng = random.Random(seed)
    n = tokenizer.vocab_size
    byte_like = [i for i in range(min(n, 600)) if tokenizer.decode([i]) == "\ufffd"]
    assert byte_like
    def one() -> list[int]:
        return [rng.choice(byte_like) if rng.random() < 0.4 else rng.randrange(n) for _ in range(30)]

    return [one() for _ in range(count)]


def test_incremental_decoder_on_random_ids(tokenizer: Tokenizer) -> None:
    """Arbitrary id sequences (broken UTF-8 included) stream to exactly decode(ids)."""
    for ids in random_id_sequences(tokenizer, 40, 1234):
        for skip in (False, True):
            assert "".join(stream(tokenizer, ids, skip)) == tokenizer.decode(ids, skip)


# -- special tokens and properties ------------------------------------------------------------


def test_smollm2_special_tokens(smollm2_tokenizer: Tokenizer) -> None:
    tok = smollm2_tokenizer
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert (tok.bos_text, tok.eos_text) == ("<|im_start|>", "<|im_end|>")
    assert tok.stop_ids == frozenset({2, 0})  # <|im_end|>, <|endoftext|>
    assert tok.encode("Hi")[0] != tok.bos_id  # add_bos_token is false
    assert tok.encode("<|im_start|>user\nhi<|im_end|>\n") == [1, 4093, 198, 6004, 2, 198]
    assert tok.id_to_token(2) == "<|im_end|>" and tok.id_to_token(905) == "Ġworld"


def test_gemma3_special_tokens(gemma3_tokenizer: Tokenizer) -> None:
    tok = gemma3_tokenizer
    assert tok.vocab_size == 262144
    assert (tok.bos_id, tok.eos_id) == (2, 1)
    assert (tok.bos_text, tok.eos_text) == ("<bos>", "<eos>")
    assert tok.stop_ids == frozenset({1, 106})  # <eos>, <end_of_turn>
    assert tok.encode("") == [2] and tok.encode("", add_special_tokens=False) == []
    assert tok.encode("Hi")[0] == 2 and tok.encode("Hi", add_special_tokens=False)[0] != 2
    assert tok.id_to_token(106) == "<end_of_turn>"


def test_bad_ids_are_errors(smollm2_tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidArgumentError):
        smollm2_tokenizer.decode([1, 49152])
    with pytest.raises(InvalidArgumentError):
        smollm2_tokenizer.decode([-1])
    with pytest.raises(InvalidArgumentError):
        smollm2_tokenizer.id_to_token(10**6)
    with pytest.raises(InvalidArgumentError):
        IncrementalDecoder(smollm2_tokenizer).add(49152)
    with pytest.raises(InvalidArgumentError):
        smollm2_tokenizer.encode(b"bytes")  # type: ignore[arg-type]


def test_unknown_pre_tokenizer_lists_known_ones(smollm2_metadata: dict[str, Any]) -> None:
    with pytest.raises(CheckpointFormatError, match="unknown tokenizer.ggml.pre 'no-such-pre'") as info:
        Tokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.pre": "no-such-pre"})
    for name in ("smollm", "llama3", "llama-bpe", "qwen2", "gpt-2", "default"):
        assert name in known_gguf_pre_tokenizers() and f"{name}," in str(info.value) + ","


def test_unknown_tokenizer_model_is_an_error(smollm2_metadata: dict[str, Any]) -> None:
    with pytest.raises(CheckpointFormatError, match="unsupported tokenizer.ggml.model 'bert'"):
        Tokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.model": "bert"})
    without_tokens = {k: v for k, v in smollm2_metadata.items() if k != "tokenizer.ggml.tokens"}
    with pytest.raises(CheckpointFormatError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata(without_tokens)


def test_gguf_bos_eos_flags(smollm2_metadata: dict[str, Any]) -> None:
    tok = Tokenizer.from_gguf_metadata(
        {**smollm2_metadata, "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}
    )
    plain = tok.encode("Hello", add_special_tokens=False)
    assert tok.encode("Hello") == [1, *plain, 2]
    # llama3 pre-tokenizers add BOS when the file does not say (llama.cpp's default)
    no_flag = {k: v for k, v in smollm2_metadata.items() if k != "tokenizer.ggml.add_bos_token"}
    assert Tokenizer.from_gguf_metadata({**no_flag, "tokenizer.ggml.pre": "llama3"}).encode("Hi")[0] == 1
    assert Tokenizer.from_gguf_metadata(no_flag).encode("Hi")[0] != 1


def test_metadata_as_numpy_arrays_and_bytes(smollm2_metadata: dict[str, Any], smollm2_tokenizer: Tokenizer) -> None:
    """Readers may hand over arrays as numpy arrays and strings as bytes."""
    import numpy as np

    md = dict(smollm2_metadata)
    md["tokenizer.ggml.tokens"] = [t.encode("utf-8") for t in md["tokenizer.ggml.tokens"]]
    md["tokenizer.ggml.merges"] = [m.encode("utf-8") for m in md["tokenizer.ggml.merges"]]
    md["tokenizer.ggml.token_type"] = np.asarray(md["tokenizer.ggml.token_type"], dtype=np.int32)
    md["tokenizer.ggml.model"] = b"gpt2"
    md["tokenizer.ggml.pre"] = b"smollm"
    md["tokenizer.ggml.bos_token_id"] = np.uint32(1)
    md["tokenizer.ggml.add_bos_token"] = np.bool_(False)
    tok = Tokenizer.from_gguf_metadata(md)
    for text in fixture("smollm2")["texts"]:
        assert tok.encode(text) == smollm2_tokenizer.encode(text)


def test_eot_token_id_is_a_stop_id(smollm2_metadata: dict[str, Any]) -> None:
    tok = Tokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.eot_token_id": 7})
    assert 7 in tok.stop_ids and tok.eos_id == 2


# -- checkpoint directories (tokenizer.json) --------------------------------------------------


def test_from_hf_files(smollm2_tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    smollm2_tokenizer.backend.save(str(path))
    tok = Tokenizer.from_hf_files(
        path,
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True}},
        {"eos_token_id": [2, 7]},
    )
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)
    assert tok.stop_ids == frozenset({0, 2, 7})
    assert (tok.bos_text, tok.eos_text) == ("<|im_start|>", "<|im_end|>")
    for text in fixture("smollm2")["texts"]:
        ids = tok.encode(text)
        assert ids == smollm2_tokenizer.encode(text)
        assert tok.decode(ids) == text
        for skip in (False, True):
            assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip)
    # tokenizer.json decoding (no piece table): streams exactly, equals llama.cpp-style decoding
    for ids in random_id_sequences(tok, 40, 99):
        for skip in (False, True):
            assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip) == smollm2_tokenizer.decode(ids, skip)


def test_from_hf_dir(smollm2_tokenizer: Tokenizer, tmp_path: Path) -> None:
    _save(smollm2_tokenizer, tmp_path)
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, frozenset({0, 2, 7}))
    (tmp_path / "generation_config.json").unlink()
    assert Tokenizer.from_hf_dir(tmp_path).stop_ids == frozenset({0, 2})
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointFormatError, match="JSON object"):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(CheckpointFormatError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path / "missing")


def test_from_hf_files_post_processor_adds_bos(smollm2_tokenizer: Tokenizer, tmp_path: Path) -> None:
    from tokenizers import processors

    backend = Tokenizer.from_hf_files(_save(smollm2_tokenizer, tmp_path)).backend
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    path = tmp_path / "with_bos.json"
    backend.save(str(path))
    tok = Tokenizer.from_hf_files(path, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, {"eos_token_id": 2})
    assert tok.encode("Hello") == [1, *tok.encode("Hello", add_special_tokens=False)]
    assert tok.stop_ids == frozenset({0, 2})


def _save(tokenizer: Tokenizer, folder: Path) -> Path:
    path = folder / "tokenizer.json"
    tokenizer.backend.save(str(path))
    return path


def test_from_hf_files_errors(smollm2_tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = _save(smollm2_tokenizer, tmp_path)
    with pytest.raises(CheckpointFormatError, match="not in"):
        Tokenizer.from_hf_files(path, {"eos_token": "<no-such-token>"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointFormatError):
        Tokenizer.from_hf_files(bad)


@pytest.mark.reference
@needs_transformers
def test_from_hf_files_equals_transformers(transformers_smollm2: Any, tmp_path: Path) -> None:
    """A tokenizer.json written by transformers loads and encodes as transformers does."""
    transformers_smollm2.save_pretrained(str(tmp_path))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (transformers_smollm2.bos_token_id, transformers_smollm2.eos_token_id)
    for text in fixture("smollm2")["texts"]:
        expected = transformers_smollm2.encode(text)
        assert tok.encode(text) == expected
        assert tok.decode(expected) == transformers_smollm2.decode(expected)
