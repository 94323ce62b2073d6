"""Annotator accounts: scrypt password hashes, roles, sign-in with a back-off.

Only hashes are stored (``scrypt$N$r$p$<salt>$<hash>``, base64); nothing here logs or
returns a password except the one ``add_user`` generates, which the caller shows once.
Failed sign-ins are counted in the database, so the back-off holds across the app's
processes: after ``FREE_FAILURES`` failures in a row each further attempt must wait
2**(failures - FREE_FAILURES) seconds after the last one, at most ``MAX_BACKOFF_S``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import math
import os
import re
import secrets
import time
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import func, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from store.db import write_session
from store.errors import PathloopError
from store.models import ROLES, Annotator, as_utc, utcnow

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD, MAX_PASSWORD = 8, 1024
FREE_FAILURES = 5
MAX_BACKOFF_S = 15 * 60
FAILURE_DELAY_S = 0.25  # every failed attempt also waits this long: slows guessing in one session
USERNAME = re.compile(r"^[A-Za-z0-9._-]{2,64}$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
WRONG = "wrong username or password"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=2**26)


def hash_password(password: str) -> str:
    """An scrypt hash of ``password`` with a fresh 16-byte salt, as one ``$``-separated string."""
    salt = os.urandom(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str | None) -> bool:
    """Whether ``password`` matches the hash; False for a malformed or missing hash."""
    try:
        scheme, n, r, p, salt, digest = (encoded or "").split("$")
        if scheme != "scrypt" or int(n) > 2**20:
            return False
        candidate = _scrypt(password, base64.b64decode(salt, validate=True), int(n), int(r), int(p))
        return hmac.compare_digest(candidate, base64.b64decode(digest, validate=True))
    except (ValueError, TypeError):
        return False


@functools.cache
def _dummy_hash() -> str:
    """Checked for unknown users, so they cost the same time as known ones."""
    return hash_password(secrets.token_urlsafe(12))


def _check_username(username) -> str:
    if not isinstance(username, str) or not USERNAME.match(username):
        raise PathloopError(f"username {username!r}: expected 2-64 letters, digits, '.', '_' or '-'")
    return username


def _check_role(role) -> str:
    if role not in ROLES:
        raise PathloopError(f"role {role!r}; expected one of: {', '.join(ROLES)}")
    return role


def _check_password(password) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise PathloopError(f"password: expected {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


def _check_email(email) -> str | None:
    if email is None or email == "":
        return None
    if not isinstance(email, str) or len(email) > 254 or not EMAIL.match(email.strip()):
        raise PathloopError(f"e-mail {email!r}: expected an address like name@example.org")
    return email.strip().lower()


def _user(s: Session, username: str) -> Annotator:
    u = s.exec(select(Annotator).where(Annotator.username == username)).first()
    if u is None:
        raise PathloopError(f"no user named {username!r}; see `pathloop users list`")
    return u


def _done(u: Annotator) -> Annotator:
    u.created_at = as_utc(u.created_at)
    u.last_failed_at = as_utc(u.last_failed_at)
    return u


def add_user(engine: Engine, username: str, role: str = "annotator", password: str | None = None,
             email: str | None = None) -> tuple[Annotator, str | None]:
    """Create an account; returns it and the generated password (None when one was given)."""
    _check_username(username)
    _check_role(role)
    email = _check_email(email)
    generated = secrets.token_urlsafe(12) if password is None else None
    hashed = hash_password(generated or _check_password(password))
    with write_session(engine) as s:
        if s.exec(select(Annotator.id).where(Annotator.username == username)).first() is not None:
            raise PathloopError(f"user {username!r} already exists")
        if email and s.exec(select(Annotator.id).where(func.lower(Annotator.email) == email)).first() is not None:
            raise PathloopError(f"e-mail {email!r} already belongs to another user")
        u = Annotator(username=username, role=role, password_hash=hashed, email=email)
        s.add(u)
        try:
            s.commit()
        except IntegrityError:  # created by someone else between the check and the insert
            raise PathloopError(f"user {username!r} already exists") from None
        return _done(u), generated


def list_users(engine: Engine) -> list[Annotator]:
    """Every account, by username. The rows carry ``password_hash``: never display it."""
    with Session(engine, expire_on_commit=False) as s:
        return [_done(u) for u in s.exec(select(Annotator).order_by(Annotator.username)).all()]


def _refuse_last_admin(s: Session, u: Annotator) -> None:
    others = s.exec(select(func.count()).select_from(Annotator).where(
        Annotator.role == "admin", Annotator.active, Annotator.id != u.id)).one()
    if u.role == "admin" and u.active and others == 0:
        raise PathloopError(f"{u.username} is the last active admin; make another admin first")


def set_active(engine: Engine, username: str, active: bool) -> Annotator:
    """Enable or disable an account (a disabled one cannot sign in, rate or be given items)."""
    with write_session(engine) as s:
        u = _user(s, username)
        if not active:
            _refuse_last_admin(s, u)
        u.active = bool(active)
        s.add(u)
        s.commit()
        return _done(u)


def set_role(engine: Engine, username: str, role: str) -> Annotator:
    _check_role(role)
    with write_session(engine) as s:
        u = _user(s, username)
        if role != "admin":
            _refuse_last_admin(s, u)
        u.role = role
        s.add(u)
        s.commit()
        return _done(u)


def set_password(engine: Engine, username: str, password: str) -> Annotator:
    """Replace the password; also clears the failed sign-in count."""
    hashed = hash_password(_check_password(password))
    with write_session(engine) as s:
        u = _user(s, username)
        u.password_hash, u.failed_logins, u.last_failed_at = hashed, 0, None
        s.add(u)
        s.commit()
        return _done(u)


def backoff_seconds(failures: int) -> float:
    """How long after the last failure the next attempt must wait."""
    if failures < FREE_FAILURES:
        return 0.0
    return float(min(2 ** (failures - FREE_FAILURES), MAX_BACKOFF_S))


def authenticate(engine: Engine, username: str, password: str, *, now: datetime | None = None,
                 sleep: Callable[[float], None] = time.sleep, failure_delay: float = FAILURE_DELAY_S) -> Annotator:
    """The account for these credentials, or a PathloopError that does not say which part was wrong.

    ``now`` and ``sleep`` are injectable for tests; each failure sleeps ``failure_delay``.
    """
    now = utcnow() if now is None else as_utc(now)
    with Session(engine, expire_on_commit=False) as s:
        u = s.exec(select(Annotator).where(Annotator.username == username)).first() if isinstance(username, str) else None
    if u is not None and u.failed_logins >= FREE_FAILURES and u.last_failed_at is not None:
        wait = backoff_seconds(u.failed_logins) - (now - as_utc(u.last_failed_at)).total_seconds()
        if wait > 0:
            raise PathloopError(f"too many failed sign-ins for {u.username}; try again in {math.ceil(wait)} s")
    ok = isinstance(password, str) and verify_password(password, u.password_hash if u else _dummy_hash())
    if u is None or not ok:
        if u is not None:
            with write_session(engine) as s:  # atomic increment: concurrent failures all count
                s.exec(update(Annotator).where(Annotator.id == u.id).values(
                    failed_logins=Annotator.failed_logins + 1, last_failed_at=now))
                s.commit()
        sleep(failure_delay)
        raise PathloopError(WRONG)
    if not u.active:
        raise PathloopError(f"account {u.username} is disabled")
    if u.failed_logins or u.last_failed_at is not None:
        with write_session(engine) as s:
            s.exec(update(Annotator).where(Annotator.id == u.id).values(failed_logins=0, last_failed_at=None))
            s.commit()
        u.failed_logins, u.last_failed_at = 0, None
    return _done(u)


def user_by_email(engine: Engine, email: str) -> Annotator | None:
    """The account with this e-mail (case-insensitive), for single sign-on; None if there is none."""
    if not isinstance(email, str) or not email.strip():
        return None
    with Session(engine, expire_on_commit=False) as s:
        u = s.exec(select(Annotator).where(func.lower(Annotator.email) == email.strip().lower())).first()
    return None if u is None else _done(u)
