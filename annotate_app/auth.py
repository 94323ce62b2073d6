"""Sign-in: username and password, or single sign-on through Streamlit's ``st.login``.

Passwords are checked by ``store.accounts.authenticate`` (scrypt hashes, a slowdown after
repeated failures); the form clears itself on submit, so the typed password does not stay
in the session.

Single sign-on (optional). Configure an OpenID Connect provider in
``.streamlit/secrets.toml`` next to where the app runs (see Streamlit's "User
authentication" docs), for example::

    [auth]
    redirect_uri = "https://annotate.example.org/oauth2callback"
    cookie_secret = "a long random string"
    client_id = "..."
    client_secret = "..."
    server_metadata_url = "https://login.example.org/.well-known/openid-configuration"

and give each account its e-mail (``Annotator.email``). After ``st.login()`` the app maps
``st.user.email`` to the account with ``store.accounts.user_by_email``; an e-mail without
an active account gets no access. Without an ``[auth]`` section the button is not shown and
only passwords are used.
"""

from __future__ import annotations

import streamlit as st

from annotate_app import context
from store import accounts
from store.errors import PathloopError


def oidc_configured() -> bool:
    """True when secrets.toml has an ``[auth]`` section (never raises)."""
    try:
        return "auth" in st.secrets
    except Exception:  # no secrets file at all, or an unreadable one
        return False


def oidc_email() -> str | None:
    """The e-mail of an identity-provider login in this browser, if any (never raises)."""
    try:
        user = st.user
        if not getattr(user, "is_logged_in", False):
            return None
        email = user.get("email")
    except Exception:
        return None
    return str(email).strip().lower() if email else None


def sign_in_from_oidc(engine) -> bool:
    """Sign in the account whose e-mail the identity provider vouched for; False if none."""
    email = oidc_email()
    if email is None:
        return False
    try:
        annotator = accounts.user_by_email(engine, email)
    except context.DB_ERRORS as e:
        st.error(f"The database is not available: {context.one_line(e)}")
        return False
    if annotator is None or not annotator.active:
        reason = "is disabled" if annotator is not None else "has no pathloop account"
        st.session_state["signed_out_reason"] = f"{email} {reason}; ask a lab admin."
        return False
    context.sign_in(annotator)
    return True


def sign_in_page() -> None:
    """The sign-in form; on success the app reruns with the pages for the account's role."""
    ws = context.workspace()
    engine = context.engine(ws)
    st.title("pathloop · sign in")
    reason = st.session_state.pop("signed_out_reason", None)
    if reason:
        st.warning(reason)
    with st.form("sign_in", clear_on_submit=True):
        username = st.text_input("Username", key="sign_in_username", autocomplete="username")
        password = st.text_input("Password", type="password", key="sign_in_password",
                                 autocomplete="current-password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        try:
            annotator = accounts.authenticate(engine, username.strip(), password)
        except PathloopError as e:
            st.error(str(e))
        except context.DB_ERRORS as e:
            st.error(f"The database is not available: {context.one_line(e)}")
        else:
            context.sign_in(annotator)
            st.rerun()
    if oidc_configured():
        st.divider()
        if oidc_email() is None:
            st.button("Sign in with your institution", on_click=st.login)
        else:
            st.button("Use another account", on_click=st.logout)


def sign_out_button() -> None:
    """Sidebar button that ends the session (and the identity-provider login, if any)."""
    if st.sidebar.button("Sign out", key="sign_out"):
        was_oidc = oidc_email() is not None
        context.sign_out()
        if was_oidc:
            st.logout()
        st.rerun()
