"""The S3 backend: a store at `s3://BUCKET/PREFIX` on any S3-compatible
object storage (AWS S3, SeaweedFS, MinIO, Ceph RGW, ...), through boto3.

Objects are the store's objects (backend.py) under `PREFIX/`, same format as
in a directory. How each operation maps:

    put_if_absent  PUT with `If-None-Match: *` (a 412 means it was there) where
                   the server honours it; probed once per handle (a second
                   conditional PUT of a probe object must fail). Elsewhere HEAD,
                   then PUT: safe for chunks, whose content is fixed by their
                   name, and for the other create-once objects (config, index,
                   manifest), whose names are unique per writer.
    put, get, delete, size, list   PUT, GET, DELETE, HEAD, ListObjectsV2
    touch          HEAD only: S3 cannot update an object's time in place (a
                   copy onto itself could, at the price of a server-side copy
                   per reused chunk). gc.py does not need it: a committing
                   writer names its index in its lease before the sweep fence.
    mtime          LastModified (the server's clock; gc's margin covers skew)
    sync           nothing: a PUT that succeeded is durable (S3 data model).

Settings, first found wins for each: the config file (`SPLITD_S3_CONFIG`, else
`~/.config/splitd/s3.toml` if it exists; TOML):

    endpoint = "http://127.0.0.1:8333"     # else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
    region = "us-east-1"                   # else AWS_REGION / AWS_DEFAULT_REGION
    access_key_id = "..."                  # else AWS_ACCESS_KEY_ID (or a profile)
    secret_access_key = "..."              # else AWS_SECRET_ACCESS_KEY
    session_token = "..."                  # optional, else AWS_SESSION_TOKEN
    addressing_style = "path"              # path (default) | virtual | auto
    connections = 32                       # requests in flight (pool size); a writer
                                           # holds up to 2 x this many chunks in memory
    retry_mode = "adaptive"                # standard | adaptive (client-side rate limit)
    max_attempts = 10                      # per request, with backoff

then boto3's usual chain (environment, ~/.aws, instance roles). Throttling
(SlowDown, 503) and transient errors are retried by botocore with
exponential backoff and jitter; what still fails is one StoreError line
naming the cause (access denied, no such bucket, bad key id or secret, an
unreachable or non-S3 endpoint) and the object.
"""
from __future__ import annotations

import os
import threading
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from agents.store.backend import _check_name
from agents.store.errors import ObjectMissing, StoreBadInput, StoreError

SCHEME = "s3://"
CONFIG_ENV = "SPLITD_S3_CONFIG"
DEFAULT_CONFIG = "~/.config/splitd/s3.toml"
DEFAULT_CONNECTIONS = 32
_KEYS = {"endpoint": str, "region": str, "access_key_id": str, "secret_access_key": str,
         "session_token": str, "addressing_style": str, "connections": int,
         "retry_mode": str, "max_attempts": int}


def is_s3(location: str) -> bool:
    return location.startswith(SCHEME)


@dataclass
class S3Settings:
    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    addressing_style: str = "path"
    connections: int = DEFAULT_CONNECTIONS
    retry_mode: str = "adaptive"
    max_attempts: int = 10
    source: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | None = None) -> S3Settings:
        """From `path`, else $SPLITD_S3_CONFIG, else ~/.config/splitd/s3.toml
        if present; then the AWS environment variables for what is unset."""
        settings = cls()
        explicit = path or os.environ.get(CONFIG_ENV)
        path = explicit or os.path.expanduser(DEFAULT_CONFIG)
        if explicit or os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    values = tomllib.load(f)
            except OSError as e:
                raise StoreBadInput(f"cannot read S3 config {path}: {e.strerror}") from None
            except tomllib.TOMLDecodeError as e:
                raise StoreBadInput(f"S3 config {path} is not valid TOML: {e}") from None
            for k, v in values.items():
                if k not in _KEYS:
                    raise StoreBadInput(f"S3 config {path}: unknown setting {k!r} "
                                        f"(known: {', '.join(_KEYS)})")
                if not isinstance(v, _KEYS[k]) or isinstance(v, bool):
                    raise StoreBadInput(f"S3 config {path}: {k} must be a {_KEYS[k].__name__}")
                setattr(settings, k, v)
            settings.source.append(path)
        env = os.environ
        settings.endpoint = settings.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        settings.region = settings.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if settings.addressing_style not in ("path", "virtual", "auto"):
            raise StoreBadInput(f"S3 addressing_style {settings.addressing_style!r}: path, virtual or auto")
        if settings.retry_mode not in ("standard", "adaptive", "legacy"):
            raise StoreBadInput(f"S3 retry_mode {settings.retry_mode!r}: standard or adaptive")
        if not 1 <= settings.connections <= 1024 or not 1 <= settings.max_attempts <= 100:
            raise StoreBadInput("S3 connections must be 1..1024 and max_attempts 1..100")
        return settings


