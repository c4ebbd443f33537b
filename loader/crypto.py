"""The blob format of resource-api.md: IV (16 bytes) || AES-256-CBC(SHA-256(fragment), IV, PKCS7).

Streaming both ways, in memory only: this module knows nothing of files or sockets.
The `cryptography` package is imported on first use: an idle daemon never needs it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from loader.errors import DecryptionFailed

BLOCK = 16
IV_SIZE = 16
# The small part is at most this many bytes of the blob (resource-api.md, "Resources").
SMALL_PART_MAX = 3072


def _cbc(key: bytes, iv: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(key), modes.CBC(iv))


def block_decryptor(key: bytes, previous_block: bytes) -> Any:
    """A CBC decryptor that starts after `previous_block` (the ciphertext block before
    the first one it is given, or the IV): any part of a blob decrypts on its own."""
    return _cbc(key, previous_block).decryptor()


def _pkcs7() -> Any:  # the Encryptor's padding
    from cryptography.hazmat.primitives import padding

    return padding.PKCS7(BLOCK * 8)


def key_from_fragment(fragment: bytes) -> bytes:
    """The AES-256 key: SHA-256 of the fragment's bytes."""
    return hashlib.sha256(fragment).digest()


def small_part_size(blob_size: int) -> int:
    """Where a blob is cut: the small part is min(3072, floor(0.3 * size)) bytes."""
    return min(SMALL_PART_MAX, blob_size * 3 // 10)


def encrypted_size(plaintext_size: int) -> int:
    """IV, then the plaintext padded up to the next whole block (a full block when aligned)."""
    return IV_SIZE + (plaintext_size // BLOCK + 1) * BLOCK


class Decryptor:
    """Decrypts a blob fed in pieces of any size; `finalize` checks the padding.

    A wrong key or a damaged blob raises DecryptionFailed, from `finalize` at the latest.
    The last decrypted block is always held back, since it carries the padding: a caller
    never receives the tail of a blob that fails.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._iv = b""
        self._decryptor: Any = None
        self._cipher_bytes = 0
        # Decrypted in place after the held-back block: one copy out per piece (bench/).
        self._buffer = bytearray()
        self._held = 0

    def update(self, data: bytes | memoryview) -> bytes:
        if self._decryptor is None:
            need = IV_SIZE - len(self._iv)
            self._iv += bytes(data[:need])
            data = data[need:]
            if len(self._iv) < IV_SIZE:
                return b""
            self._decryptor = _cbc(self._key, self._iv).decryptor()
        self._cipher_bytes += len(data)
        size = self._held + len(data) + BLOCK
        if len(self._buffer) < size:
            self._buffer.extend(bytes(size - len(self._buffer)))
        view = memoryview(self._buffer)
        done = self._held + self._decryptor.update_into(data, view[self._held :])
        if done <= BLOCK:
            self._held = done
            return b""
        out = bytes(view[: done - BLOCK])
        view[:BLOCK] = view[done - BLOCK : done]
        self._held = BLOCK
        return out

    def finalize(self) -> bytes:
        if self._decryptor is None or self._cipher_bytes == 0:
            raise DecryptionFailed("the encrypted data is too short to hold anything")
        if self._cipher_bytes % BLOCK:
            raise DecryptionFailed("the encrypted data is cut short (not whole AES blocks)")
        self._decryptor.finalize()
        last = bytes(self._buffer[: self._held])
        return last[: -_padding(last)]


class Encryptor:
    """Encrypts a plaintext fed in pieces; the IV comes first in the output."""

    def __init__(self, key: bytes, iv: bytes | None = None) -> None:
        iv = os.urandom(IV_SIZE) if iv is None else iv
        if len(iv) != IV_SIZE:
            raise ValueError("the IV must be 16 bytes")
        self._encryptor = _cbc(key, iv).encryptor()
        self._padder = _pkcs7().padder()
        self._header = iv

    def update(self, data: bytes) -> bytes:
        out = self._header + self._encryptor.update(self._padder.update(data))
        self._header = b""
        return out

    def finalize(self) -> bytes:
        out = self._header + self._encryptor.update(self._padder.finalize())
        self._header = b""
        return out + self._encryptor.finalize()


def plaintext_size(key: bytes, blob_size: int, last_two_blocks: bytes) -> int:
    """The plaintext's size, from the blob's size and its last 32 bytes (or IV + 1 block).

    CBC decrypts the last block with the one before it as IV, so the padding is known
    before the whole blob is read: what /load needs for its Content-Length.
    """
    if blob_size < IV_SIZE + BLOCK or (blob_size - IV_SIZE) % BLOCK:
        raise DecryptionFailed("the encrypted data is cut short (not whole AES blocks)")
    if len(last_two_blocks) != 2 * BLOCK:
        raise ValueError("need the last 32 bytes of the blob")
    iv, last = last_two_blocks[:BLOCK], last_two_blocks[BLOCK:]
    return blob_size - IV_SIZE - _padding(_cbc(key, iv).decryptor().update(last))


def _padding(last_block: bytes) -> int:
    """The PKCS7 padding's length, read from the decrypted last block."""
    pad = last_block[-1] if len(last_block) == BLOCK else 0
    if not 1 <= pad <= BLOCK or last_block[-pad:] != bytes([pad]) * pad:
        raise DecryptionFailed(
            "the data does not decrypt: wrong key, or the encrypted data is damaged"
        )
    return pad
