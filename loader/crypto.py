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
    """Encrypts a plaintext fed in pieces of any size; the IV comes first in the output.

    Whole blocks go to the cipher straight from the caller's bytes; up to 15 bytes wait for
    the next piece, and `finalize` pads them (PKCS7). No copy of the plaintext is made: this
    runs at twice the speed of a padder in front of the cipher (bench/).
    """

    def __init__(self, key: bytes, iv: bytes | None = None) -> None:
        iv = os.urandom(IV_SIZE) if iv is None else iv
        if len(iv) != IV_SIZE:
            raise ValueError("the IV must be 16 bytes")
        self._encryptor = _cbc(key, iv).encryptor()
        self._header = iv
        self._carry = b""

    def pieces(self, data: bytes) -> list[bytes]:
        """The ciphertext that `data` completes, in pieces to be written in order."""
        out = [self._header] if self._header else []
        self._header = b""
        view = memoryview(data)
        if self._carry:
            need = BLOCK - len(self._carry)
            if len(view) < need:
                self._carry += bytes(view)
                return out
            out.append(self._encryptor.update(self._carry + bytes(view[:need])))
            self._carry = b""
            view = view[need:]
        whole = len(view) - len(view) % BLOCK
        if whole:
            out.append(self._encryptor.update(view[:whole]))
        self._carry = bytes(view[whole:])
        return out

    def update(self, data: bytes) -> bytes:
        return b"".join(self.pieces(data))

    def finalize(self) -> bytes:
        pad = BLOCK - len(self._carry)
        last = self._encryptor.update(self._carry + bytes([pad]) * pad)
        out = self._header + last + self._encryptor.finalize()
        self._header = self._carry = b""
        return out


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