def parse_location(location: str) -> tuple[str, str]:
    """s3://BUCKET[/PREFIX] -> (bucket, prefix without slashes at the ends)."""
    if not is_s3(location):
        raise StoreBadInput(f"{location!r} is not an s3://BUCKET/PREFIX location")
    bucket, _, prefix = location[len(SCHEME):].partition("/")
    prefix = prefix.strip("/")
    # Bucket names: 3..63 of lower-case letters, digits, dots, hyphens
    # (AWS S3 "Bucket naming rules").
    if not 3 <= len(bucket) <= 63 or not all(c.islower() or c.isdigit() or c in ".-" for c in bucket):
        raise StoreBadInput(f"bad S3 bucket name {bucket!r} in {location}")
    if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
        raise StoreBadInput(f"bad S3 prefix {prefix!r} in {location}")
    return bucket, prefix


class S3Backend:
    """A store's objects under s3://bucket/prefix/ (module docstring)."""

    def __init__(self, location: str, settings: S3Settings | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = parse_location(location)
        self.settings = settings or S3Settings.load()
        s = self.settings
        self.workers = s.connections
        config = Config(
            max_pool_connections=s.connections + 4,     # + heartbeats, listings
            retries={"mode": s.retry_mode, "max_attempts": s.max_attempts},
            s3={"addressing_style": s.addressing_style},
            connect_timeout=10, read_timeout=120,
            # Checksums only where a request needs one (not a second pass over
            # each chunk; ours are hashed and checked on read anyway).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session(
            aws_access_key_id=s.access_key_id, aws_secret_access_key=s.secret_access_key,
            aws_session_token=s.session_token, region_name=s.region)
        if session.region_name is None:    # nor in ~/.aws/config: S3's default
            session = boto3.session.Session(
                aws_access_key_id=s.access_key_id, aws_secret_access_key=s.secret_access_key,
                aws_session_token=s.session_token, region_name="us-east-1")
        self._session = session
        self.client = session.client("s3", endpoint_url=s.endpoint, config=config)
        self.endpoint = self.client.meta.endpoint_url
        self._conditional: bool | None = None
        self._probe_lock = threading.Lock()

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, name: str) -> str:
        _check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    # -- errors ------------------------------------------------------------------

    def _error(self, e: Exception, op: str, name: str) -> StoreError:
        """One line, the cause first, for an S3 failure left after retries."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        where = f"{self.describe()} at {self.endpoint}"
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(f"no S3 credentials for {where}: set access_key_id and secret_access_key "
                              f"in {DEFAULT_CONFIG} (or ${CONFIG_ENV}), or AWS_ACCESS_KEY_ID and "
                              f"AWS_SECRET_ACCESS_KEY")
        if isinstance(e, EndpointConnectionError):
            return StoreError(f"cannot reach S3 endpoint {self.endpoint} ({op} {name}): is the endpoint "
                              f"right and the server up?")
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return StoreError(f"no bucket {self.bucket!r} at S3 endpoint {self.endpoint}")
            if code == "InvalidAccessKeyId":
                return StoreError(f"S3 access key id {self._key_id()} is unknown at {self.endpoint}")
            if code == "SignatureDoesNotMatch":
                return StoreError(f"wrong S3 secret access key for key id {self._key_id()} "
                                  f"at {self.endpoint}")
            if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
                return StoreError(f"access denied: {op} {name} in {where} (check the key's "
                                  f"permissions{' and secret' if code != 'AccessDenied' else ''})")
            if not code or code.isdigit():     # no S3 error document in the answer
                return StoreError(f"S3 {op} {name} in {where} failed: HTTP {status} without an S3 "
                                  f"error (is {self.endpoint} an S3 endpoint?)")
            return StoreError(f"S3 {op} {name} in {where} failed: {code} "
                              f"{err.get('Message', '')}".rstrip())
        return StoreError(f"S3 {op} {name} in {where} failed: {e} (is {self.endpoint} an S3 endpoint?)")

    def _key_id(self) -> str:
        creds = self._session.get_credentials()
        return creds.access_key if creds is not None else "(none)"

    def _call(self, op: str, name: str, fn: Any, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            return fn(Bucket=self.bucket, **kw)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, op, name) from e

    @staticmethod
    def _status(e: BaseException) -> int | None:
        cause = e.__cause__
        resp = getattr(cause, "response", None)
        if isinstance(resp, dict):
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return int(status) if status is not None else None
        return None

    @staticmethod
    def _code(e: BaseException) -> str:
        resp = getattr(e.__cause__, "response", None)
        return str(resp.get("Error", {}).get("Code", "")) if isinstance(resp, dict) else ""

    # -- the Backend interface -----------------------------------------------------

    def conditional_puts(self) -> bool:
        """Whether the server honours `If-None-Match: *` on PUT (probed once:
        create a probe object conditionally twice; the second must fail)."""
        with self._probe_lock:
            if self._conditional is None:
                key = self._key(f"probe-{uuid.uuid4().hex}")
                made = False
                try:
                    self._call("PUT", key, self.client.put_object, Key=key, Body=b"1", IfNoneMatch="*")
                    made = True
                    try:
                        self._call("PUT", key, self.client.put_object, Key=key, Body=b"2", IfNoneMatch="*")
                        self._conditional = False       # ignored the header
                    except StoreError as e:
                        if self._status(e) == 412:
                            self._conditional = True
                        elif self._status(e) in (400, 501):
                            self._conditional = False   # NotImplemented / not understood
                        else:
                            raise
                except StoreError as e:
                    if self._status(e) not in (400, 501):
                        raise
                    self._conditional = False
                finally:
                    if made:
                        self._call("DELETE", key, self.client.delete_object, Key=key)
            return self._conditional

    def put_if_absent(self, name: str, data: bytes) -> bool:
        key = self._key(name)
        if self.conditional_puts():
            try:
                self._call("PUT", name, self.client.put_object, Key=key, Body=data, IfNoneMatch="*")
            except StoreError as e:
                # 412: it exists. 409 ConditionalRequestConflict: a concurrent
                # conditional PUT of the same name is in progress; the content is
                # the same (fixed by the name) or the name is ours alone, so
                # either way the other writer's object stands.
                if self._status(e) in (412, 409):
                    return False
                raise
            return True
        if self.exists(name):
            return False
        self._call("PUT", name, self.client.put_object, Key=key, Body=data)
        return True

    def put(self, name: str, data: bytes) -> None:
        self._call("PUT", name, self.client.put_object, Key=self._key(name), Body=data)

    def get(self, name: str) -> bytes:
        try:
            resp = self._call("GET", name, self.client.get_object, Key=self._key(name))
        except StoreError as e:
            if self._code(e) == "NoSuchKey":
                raise ObjectMissing(name) from None
            raise
        body: bytes = resp["Body"].read()
        return body

    def _head(self, name: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self._call("HEAD", name, self.client.head_object, Key=self._key(name))
        except StoreError as e:
            # HEAD answers have no body: a 404 is a missing key (or bucket:
            # open() GETs the config first, which names a missing bucket).
            if self._status(e) == 404:
                return None
            raise
        return head

    def exists(self, name: str) -> bool:
        return self._head(name) is not None

    def touch(self, name: str) -> bool:
        return self.exists(name)

    def mtime(self, name: str) -> float:
        head = self._head(name)
        if head is None:
            raise ObjectMissing(name)
        return float(head["LastModified"].timestamp())

    def size(self, name: str) -> int:
        head = self._head(name)
        if head is None:
            raise ObjectMissing(name)
        return int(head["ContentLength"])

    def list(self, prefix: str) -> Iterator[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base + prefix)
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield obj["Key"][len(base):]
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, "LIST", prefix) from e

    def delete(self, name: str) -> None:
        self._call("DELETE", name, self.client.delete_object, Key=self._key(name))

    def sync(self) -> None:
        pass
