"""Every error the loader answers with, and what each means to a caller.

    LoaderError                    500 internal-error
    ├── ConfigError                503 config-error         (a bad setting, told at start-up)
    ├── ServerError                (start-up only: the socket cannot be served)
    ├── CrashLoop                  503 crash-loop           (start-up only: restarts stopped)
    ├── BadRequest                 400 bad-request
    │   ├── InvalidName            400 invalid-name
    │   └── NameMismatch           400 name-mismatch
    ├── ValidationFailed           422 validation-error
    ├── NotAuthenticated           401 not-authenticated
    ├── WrongCredentials           401 wrong-credentials
    ├── Forbidden                  403 forbidden            (a caller ALLOWED_* leaves out)
    ├── NotFound                   404 not-found
    │   ├── ArchiveMissing         404 archive-missing
    │   └── RemoteNotFound         404 remote-not-found
    ├── ArchiveUnreadable          500 archive-unreadable   (the archive is there; reading it fails)
    ├── PayloadTooLarge            413 payload-too-large
    ├── InsufficientStorage        507 insufficient-storage
    ├── DecryptionFailed           502 decryption-failed
    ├── IntegrityFailed            502 integrity-failed     (not the blob the API vouches for)
    ├── IntegrityMissing           502 integrity-missing    (no record, and REQUIRE_INTEGRITY=1)
    ├── RemoteRefused              502 remote-refused       (the remote answered, and said no)
    ├── RemoteUntrusted            502 remote-untrusted     (its TLS certificate fails to verify)
    ├── RemoteUnavailable          503 remote-unavailable   (the remote could not be reached)
    ├── DockerFailed               502 docker-failed        (Docker answered, and said no)
    └── DockerUnavailable          503 docker-unavailable   (Docker could not be reached)

One middleware (`app.error_middleware`) turns any of them into
`{"detail": message, "code": code}` with the class's status. Messages are for
people and never carry a password, a token or a key fragment.
"""

from __future__ import annotations


class LoaderError(Exception):
    """Base of every error the loader raises on purpose."""

    status = 500
    code = "internal-error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(LoaderError):
    """An environment variable has a value the loader cannot use."""

    status = 503
    code = "config-error"

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


class ServerError(LoaderError):
    """The socket cannot be served (taken by a live daemon, wrong fd, ...)."""

    code = "server-error"


class CrashLoop(LoaderError):
    """The daemon crashed in a loop, and this start stops systemd's restarts (systemd.Runs)."""

    status = 503
    code = "crash-loop"


class BadRequest(LoaderError):
    status = 400
    code = "bad-request"


class InvalidName(BadRequest):
    code = "invalid-name"


class NameMismatch(BadRequest):
    code = "name-mismatch"


class ValidationFailed(LoaderError):
    status = 422
    code = "validation-error"


class NotAuthenticated(LoaderError):
    status = 401
    code = "not-authenticated"


class WrongCredentials(LoaderError):
    status = 401
    code = "wrong-credentials"


class Forbidden(LoaderError):
    status = 403
    code = "forbidden"


class NotFound(LoaderError):
    status = 404
    code = "not-found"


class ArchiveMissing(NotFound):
    code = "archive-missing"


class RemoteNotFound(NotFound):
    code = "remote-not-found"


class ArchiveUnreadable(LoaderError):
    code = "archive-unreadable"


class PayloadTooLarge(LoaderError):
    status = 413
    code = "payload-too-large"


class InsufficientStorage(LoaderError):
    status = 507
    code = "insufficient-storage"


class DecryptionFailed(LoaderError):
    status = 502
    code = "decryption-failed"


class IntegrityFailed(LoaderError):
    status = 502
    code = "integrity-failed"


class IntegrityMissing(LoaderError):
    status = 502
    code = "integrity-missing"


class RemoteRefused(LoaderError):
    status = 502
    code = "remote-refused"


class RemoteUntrusted(LoaderError):
    status = 502
    code = "remote-untrusted"


class RemoteUnavailable(LoaderError):
    status = 503
    code = "remote-unavailable"


class DockerFailed(LoaderError):
    status = 502
    code = "docker-failed"


class DockerUnavailable(LoaderError):
    status = 503
    code = "docker-unavailable"
