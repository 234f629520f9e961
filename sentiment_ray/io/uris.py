"""Object storage: local paths and `s3://` / `gs://` (any pyarrow filesystem URI) reached one
way, remote folders copied to local disk for libraries that need a path (a LoRA adapter for
PEFT), and credentials kept out of everything this project prints or writes.

    fs, inner = filesystem("s3://bucket/runs/demo")          # pyarrow S3FileSystem, "bucket/runs/demo"
    with local_folder("s3://bucket/runs/demo/adapter") as path:
        model = PeftModel.from_pretrained(base, path)        # files copied by pyarrow.fs.copy_files
    print(redact(message))                                   # secrets replaced by ***

Credentials come from the standard places, never from the URI: for S3 the AWS variables
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` for MinIO / other S3-compatible servers), the AWS
config files or an instance role; for GCS `GOOGLE_APPLICATION_CREDENTIALS` or the metadata
server, or none at all with Arrow's `gs://anonymous@bucket/...` (public buckets; an emulator
named by `CLOUD_STORAGE_EMULATOR_ENDPOINT`, as in tests/integration/test_gcs_storage.py). Arrow's clients
read these themselves, and so does Ray Train's storage (also pyarrow).
Ray workers read them from their own environment: a local cluster inherits the driver's, a
real cluster needs them on its nodes. A URI carrying credentials (`s3://KEY:SECRET@bucket/x`,
`?secret_key=...`) is refused: it would be copied into manifests, logs and output rows.

Pure at import time: the standard library only (pyarrow is imported inside functions).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from sentiment_ray.errors import UserError

MASK = "***"

# Environment variables whose values are secrets: their values are masked wherever they
# appear in text this project emits (the names matched are credential-like; values shorter
# than 8 characters are too common to mask safely).
_SECRET_ENV_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY|ACCOUNT_KEY|SAS)", re.I)
_SECRET_ENV_MIN_LENGTH = 8
# `scheme://user[:password]@host`: the userinfo of a URI (pyarrow's S3 form is
# `s3://KEY:SECRET@bucket/...`; AWS secrets may hold unescaped '/', so the password part may).
# Arrow's `anonymous@` (`gs://anonymous@bucket/...`: no credentials at all) is not one.
_URI_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?!anonymous@)(?P<userinfo>[^/@:\s'\"]+(?::[^@\s'\"]*)?)@")
# Credential-like query parameters: access_key, secret_key, session_token, X-Amz-Signature,
# X-Amz-Credential, X-Goog-Signature, sig (Azure SAS), password, ...
_CREDENTIAL_QUERY_KEY = r"[\w.\-]*(?:key|secret|token|passw(?:or)?d|signature|credential|sig)[\w.\-]*"
_URI_CREDENTIAL_QUERY = re.compile(rf"(?P<key>[?&;]{_CREDENTIAL_QUERY_KEY}=)(?P<value>[^&;#\s'\"]*)", re.I)


class StorageError(UserError, ValueError):
    """A path or URI cannot be used (inline credentials, missing folder, unreachable store).
    The message is redacted."""

    def __init__(self, message: str):
        super().__init__(redact(message))


class StorageIOError(StorageError):
    """Reading or writing a file failed (permission, a missing folder, a full disk, an object
    store's error): one line naming the path and the cause. `errno` is the OS error number
    when there was one. Its trace is kept: which writer failed is in it, not in the line."""

    keeps_trace = True

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


# errno -> what an operator reads (the OS's own text for the rest).
_CAUSES = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a parent of it is not a folder",
    errno.EISDIR: "it is a folder",
    errno.EIO: "input/output error",
    errno.EMFILE: "too many open files",
    errno.ENAMETOOLONG: "file name too long",
}


def error_cause(err: BaseException) -> str:
    """The cause of an I/O error in a few words: from its errno where it has one (pyarrow
    sets it for local files), else the first line of its message (an object store's error
    code and text), credentials masked."""
    code = getattr(err, "errno", None)
    if code in _CAUSES:
        return _CAUSES[code]
    text = str(getattr(err, "strerror", None) or err or type(err).__name__).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return redact(first[:300])


def io_error(path: str, err: BaseException, action: str) -> StorageIOError:
    """`<path>: cannot <action>: <cause>` as a StorageIOError (chain it with `from err`)."""
    return StorageIOError(f"{path}: cannot {action}: {error_cause(err)}", getattr(err, "errno", None))


# ----------------------------------------------------------------------------- redaction


def _secret_env_values() -> list[str]:
    values = {
        value for name, value in os.environ.items() if _SECRET_ENV_NAME.search(name) and len(value) >= _SECRET_ENV_MIN_LENGTH
    }
    return sorted(values, key=len, reverse=True)  # longest first: no partial masks left


def redact(text: str) -> str:
    """`text` with credentials masked: a URI's userinfo (`s3://KEY:SECRET@b` -> `s3://***@b`),
    credential-like query values (`?secret_key=...`, `X-Amz-Signature=...`), and the value of
    any credential-like environment variable set in this process (AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN, HF_TOKEN, ...). Everything else is left as it was."""
    if not isinstance(text, str) or not text:
        return text
    for value in _secret_env_values():
        text = text.replace(value, MASK)
    text = _URI_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    return _URI_CREDENTIAL_QUERY.sub(lambda m: f"{m.group('key')}{MASK}", text)


def redact_obj(obj: Any) -> Any:
    """`redact` applied to every string in a JSON-like structure (dict keys included)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


def check_no_inline_credentials(path: str, what: str = "path") -> str:
    """`path` unchanged, or StorageError when it carries credentials (see the module doc)."""
    if path and is_uri(path) and (_URI_USERINFO.search(path) or _URI_CREDENTIAL_QUERY.search(path)):
        raise StorageError(
            f"{what} {path} carries credentials; give them through the environment "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS config files, an "
            "instance role; GOOGLE_APPLICATION_CREDENTIALS for gs://) so they are not copied into "
            "manifests, logs and outputs"
        )
    return path


# ----------------------------------------------------------------------------- filesystems


def is_uri(path: str) -> bool:
    return "://" in path


def check_uri(path: str, what: str = "path") -> str:
    """`path` unchanged, or StorageError for inline credentials or a URI query. Options in a
    query (`s3://b/x?endpoint_override=...`) would be lost from every path derived from the URI
    (`<run dir>/adapter`, the files a glob matches), so they come from the environment instead;
    a '?' is not a glob character in a URI for the same reason."""
    check_no_inline_credentials(path, what)
    if path and is_uri(path) and "?" in path:
        raise StorageError(
            f"{what} {path}: a '?' starts a URI query, and options given there would be lost from the "
            "paths derived from it; set them through the environment (AWS_ENDPOINT_URL, AWS_REGION, "
            "CLOUD_STORAGE_EMULATOR_ENDPOINT, ...) and use '*' to match characters"
        )
    return path


def uri_prefix(uri: str) -> str:
    """`scheme://` plus Arrow's `anonymous@` when `uri` has it: what turns a path inside the
    URI's filesystem (`bucket/x.csv`) back into a URI of the same store and access."""
    scheme, rest = uri.split("://", 1)
    return f"{scheme.lower()}://anonymous@" if rest.startswith("anonymous@") else f"{scheme.lower()}://"


def filesystem(path: str):
    """(pyarrow FileSystem, path inside it) for a local path (made absolute) or a URI
    (`s3://`, `gs://`, `file://`, anything `pyarrow.fs.FileSystem.from_uri` knows).
    StorageError for inline credentials, a URI query, or a URI pyarrow cannot open."""
    import pyarrow as pa
    from pyarrow import fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    check_uri(path)
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise StorageError(f"{path}: cannot open this URI: {err}") from None


@contextlib.contextmanager
def local_folder(path: str | None, *, prefix: str = "sentiment-ray-") -> Iterator[str | None]:
    """A local folder with the content of `path`, for libraries that need one (PEFT loading
    an adapter): a local path (or None) as given, a `file://` URI as its path, any other URI
    as a temporary copy made by pyarrow.fs.copy_files and removed when the block ends (a
    copy that a killed process left is removed by the next one: its name holds the pid).
    StorageError when there is no folder at a URI."""
    from pyarrow import fs as pafs

    if not path or not is_uri(path):
        yield path
        return
    fs, inner = filesystem(path)
    inner = inner.rstrip("/")
    if isinstance(fs, pafs.LocalFileSystem):
        yield inner
        return
    try:
        info = fs.get_file_info(inner)
    except OSError as err:
        raise StorageError(f"{path}: cannot reach it: {err}") from None
    if info.type != pafs.FileType.Directory:
        raise StorageError(f"{path}: no such folder")
    remove_orphaned_copies(f"{prefix}copy-")
    local = tempfile.mkdtemp(prefix=f"{prefix}copy-{os.getpid()}-")
    try:
        try:
            pafs.copy_files(inner, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        except OSError as err:
            raise StorageError(f"{path}: cannot copy it to local disk: {err}") from None
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def remove_orphaned_copies(prefix: str) -> int:
    """Delete the local copies (`<prefix><pid>-...` in the temp folder) that processes
    killed before their cleanup left behind; returns how many."""
    removed = 0
    folder = tempfile.gettempdir()
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        pid_text = name[len(prefix) :].split("-", 1)[0] if name.startswith(prefix) else ""
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # its process still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        removed += 1
    return removed


def move_dir(fs, source: str, destination: str) -> None:
    """Move a folder within one pyarrow filesystem: a rename where the filesystem has one
    (local disks: atomic), else `pyarrow.fs.copy_files` then delete, since object stores
    move single objects only (S3's CopyObject). `destination` must not exist."""
    from pyarrow import fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(source, destination)
        return
    pafs.copy_files(source, destination, source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(source)
