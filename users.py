"""Who is chatting: the key a user's saved chats are filed under (conversation_store.py), from
the strongest source there is:

- a login (`--auth USER:PASS`, several, or `--auth-file`): "login:USER", from Gradio's session;
- on a Space with `hf_oauth: true`, the Hugging Face account signed in: "hf:USERNAME";
- else this browser: an id the server drew and signed, kept in the browser's localStorage
  (gr.BrowserState): "browser:ID". It lasts across restarts because the signing secret is kept
  in the data directory; an id the server did not sign is replaced by a new one, so nobody can
  pick someone else's (or a guessable) id.

A key never comes from what a request says it is: logins and HF accounts come from the
server's session, browser ids only with their signature. No Gradio here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path


SECRET_FILE = "browser-ids.secret"  # in the data directory, beside the chats
ID_BYTES = 18


def read_logins(auth: tuple[str, ...] | None, auth_file: str | None) -> dict[str, str]:
    """USER -> PASS from --auth (each USER:PASS) and --auth-file (one per line, # comments).
    ValueError, one line, for a login that can't be read."""
    if isinstance(auth, str):  # (one login, as a library caller may give it)
        auth = (auth,)
    entries = [("--auth", login) for login in auth or ()]
    if auth_file:
        try:
            lines = Path(auth_file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"--auth-file {auth_file}: {getattr(error, 'strerror', None) or error}") from None
        entries += [(f"{auth_file} line {number}", line.strip()) for number, line in enumerate(lines, 1)
                    if line.strip() and not line.strip().startswith("#")]
    logins: dict[str, str] = {}
    for where, login in entries:
        user, colon, password = login.partition(":")
        if not colon or not user.strip() or not password:
            raise ValueError(f"{where}: a login is USER:PASS")
        logins[user.strip()] = password
    return logins


def oauth_on_space(environ=os.environ) -> bool:
    """A Space whose README front matter says `hf_oauth: true`: HF sets these variables."""
    return bool(environ.get("SPACE_ID") and environ.get("OAUTH_CLIENT_ID"))


class BrowserIds:
    """Draws ids for browsers and checks the ones they bring back: "<id>.<signature>"."""

    def __init__(self, secret: bytes):
        self._secret = secret

    @classmethod
    def kept_in(cls, store) -> "BrowserIds":
        """With the secret kept in the store's data directory (drawn on first use, readable by
        this user only; conversation_store.kept_secret)."""
        return cls(store.secret(SECRET_FILE))

    def _signature(self, browser_id: str) -> str:
        return hmac.new(self._secret, browser_id.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self) -> str:
        browser_id = secrets.token_urlsafe(ID_BYTES)
        return f"{browser_id}.{self._signature(browser_id)}"

    def check(self, token) -> str | None:
        """The id in a token this server issued; None for anything else (whatever a browser
        kept: not a string, not ASCII, not signed here)."""
        if not isinstance(token, str) or not token.isascii() or token.count(".") != 1:
            return None
        browser_id, signature = token.split(".")
        return browser_id if hmac.compare_digest(signature, self._signature(browser_id)) else None

    @property
    def storage_secret(self) -> str:
        """The key gr.BrowserState encrypts its localStorage value with: the same across restarts
        (Gradio's default, drawn per launch, makes what a browser kept unreadable after one)."""
        return hmac.new(self._secret, b"browser-state", hashlib.sha256).hexdigest()


def user_key(*, login: str | None = None, hf_user: str | None = None, browser_id: str | None = None) -> str | None:
    """The store's key for the strongest identity given (None: none)."""
    if login:
        return f"login:{login}"
    if hf_user:
        return f"hf:{hf_user}"
    if browser_id:
        return f"browser:{browser_id}"
    return None
