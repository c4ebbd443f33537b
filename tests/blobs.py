"""Whole-blob encryption and decryption for tests: the daemon itself only streams
(loader.crypto's Encryptor and Decryptor)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from loader.crypto import Decryptor, Encryptor


def decrypt_chunks(key: bytes, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Plaintext pieces of the blob made of `chunks`; raises DecryptionFailed at the end if bad.

    The last block is held back until the padding checks out, so a consumer never
    receives the tail of a blob that fails.
    """
    decryptor = Decryptor(key)
    for chunk in chunks:
        piece = decryptor.update(chunk)
        if piece:
            yield piece
    yield decryptor.finalize()


def encrypt(key: bytes, plaintext: bytes, iv: bytes | None = None) -> bytes:
    encryptor = Encryptor(key, iv)
    return encryptor.update(plaintext) + encryptor.finalize()


def decrypt(key: bytes, blob: bytes) -> bytes:
    decryptor = Decryptor(key)
    return decryptor.update(blob) + decryptor.finalize()
