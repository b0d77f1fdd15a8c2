"""Who may do what: the operator check shared by every admin surface (releases, dashboard, detail pages).

An operator presents ``Authorization: Bearer <FLYWHEEL_ADMIN_TOKEN>``. Without a configured token every
operator action is refused: there is no default value to guess.
"""

from __future__ import annotations

import hmac

from feedback.settings import Settings


def is_admin(settings: Settings, presented: str | None) -> bool:
    """True when ``presented`` (a bare token or an ``Authorization`` header value) is the admin token."""
    if settings.admin_token is None or not presented:
        return False
    token = presented.removeprefix("Bearer ").strip()
    expected = settings.admin_token.get_secret_value()
    return bool(expected) and hmac.compare_digest(token.encode(), expected.encode())
