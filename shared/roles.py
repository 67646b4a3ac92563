"""Who may do what: the permissions the edge checks on every route, and the default roles.

Roles are data (the synced ``roles`` table: a manager or the owner edits them); these are the
roles a new site starts with. A permission names one thing a person may do at the till, in
restaurant words. ``APPROVABLE`` are the permissions a manager's PIN can lend, for one
action, to someone who lacks them (a void after send, a discount).
"""

from __future__ import annotations

from enum import StrEnum


class Permission(StrEnum):
    """One thing a person may do."""

    ORDER_OPEN = "order.open"
    ORDER_EDIT = "order.edit"  # header: table, covers, notes; add lines; fire
    ORDER_VOID_LINE = "order.void_line"  # before the line was sent to the kitchen
    ORDER_VOID_SENT = "order.void_sent"  # after it was sent: manager approval
    ORDER_DISCOUNT = "order.discount"
    ORDER_TRANSFER = "order.transfer"  # move to another table, move lines between orders
    ORDER_CLOSE = "order.close"
    ORDER_VIEW = "order.view"
    MENU_VIEW = "menu.view"
    MENU_EDIT = "menu.edit"
    MENU_86 = "menu.86"  # mark an item (un)available
    KITCHEN_BUMP = "kitchen.bump"  # bump and recall tickets
    STAFF_MANAGE = "staff.manage"  # employees, roles, lockouts
    DEVICE_MANAGE = "device.manage"  # pairing codes, revoking devices
    AUDIT_VIEW = "audit.view"
    APPROVE = "approve"  # lend an approvable permission with one's PIN
    PAYMENT_TAKE = "payment.take"  # take payments on a check
    PAYMENT_REFUND = "payment.refund"  # refund up to the site's approval threshold
    PAYMENT_REFUND_LARGE = "payment.refund_large"  # above it: manager approval
    TILL_MANAGE = "till.manage"  # open and close drawers, pay in and out
    REPORT_VIEW = "report.view"  # the day's takings, fees and tips


APPROVABLE: frozenset[Permission] = frozenset(
    {Permission.ORDER_VOID_SENT, Permission.ORDER_DISCOUNT, Permission.PAYMENT_REFUND_LARGE}
)

_SERVER = frozenset(
    {
        Permission.ORDER_OPEN,
        Permission.ORDER_EDIT,
        Permission.ORDER_VOID_LINE,
        Permission.ORDER_TRANSFER,
        Permission.ORDER_CLOSE,
        Permission.ORDER_VIEW,
        Permission.MENU_VIEW,
        Permission.PAYMENT_TAKE,
        Permission.PAYMENT_REFUND,
    }
)

#: role id -> (display name, permissions) for a new site
DEFAULT_ROLES: dict[str, tuple[str, frozenset[Permission]]] = {
    "owner": ("Owner", frozenset(Permission)),
    "manager": ("Manager", frozenset(Permission)),
    "server": ("Server", _SERVER),
    "bartender": (
        "Bartender",
        _SERVER | {Permission.MENU_86, Permission.KITCHEN_BUMP, Permission.TILL_MANAGE},
    ),
    "kitchen": (
        "Kitchen",
        frozenset(
            {
                Permission.KITCHEN_BUMP,
                Permission.MENU_86,
                Permission.MENU_VIEW,
                Permission.ORDER_VIEW,
            }
        ),
    ),
}


def parse_permissions(names: list[str] | tuple[str, ...]) -> frozenset[Permission]:
    """Permissions from their names; an unknown name raises ValueError."""
    return frozenset(Permission(name) for name in names)
