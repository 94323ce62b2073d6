"""Accounts on SQLite and PostgreSQL: scrypt hashes, sign-in, disabled accounts, back-off."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import Session, select

from store.accounts import (
    FREE_FAILURES,
    add_user,
    authenticate,
    backoff_seconds,
    hash_password,
    list_users,
    set_active,
    set_password,
    set_role,
    user_by_email,
    verify_password,
)
from store.db import make_engine
from store.errors import PathloopError
from store.models import Annotator, utcnow


def sign_in(engine, name, password, **kw):
    kw.setdefault("failure_delay", 0)
    return authenticate(engine, name, password, **kw)


def test_hashes_are_salted_scrypt_and_verify():
    h1, h2 = hash_password("correct horse"), hash_password("correct horse")
    assert h1 != h2 and h1.startswith("scrypt$16384$8$1$") and "correct horse" not in h1
    assert verify_password("correct horse", h1) and verify_password("correct horse", h2)
    assert not verify_password("correct hors", h1)
    for bad in (None, "", "plain", "scrypt$16384$8$1$!!$!!", "bcrypt$1$2$3$4$5", h1.replace("16384", "2097152")):
        assert not verify_password("correct horse", bad)


def test_add_user_stores_only_a_hash_and_signs_in(engine):
    user, generated = add_user(engine, "dr.ada", role="admin", password="s3cret-pass", email="Ada@Lab.org")
    assert generated is None and user.role == "admin" and user.email == "ada@lab.org"
    with Session(engine) as s:
        stored = s.exec(select(Annotator.password_hash)).one()
    assert "s3cret-pass" not in stored and verify_password("s3cret-pass", stored)
    assert sign_in(engine, "dr.ada", "s3cret-pass").id == user.id
    bob, pw = add_user(engine, "bob")
    assert len(pw) >= 16 and sign_in(engine, "bob", pw).id == bob.id
    assert [u.username for u in list_users(engine)] == ["bob", "dr.ada"]
    assert user_by_email(engine, " ADA@lab.org ").id == user.id and user_by_email(engine, "x@y.z") is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"username": "a"}, "username 'a': expected 2-64 letters"),
    ({"username": "ada lovelace"}, "username 'ada lovelace'"),
    ({"username": "ada", "role": "owner"}, "role 'owner'; expected one of: annotator, admin"),
    ({"username": "ada", "password": "short"}, "password: expected 8 to 1024 characters"),
    ({"username": "ada", "email": "not-an-address"}, "e-mail 'not-an-address'"),
])
def test_bad_account_input(engine, kwargs, message):
    with pytest.raises(PathloopError, match=message):
        add_user(engine, **kwargs)


def test_duplicate_username_or_email_is_refused(engine):
    add_user(engine, "ada", password="password-1", email="ada@lab.org")
    with pytest.raises(PathloopError, match="user 'ada' already exists"):
        add_user(engine, "ada", password="password-2")
    with pytest.raises(PathloopError, match="e-mail 'ada@lab.org' already belongs to another user"):
        add_user(engine, "ada2", password="password-2", email="ADA@lab.org")


def test_wrong_password_and_unknown_user_look_the_same(engine):
    add_user(engine, "ada", password="password-1")
    slept = []
    with pytest.raises(PathloopError) as wrong:
        authenticate(engine, "ada", "password-2", sleep=slept.append, failure_delay=0.25)
    with pytest.raises(PathloopError) as unknown:
        authenticate(engine, "nobody", "password-2", sleep=slept.append, failure_delay=0.25)
    assert str(wrong.value) == str(unknown.value) == "wrong username or password"
    assert slept == [0.25, 0.25]


def test_a_disabled_account_cannot_sign_in(engine):
    add_user(engine, "boss", role="admin", password="password-0")
    add_user(engine, "ada", password="password-1")
    set_active(engine, "ada", False)
    with pytest.raises(PathloopError, match="^account ada is disabled$"):
        sign_in(engine, "ada", "password-1")
    with pytest.raises(PathloopError, match="^wrong username or password$"):  # says nothing without the password
        sign_in(engine, "ada", "password-x")
    set_active(engine, "ada", True)
    assert sign_in(engine, "ada", "password-1").username == "ada"


def test_backoff_grows_after_repeated_failures_and_holds_across_processes(db_url):
    one, two = make_engine(db_url), make_engine(db_url)  # two app processes
    add_user(one, "ada", password="password-1")
    t = utcnow()
    for i in range(FREE_FAILURES):
        with pytest.raises(PathloopError, match="wrong username or password"):
            sign_in(one if i % 2 else two, "ada", "guess", now=t)
    # The sixth attempt within a second is refused without checking the password, in either process.
    for engine in (one, two):
        with pytest.raises(PathloopError, match=r"^too many failed sign-ins for ada; try again in 1 s$"):
            sign_in(engine, "ada", "password-1", now=t + timedelta(milliseconds=100))
    with pytest.raises(PathloopError, match="wrong username or password"):
        sign_in(two, "ada", "guess", now=t + timedelta(seconds=1.5))
    with pytest.raises(PathloopError, match="try again in 2 s"):  # the window doubled
        sign_in(one, "ada", "password-1", now=t + timedelta(seconds=1.6))
    ok = sign_in(one, "ada", "password-1", now=t + timedelta(seconds=3.6))
    assert ok.failed_logins == 0  # success resets the count
    with Session(one) as s:
        assert s.exec(select(Annotator.failed_logins)).one() == 0
    assert [backoff_seconds(n) for n in (4, 5, 6, 10, 40)] == [0, 1, 2, 32, 900]
    one.dispose()
    two.dispose()


def test_roles_passwords_and_the_last_admin(engine):
    add_user(engine, "boss", role="admin", password="password-0")
    add_user(engine, "ada", password="password-1")
    with pytest.raises(PathloopError, match="boss is the last active admin"):
        set_active(engine, "boss", False)
    with pytest.raises(PathloopError, match="boss is the last active admin"):
        set_role(engine, "boss", "annotator")
    assert set_role(engine, "ada", "admin").role == "admin"
    assert set_role(engine, "boss", "annotator").role == "annotator"
    set_password(engine, "ada", "a-new-password")
    assert sign_in(engine, "ada", "a-new-password").username == "ada"
    with pytest.raises(PathloopError, match="wrong username or password"):
        sign_in(engine, "ada", "password-1")
    with pytest.raises(PathloopError, match="no user named 'zed'"):
        set_password(engine, "zed", "whatever-long")
