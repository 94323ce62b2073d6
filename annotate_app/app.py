"""The annotation app: sign-in, then the pages the account's role allows.

Run it with ``pathloop annotate`` (or ``streamlit run annotate_app/app.py`` with
``$PATHLOOP_WORKSPACE`` set). Pages are registered per role with ``st.navigation``: an
annotator's session has no admin pages at all, so an admin URL opened by hand lands on
Rate (or Streamlit's "page not found"); each admin page also re-checks the role in the
database before it shows anything. "Real or synthetic?" (the visual Turing test) is listed
only while a campaign is active. The account is re-read on every run, so disabling
someone or changing a role applies at their next click. Single sign-on: see
``annotate_app/auth.py``.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from PIL import Image as PILImage

from annotate_app import auth, context
from store import turing

URL_PATHS = ("rate", "turing", "my-progress", "dashboard", "accounts", "export")
VIEWS = Path(__file__).with_name("views")  # not "pages": Streamlit would also serve that folder as v1 pages

# A local favicon: otherwise the page's Material icon is fetched from Google as the favicon.
st.set_page_config(page_title="pathloop", page_icon=PILImage.new("RGB", (32, 32), (142, 68, 173)), layout="wide")

def turing_running(engine) -> bool:
    """A visual Turing test campaign is active (its page is listed only then)."""
    try:
        return bool(turing.active_campaigns(engine))
    except context.DB_ERRORS:
        return False


ws = context.workspace()
engine = context.engine(ws)
user = context.current_user(engine)
if user is None and auth.sign_in_from_oidc(engine):
    user = context.current_user(engine)

if user is None:
    # Every page's URL shows the sign-in form, so a bookmark or a reload signs in and lands
    # where it pointed (if the account's role has that page) rather than on "page not found".
    page = st.navigation(
        [st.Page(auth.sign_in_page, title="Sign in", url_path="sign-in", default=True)]
        + [st.Page(auth.sign_in_page, title="Sign in", url_path=p, visibility="hidden") for p in URL_PATHS],
        position="hidden",
    )
else:
    pages = {
        "Rating": [
            st.Page(VIEWS / "rate.py", title="Rate", icon=":material/rate_review:", url_path="rate", default=True),
            st.Page(VIEWS / "my_progress.py", title="My progress", icon=":material/trending_up:", url_path="my-progress"),
        ],
    }
    if turing_running(engine):
        pages["Rating"].insert(1, st.Page(VIEWS / "turing.py", title="Real or synthetic?", icon=":material/help:",
                                          url_path="turing"))
    if user.is_admin:
        pages["Admin"] = [
            st.Page(VIEWS / "dashboard.py", title="Dashboard", icon=":material/monitoring:", url_path="dashboard"),
            st.Page(VIEWS / "accounts.py", title="Accounts", icon=":material/group:", url_path="accounts"),
            st.Page(VIEWS / "export.py", title="Export", icon=":material/download:", url_path="export"),
        ]
    page = st.navigation(pages)
    st.sidebar.caption(f"Signed in as **{user.username}** ({user.role})")
    auth.sign_out_button()
page.run()
