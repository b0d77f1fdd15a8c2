"""Who may be learned from: the consent and deletion rules, written once for curation and the volume trigger.

A user's data is excluded when they asked for deletion (ever, even if they wrote more afterwards), or when their
latest consent action is a revocation; an event whose own ``consent`` flag is false is excluded too. Both
``pipelines.curate`` and ``pipelines.triggers`` build their SQL from these fragments, so "usable" means the same
thing to the trigger that counts ratings and to the curation that uses them.
"""

from __future__ import annotations


def deleted_users(actions: str = "user_actions") -> str:
    """SELECT of every user_id that asked for deletion, from the table or view named ``actions``."""
    return f"SELECT DISTINCT user_id FROM {actions} WHERE action = 'delete_request'"


def revoked_users(actions: str = "user_actions") -> str:
    """SELECT of every user_id whose latest consent action is a revocation."""
    return f"""SELECT user_id FROM (
        SELECT user_id, action, row_number() OVER (PARTITION BY user_id ORDER BY ts DESC, event_id DESC) AS rn
        FROM {actions} WHERE action IN ('consent_granted', 'consent_revoked'))
        WHERE rn = 1 AND action = 'consent_revoked'"""


def allowed(alias: str = "", actions: str = "user_actions") -> str:
    """A WHERE condition: the row (``alias.`` prefix optional) may be used for training."""
    p = f"{alias}." if alias else ""
    return (
        f"coalesce({p}consent, false) AND {p}user_id NOT IN ({deleted_users(actions)})"
        f" AND {p}user_id NOT IN ({revoked_users(actions)})"
    )
