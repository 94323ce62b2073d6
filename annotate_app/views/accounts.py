"""Accounts (admins): list, add, disable or enable, change role, reset a password.

A generated password is shown once, in the run that made it, and kept nowhere else. Admins
cannot disable or demote themselves, so a lab never locks out its last admin by a click.
"""

from __future__ import annotations

import secrets

import pandas as pd
import streamlit as st

from annotate_app import context
from store import accounts
from store.errors import PathloopError
from store.models import ROLES

ws, engine, me = context.require_admin()
st.title("Accounts")
table = st.empty()


def act(what: str, fn, *args) -> bool:
    """Run one account change; report it or its error on the page."""
    try:
        fn(engine, *args)
    except PathloopError as e:
        st.error(str(e))
        return False
    except context.DB_ERRORS as e:
        st.error(f"{what} did NOT happen: {context.one_line(e)}")
        return False
    st.success(f"{what}: done.")
    return True


def show_once(username: str, password: str) -> None:
    st.success(f"Account **{username}** is ready. Its password is shown only now; pass it on safely.")
    st.code(password, language=None)


with st.expander("Add an account", expanded=False):
    with st.form("add_user", clear_on_submit=True):
        name = st.text_input("Username")
        role = st.selectbox("Role", ROLES)
        email = st.text_input("E-mail for single sign-on (optional)")
        password = st.text_input("Password (leave empty to generate one)", type="password")
        add = st.form_submit_button("Add account", type="primary")
    if add:
        try:
            user, generated = accounts.add_user(engine, name.strip(), role=role, password=password or None,
                                                email=email.strip() or None)
        except PathloopError as e:
            st.error(str(e))
        except context.DB_ERRORS as e:
            st.error(f"The account was NOT added: {context.one_line(e)}")
        else:
            if generated:
                show_once(user.username, generated)
            else:
                st.success(f"Account **{user.username}** added with the password you typed.")

try:
    users = accounts.list_users(engine)
except context.DB_ERRORS as e:
    st.error(f"The database is not available: {context.one_line(e)}")
    st.stop()
others = [u.username for u in users if u.username != me.username]

st.subheader("Change an account")
if not others:
    st.caption("No other accounts yet.")
else:
    who = st.selectbox("Account", others, key="accounts_pick")
    current = next(u for u in users if u.username == who)
    c1, c2, c3 = st.columns(3)
    if current.active:
        if c1.button(f"Disable {who}", key="accounts_disable"):
            act(f"Disable {who}", accounts.set_active, who, False)
    elif c1.button(f"Enable {who}", key="accounts_enable"):
        act(f"Enable {who}", accounts.set_active, who, True)
    new_role = "annotator" if current.role == "admin" else "admin"
    if c2.button(f"Make {who} an {new_role}", key="accounts_role"):
        act(f"{who} is now {new_role}", accounts.set_role, who, new_role)
    if c3.button(f"Reset {who}'s password", key="accounts_reset"):
        fresh = secrets.token_urlsafe(12)
        if act(f"New password for {who}", accounts.set_password, who, fresh):
            show_once(who, fresh)

try:
    users = accounts.list_users(engine)  # again, so the table shows the changes just made
except context.DB_ERRORS as e:
    st.error(f"The database is not available: {context.one_line(e)}")
    st.stop()
table.dataframe(
    pd.DataFrame([{"username": u.username, "role": u.role, "active": bool(u.active),
                   "e-mail": u.email or "", "created": u.created_at} for u in users]),
    hide_index=True,
)
