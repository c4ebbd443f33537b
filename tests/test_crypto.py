"""loader/crypto.py: known answers, size edges, streaming, and what damage turns into."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator
from fractions import Fraction

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.crypto import (
    BLOCK,
    IV_SIZE,
    SMALL_PART_MAX,
    Decryptor,
    Encryptor,
    encrypted_size,
    key_from_fragment,
    plaintext_size,
    small_part_size,
)
from loader.errors import DecryptionFailed
from tests.blobs import decrypt, decrypt_chunks, encrypt

# NIST SP 800-38A, F.2.5 (CBC-AES256.Encrypt) and F.2.6 (CBC-AES256.Decrypt).
NIST_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
NIST_IV = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
NIST_PLAINTEXT = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172a"
    "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef"
    "f69f2445df4f9b17ad2b417be66c3710"
)
NIST_CIPHERTEXT = bytes.fromhex(
    "f58c4c04d6e5f1ba779eabfb5f7bfbd6"
    "9cfc4e967edb808d679f777bc6702c7d"
    "39f23369a9d9bacfa530e26304231461"
    "b2eb05e2c39be9fcda6c19078c6a9d1b"
)

KEY = key_from_fragment(b"test-fragment")
OTHER_KEY = key_from_fragment(b"another-fragment")
IV = bytes(range(100, 116))
SIZES = [0, 1, 15, 16, 17, 31, 32, 33, 3071, 3072, 3073]
BIG = 3 * (1 << 20) + 5


def text(size: int) -> bytes:
    """Printable bytes only: no byte is a valid padding value (1..16), so damage is detected."""
    seed = hashlib.sha256(str(size).encode()).digest()
    pattern = bytes(32 + b % 95 for b in seed * 4)
    return (pattern * (size // len(pattern) + 1))[:size]


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def decrypt_in(key: bytes, chunks: Iterable[bytes]) -> bytes:
    decryptor = Decryptor(key)
    return b"".join(decryptor.update(c) for c in chunks) + decryptor.finalize()


def aes_block(key: bytes, block: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305
    return encryptor.update(block) + encryptor.finalize()


def test_key_is_sha256_of_the_fragment() -> None:
    assert key_from_fragment(b"abc") == hashlib.sha256(b"abc").digest()
    assert len(key_from_fragment(b"")) == 32


def test_nist_f25_cbc_aes256_encrypt() -> None:
    blob = encrypt(NIST_KEY, NIST_PLAINTEXT, NIST_IV)
    assert blob[:IV_SIZE] == NIST_IV
    assert blob[IV_SIZE:-BLOCK] == NIST_CIPHERTEXT
    # An aligned plaintext gets a whole block of padding, chained on the last ciphertext block.
    chained = bytes(a ^ 0x10 for a in NIST_CIPHERTEXT[-BLOCK:])
    assert blob[-BLOCK:] == aes_block(NIST_KEY, chained)
    assert len(blob) == encrypted_size(len(NIST_PLAINTEXT)) == IV_SIZE + 5 * BLOCK


def test_nist_f26_cbc_aes256_decrypt() -> None:
    decryptor = Decryptor(NIST_KEY)
    # The last block is held back until the padding is known.
    assert decryptor.update(NIST_IV + NIST_CIPHERTEXT) == NIST_PLAINTEXT[: 3 * BLOCK]
    blob = encrypt(NIST_KEY, NIST_PLAINTEXT, NIST_IV)
    assert decrypt(NIST_KEY, blob) == NIST_PLAINTEXT
    assert plaintext_size(NIST_KEY, len(blob), blob[-32:]) == len(NIST_PLAINTEXT)


@pytest.mark.parametrize("size", [*SIZES, BIG])
def test_round_trip_and_sizes(size: int) -> None:
    plain = text(size)
    blob = encrypt(KEY, plain, IV)
    assert len(blob) == encrypted_size(size)
    assert (len(blob) - IV_SIZE) % BLOCK == 0
    assert decrypt(KEY, blob) == plain
    assert plaintext_size(KEY, len(blob), blob[-32:]) == size


@pytest.mark.parametrize("chunk", [1, 7, 16, 17])
@pytest.mark.parametrize("size", SIZES)
def test_decryptor_fed_in_small_chunks(size: int, chunk: int) -> None:
    plain = text(size)
    blob = encrypt(KEY, plain, IV)
    assert decrypt_in(KEY, pieces(blob, chunk)) == plain
    assert b"".join(decrypt_chunks(KEY, pieces(blob, chunk))) == plain


@pytest.mark.parametrize("chunk", [4093, 1 << 16, (1 << 20) + 1])
def test_decryptor_fed_a_few_megabytes(chunk: int) -> None:
    plain = text(BIG)
    blob = encrypt(KEY, plain, IV)
    assert decrypt_in(KEY, pieces(blob, chunk)) == plain


@pytest.mark.parametrize("cut", range(IV_SIZE + BLOCK + 2))
def test_iv_split_across_chunks(cut: int) -> None:
    plain = text(40)
    blob = encrypt(KEY, plain, IV)
    assert decrypt_in(KEY, [blob[:cut], b"", blob[cut:]]) == plain
    first = min(3, cut)
    assert decrypt_in(KEY, [blob[:first], blob[first:cut], blob[cut:]]) == plain


@pytest.mark.parametrize("chunk", [1, 7, 16, 17, 1000])
def test_encryptor_fed_in_chunks_gives_the_same_blob(chunk: int) -> None:
    plain = text(3073)
    encryptor = Encryptor(KEY, IV)
    blob = b"".join(encryptor.update(p) for p in pieces(plain, chunk)) + encryptor.finalize()
    assert blob == encrypt(KEY, plain, IV)


def test_encryptor_draws_a_fresh_iv_and_refuses_a_bad_one() -> None:
    first, second = encrypt(KEY, b"same"), encrypt(KEY, b"same")
    assert first[:IV_SIZE] != second[:IV_SIZE]
    assert decrypt(KEY, first) == decrypt(KEY, second) == b"same"
    with pytest.raises(ValueError, match="16 bytes"):
        Encryptor(KEY, b"short")


def test_encryptor_finalize_alone_writes_iv_and_one_block() -> None:
    blob = Encryptor(KEY, IV).finalize()
    assert blob[:IV_SIZE] == IV
    assert len(blob) == encrypted_size(0) == IV_SIZE + BLOCK
    assert decrypt(KEY, blob) == b""


def damaged_blobs(size: int) -> dict[str, bytes]:
    blob = encrypt(KEY, text(size), IV)
    cases = {
        "flipped last byte": blob[:-1] + bytes([blob[-1] ^ 0x01]),
        # Flips the last padding byte itself: always bad padding.
        "flipped padding byte": blob[:-17] + bytes([blob[-17] ^ 0x01]) + blob[-16:],
    }
    for cut in range(1, 32):
        cases[f"cut by {cut}"] = blob[:-cut]
    return cases


SHORT_BLOBS = {
    "empty": b"",
    "iv only": IV,
    "iv and part of a block": IV + bytes(15),
    "part of an iv": IV[:7],
}


def assert_decryption_fails(key: bytes, blob: bytes) -> None:
    with pytest.raises(DecryptionFailed):
        decrypt(key, blob)
    for chunk in (1, 16, 17):
        with pytest.raises(DecryptionFailed):
            b"".join(decrypt_chunks(key, pieces(blob, chunk)))
    with pytest.raises(DecryptionFailed):
        plaintext_size(key, len(blob), blob[-32:])


@pytest.mark.parametrize("size", SIZES)
def test_wrong_key_fails(size: int) -> None:
    assert_decryption_fails(OTHER_KEY, encrypt(KEY, text(size), IV))


@pytest.mark.parametrize("size", SIZES)
def test_damaged_blob_fails(size: int) -> None:
    for blob in damaged_blobs(size).values():
        assert_decryption_fails(KEY, blob)


@pytest.mark.parametrize("name", SHORT_BLOBS)
def test_too_short_blob_fails(name: str) -> None:
    assert_decryption_fails(KEY, SHORT_BLOBS[name])


def test_plaintext_size_wants_the_last_32_bytes() -> None:
    blob = encrypt(KEY, b"x" * 40, IV)
    with pytest.raises(ValueError, match="32 bytes"):
        plaintext_size(KEY, len(blob), blob[-16:])


@pytest.mark.parametrize(
    ("blob_size", "small"),
    [(0, 0), (1, 0), (3, 0), (4, 1), (10, 3), (32, 9), (10239, 3071), (10240, 3072), (10**9, 3072)],
)
def test_small_part_size_examples(blob_size: int, small: int) -> None:
    assert small_part_size(blob_size) == small


@given(st.integers(min_value=0, max_value=10**12))
def test_small_part_size_rule(blob_size: int) -> None:
    assert small_part_size(blob_size) == min(SMALL_PART_MAX, int(Fraction(3, 10) * blob_size))


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.binary(min_size=16, max_size=16), st.data())
def test_round_trip_any_bytes_any_chunking(plain: bytes, iv: bytes, data: st.DataObject) -> None:
    blob = encrypt(KEY, plain, iv)
    assert len(blob) == encrypted_size(len(plain))
    chunks = data.draw(chunked(blob))
    assert b"".join(decrypt_chunks(KEY, chunks)) == plain
    plain_chunks = data.draw(chunked(plain))
    encryptor = Encryptor(KEY, iv)
    assert b"".join(encryptor.update(c) for c in plain_chunks) + encryptor.finalize() == blob


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=12_000))
def test_small_and_big_parts_rejoin_to_the_blob(plain: bytes) -> None:
    blob = encrypt(KEY, plain)
    cut = small_part_size(len(blob))
    small, big = blob[:cut], blob[cut:]
    assert len(small) <= min(SMALL_PART_MAX, 0.3 * len(blob))
    assert small + big == blob
    assert b"".join(decrypt_chunks(KEY, [small, big])) == plain


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4),
    st.integers(0, 40),
    st.booleans(),
    st.data(),
)
def test_any_damage_is_decryption_failed_or_bytes(
    plain: bytes,
    flips: list[tuple[int, int]],
    cut: int,
    wrong_key: bool,
    data: st.DataObject,
) -> None:
    damaged = bytearray(encrypt(KEY, plain))
    for position, mask in flips:
        damaged[position % len(damaged)] ^= mask
    blob = bytes(damaged[: max(0, len(damaged) - cut)])
    key = OTHER_KEY if wrong_key else KEY
    # CBC has no integrity: damage may decrypt to other bytes; it must never be another error.
    try:
        result: bytes | None = decrypt(key, blob)
    except DecryptionFailed:
        result = None
    try:
        streamed: bytes | None = b"".join(decrypt_chunks(key, data.draw(chunked(blob))))
    except DecryptionFailed:
        streamed = None
    assert streamed == result
    try:
        size: int | None = plaintext_size(key, len(blob), blob[-32:])
    except DecryptionFailed:
        size = None
    assert size == (None if result is None else len(result))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.booleans(), st.data())
def test_decrypt_chunks_never_yields_the_tail_of_a_failing_blob(
    plain: bytes, wrong_key: bool, data: st.DataObject
) -> None:
    blob = encrypt(KEY, plain, IV)
    if not wrong_key:
        # Flipping the byte before the last block changes only the last padding byte.
        blob = blob[:-17] + bytes([blob[-17] ^ 0x01]) + blob[-16:]
    key = OTHER_KEY if wrong_key else KEY
    last_block_starts = len(blob) - IV_SIZE - BLOCK
    received = b""
    try:
        for piece in decrypt_chunks(key, data.draw(chunked(blob))):
            received += piece
    except DecryptionFailed:
        assert len(received) <= last_block_starts
        if not wrong_key:
            # The flip garbles the block before the last; the blocks before it are intact.
            intact = max(0, len(received) - BLOCK)
            assert received[:intact] == plain[:intact]
    else:
        assert wrong_key, "a blob with bad padding decrypted"
