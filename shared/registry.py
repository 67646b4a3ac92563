"""The synced tables: who writes each one, how it merges, and each column's rule.

Adding a synced table is a few lines: declare a ``TableSpec`` below and add it to
``TABLES``. The edge and the cloud create its storage from this declaration, and the
sync engine validates and merges its changes by it.

Domain rules shipped here:

- order lines are add-only: every column but the void columns is set once, a void is its own
  change, and ``voided`` is sticky, so two tablets adding lines never lose one;
- an order's status only moves forward (``ORDER_STATUS_RANKS``);
- a check's discount is its five columns together (``DISCOUNT_COLUMNS``): every write sets
  all of them, so concurrent discounts merge to one writer's whole discount;
- a kitchen ticket's ``voided`` is sticky; the items struck off it are rebuilt from the
  lines' own sticky voids whenever it is written or read (``edge.ticket_voids``);
- stock counts are counters: changes carry deltas and concurrent deltas add up;
- payments, refunds and tills are ``manual`` whatever the configuration says
  (``FIXED_STRATEGIES``): concurrent changes to money go to a person, never to a rule.
"""

from __future__ import annotations

from sync_protocol.schema import (
    Author,
    Column,
    ColumnType,
    Merge,
    Registry,
    Strategy,
    TableSpec,
)

from .orders import ORDER_STATUS_RANKS

TEXT, INT, BOOL = ColumnType.TEXT, ColumnType.INT, ColumnType.BOOL

#: an order's discount: a percentage or an amount (one of them), its reason, who gave it and
#: who approved it, written together
DISCOUNT_COLUMNS = (
    "discount_percent",
    "discount_pence",
    "discount_reason",
    "discounted_by",
    "discount_approved_by",
)

MENU_CATEGORIES = TableSpec(
    "menu_categories",
    (
        Column("name", TEXT, doc="shown on the tablets"),
        Column("position", INT, default=0, doc="sort order on the tablets"),
        Column("active", BOOL, default=True),
    ),
    author=Author.BOTH,
    strategy=Strategy.SMART_MERGE,
    doc="Menu sections, authored in the cloud dashboard or by a manager at the edge.",
)

MENU_ITEMS = TableSpec(
    "menu_items",
    (
        Column("category_id", TEXT),
        Column("name", TEXT),
        Column("price_pence", INT, doc="price in integer minor units"),
        Column("currency", TEXT, default="GBP"),
        Column("station", TEXT, default="kitchen", doc="where its tickets go"),
        Column("available", BOOL, default=True, doc="false when the item is 86'd"),
        Column("modifier_group_ids", TEXT, doc="JSON list of the modifier groups offered"),
        Column("position", INT, default=0, doc="sort order within its category"),
    ),
    author=Author.BOTH,
    strategy=Strategy.SMART_MERGE,
    doc="What can be sold, at what price, and where it is prepared.",
)

MODIFIER_GROUPS = TableSpec(
    "modifier_groups",
    (
        Column("name", TEXT, doc="e.g. 'Cooking', 'Sides'"),
        Column("min_choices", INT, default=0, doc="choices a line must make (0: optional)"),
        Column("max_choices", INT, default=1, doc="choices a line may make at most"),
        Column("position", INT, default=0),
    ),
    author=Author.BOTH,
    strategy=Strategy.SMART_MERGE,
    doc="A choice offered with menu items (e.g. how a steak is cooked).",
)

MODIFIERS = TableSpec(
    "modifiers",
    (
        Column("group_id", TEXT),
        Column("name", TEXT),
        Column("price_pence", INT, default=0, doc="added to the line's unit price"),
        Column("available", BOOL, default=True),
        Column("position", INT, default=0),
    ),
    author=Author.BOTH,
    strategy=Strategy.SMART_MERGE,
    doc="One option of a modifier group.",
)

ORDERS = TableSpec(
    "orders",
    (
        Column("check_number", INT, Merge.IMMUTABLE, doc="unique per site per business day"),
        Column("business_day", TEXT, Merge.IMMUTABLE, doc="ISO date of the trading day"),
        Column("opened_at_ms", INT, Merge.IMMUTABLE),
        Column("currency", TEXT, Merge.IMMUTABLE, default="GBP"),
        Column("table_name", TEXT),
        Column("covers", INT),
        Column("server_id", TEXT),
        Column("opened_by", TEXT, Merge.IMMUTABLE, doc="employee who opened it"),
        Column("closed_at_ms", INT),
        Column("notes", TEXT),
        Column("status", TEXT, Merge.FORWARD, ranks=ORDER_STATUS_RANKS, default="open"),
        # The check's discount (DISCOUNT_COLUMNS, written together)
        Column("discount_percent", INT, doc="1-100 of the subtotal; null: see discount_pence"),
        Column("discount_pence", INT, doc="a fixed amount off, at most the subtotal"),
        Column("discount_reason", TEXT),
        Column("discounted_by", TEXT, doc="employee who gave the discount"),
        Column("discount_approved_by", TEXT, doc="manager who approved it, or the giver"),
    ),
    author=Author.BOTH,
    strategy=Strategy.SMART_MERGE,
    doc="Order headers; the status only moves forward.",
    together=(DISCOUNT_COLUMNS,),
)

ORDER_LINES = TableSpec(
    "order_lines",
    (
        Column("order_id", TEXT, Merge.IMMUTABLE),
        Column("item_id", TEXT, Merge.IMMUTABLE),
        Column("name", TEXT, Merge.IMMUTABLE),
        Column("quantity", INT, Merge.IMMUTABLE),
        Column("unit_price_pence", INT, Merge.IMMUTABLE),
        Column("modifiers", TEXT, Merge.IMMUTABLE, doc="JSON list chosen with the line"),
        Column("notes", TEXT, Merge.IMMUTABLE),
        Column("course", INT, Merge.IMMUTABLE),
        Column("seat", INT, Merge.IMMUTABLE),
        Column("added_by", TEXT, Merge.IMMUTABLE),
        Column("added_at_ms", INT, Merge.IMMUTABLE),
        Column("moved_from", TEXT, Merge.IMMUTABLE, doc="the line it replaces, when moved"),
        Column("fired", BOOL, Merge.STICKY, default=False, doc="sent to the kitchen"),
        Column("ticket_id", TEXT, doc="the kitchen ticket it went out on"),
        Column("voided", BOOL, Merge.STICKY, default=False),
        Column("void_reason", TEXT),
        Column("voided_by", TEXT),
        Column("void_approved_by", TEXT, doc="manager who approved a void after send"),
    ),
    author=Author.EDGE,
    strategy=Strategy.SMART_MERGE,
    add_only=True,
    doc="Lines of an order: added, then perhaps voided; never edited or deleted.",
)

STOCK_LEVELS = TableSpec(
    "stock_levels",
    (
        Column("on_hand", INT, Merge.COUNTER, doc="units in stock; changes carry deltas"),
        Column("par_level", INT),
        Column("unit", TEXT, default="each"),
    ),
    author=Author.BOTH,
    strategy=Strategy.SMART_MERGE,
    doc="Stock per menu item (the row id is the item id).",
)

TICKETS = TableSpec(
    "tickets",
    (
        Column("order_id", TEXT, Merge.IMMUTABLE),
        Column("check_number", INT, Merge.IMMUTABLE),
        Column("table_name", TEXT, Merge.IMMUTABLE),
        Column("station", TEXT, Merge.IMMUTABLE, doc="kitchen, bar, ..."),
        Column("course", INT, Merge.IMMUTABLE),
        Column("items", TEXT, Merge.IMMUTABLE, doc="JSON list of the lines as fired"),
        Column("fired_at_ms", INT, Merge.IMMUTABLE),
        Column("fired_by", TEXT, Merge.IMMUTABLE),
        Column("bumped", BOOL, default=False, doc="done; a recall sets it back"),
        Column("bumped_at_ms", INT),
        Column("voided", BOOL, Merge.STICKY, default=False, doc="every item on it was voided"),
        Column(
            "voided_line_ids",
            TEXT,
            doc="JSON list of the items (line ids) voided after firing; readers add each "
            "item whose line is voided, so a list lost to a concurrent write loses no void",
        ),
    ),
    author=Author.EDGE,
    strategy=Strategy.SMART_MERGE,
    doc="Kitchen tickets: the lines of one course for one station, as fired, and their voids.",
)

ROLES = TableSpec(
    "roles",
    (
        Column("name", TEXT),
        Column("permissions", TEXT, doc="JSON list of permission names"),
    ),
    author=Author.BOTH,
    strategy=Strategy.SMART_MERGE,
    doc="Roles and what they may do (the row id is the role's key, e.g. 'server').",
)

EMPLOYEES = TableSpec(
    "employees",
    (
        Column("name", TEXT),
        Column("role_id", TEXT),
        Column("pin_hash", TEXT, doc="argon2id hash of the PIN; the PIN itself is never kept"),
        Column("active", BOOL, default=True),
    ),
    author=Author.BOTH,
    strategy=Strategy.SMART_MERGE,
    doc="People who log in on the tablets with their PIN.",
)

AUDIT_LOG = TableSpec(
    "audit_log",
    (
        Column("position", INT, Merge.IMMUTABLE, doc="1, 2, ... in this edge's chain"),
        Column("at_ms", INT, Merge.IMMUTABLE),
        Column("employee_id", TEXT, Merge.IMMUTABLE),
        Column("device_id", TEXT, Merge.IMMUTABLE),
        Column("action", TEXT, Merge.IMMUTABLE, doc="the API operation, e.g. 'void_line'"),
        Column("detail", TEXT, Merge.IMMUTABLE, doc="JSON: what changed, before and after"),
        Column("prev_hash", TEXT, Merge.IMMUTABLE),
        Column("hash", TEXT, Merge.IMMUTABLE, doc="sha256 over prev_hash and this entry"),
    ),
    author=Author.EDGE,
    strategy=Strategy.SMART_MERGE,
    add_only=True,
    doc="Who did what on which device, before and after: a hash chain, add-only.",
)

PAYMENTS = TableSpec(
    "payments",
    (
        Column("order_id", TEXT, Merge.IMMUTABLE),
        Column("business_day", TEXT, Merge.IMMUTABLE, doc="the trading day it was taken on"),
        Column("tender", TEXT, Merge.IMMUTABLE, doc="bank, card, apple_pay or cash"),
        Column("amount_pence", INT, Merge.IMMUTABLE, doc="what it pays off the check"),
        Column("tip_pence", INT, Merge.IMMUTABLE, default=0),
        Column("tip_employee_id", TEXT, Merge.IMMUTABLE, doc="who the tip is for"),
        Column("surcharge_pence", INT, Merge.IMMUTABLE, default=0, doc="fees passed on"),
        Column("charged_pence", INT, Merge.IMMUTABLE, doc="amount + tip + surcharge"),
        Column("provider_fee_pence", INT, Merge.IMMUTABLE, default=0),
        Column("platform_fee_pence", INT, Merge.IMMUTABLE, default=0),
        Column("tendered_pence", INT, Merge.IMMUTABLE, doc="cash handed over"),
        Column("change_pence", INT, Merge.IMMUTABLE, default=0, doc="cash given back"),
        Column("till_id", TEXT, Merge.IMMUTABLE, doc="the cash drawer, for cash"),
        Column("taken_by", TEXT, Merge.IMMUTABLE),
        Column("created_at_ms", INT, Merge.IMMUTABLE),
        # The till's record, written by the edge only:
        Column("status", TEXT, doc="a shared.payment_states.PaymentState: what the till counts"),
        Column("completed_at_ms", INT),
        Column("failure_code", TEXT),
        # The provider's record, written by the cloud only (it holds the provider's keys):
        Column("provider_ref", TEXT, doc="the provider's id for it"),
        Column("provider_state", TEXT, doc="a PaymentState, as the provider last reported"),
        Column("action_url", TEXT, doc="the bank's pay page (the QR), or a 3-D Secure page"),
        Column("expires_at_ms", INT, doc="when the provider gives up on it"),
        Column("provider_failure", TEXT, doc="the provider's reason for a failure"),
    ),
    author=Author.BOTH,
    strategy=Strategy.MANUAL,
    doc="Payment attempts; the row id is the provider's idempotency key. The edge writes the "
    "till's columns and the cloud the provider's, so the two never race on one; a change to "
    "the same column on both sides is parked for a person. Never auto-merged.",
)

REFUNDS = TableSpec(
    "refunds",
    (
        Column("payment_id", TEXT, Merge.IMMUTABLE),
        Column("order_id", TEXT, Merge.IMMUTABLE),
        Column("business_day", TEXT, Merge.IMMUTABLE),
        Column("tender", TEXT, Merge.IMMUTABLE),
        Column("amount_pence", INT, Merge.IMMUTABLE),
        Column("reason", TEXT, Merge.IMMUTABLE),
        Column("requested_by", TEXT, Merge.IMMUTABLE),
        Column("approved_by", TEXT, Merge.IMMUTABLE, doc="the manager, above the threshold"),
        Column("till_id", TEXT, Merge.IMMUTABLE, doc="the drawer cash came out of"),
        Column("created_at_ms", INT, Merge.IMMUTABLE),
        Column("status", TEXT, doc="pending, succeeded or failed (the edge's record)"),
        Column("completed_at_ms", INT),
        Column("failure_code", TEXT),
        Column("provider_ref", TEXT, doc="the provider's id for it (written by the cloud)"),
        Column("provider_state", TEXT, doc="pending, succeeded or failed, per the provider"),
    ),
    author=Author.BOTH,
    strategy=Strategy.MANUAL,
    doc="Money given back against a payment; never more than it took. Never auto-merged.",
)

TILLS = TableSpec(
    "tills",
    (
        Column("name", TEXT, Merge.IMMUTABLE, doc="the drawer, e.g. 'Bar'"),
        Column("business_day", TEXT, Merge.IMMUTABLE),
        Column("float_pence", INT, Merge.IMMUTABLE, doc="cash it opened with"),
        Column("opened_by", TEXT, Merge.IMMUTABLE),
        Column("opened_at_ms", INT, Merge.IMMUTABLE),
        Column("closed_by", TEXT),
        Column("closed_at_ms", INT),
        Column("expected_pence", INT, doc="cash there should be, at the close"),
        Column("counted_pence", INT, doc="cash counted at the close"),
    ),
    author=Author.EDGE,
    strategy=Strategy.MANUAL,
    doc="A cash drawer's session, from its float to its count.",
)

TILL_MOVEMENTS = TableSpec(
    "till_movements",
    (
        Column("till_id", TEXT, Merge.IMMUTABLE),
        Column("kind", TEXT, Merge.IMMUTABLE, doc="paid_in or paid_out"),
        Column("amount_pence", INT, Merge.IMMUTABLE),
        Column("reason", TEXT, Merge.IMMUTABLE),
        Column("employee_id", TEXT, Merge.IMMUTABLE),
        Column("at_ms", INT, Merge.IMMUTABLE),
    ),
    author=Author.EDGE,
    strategy=Strategy.SMART_MERGE,
    add_only=True,
    doc="Cash put into or taken out of a drawer other than by a sale or a refund.",
)

SITE_SETTINGS = TableSpec(
    "site_settings",
    (Column("value", TEXT, doc="JSON: the owner's settings of one kind, e.g. 'payments'"),),
    author=Author.CLOUD,
    strategy=Strategy.SERVER_WINS,
    doc="A site's settings the owner changes from the cloud; the edge reads them live.",
)

#: tables whose strategy configuration may not change: money is never merged by a rule
FIXED_STRATEGIES: dict[str, Strategy] = {
    "payments": Strategy.MANUAL,
    "refunds": Strategy.MANUAL,
    "tills": Strategy.MANUAL,
}

TABLES: tuple[TableSpec, ...] = (
    MENU_CATEGORIES,
    MENU_ITEMS,
    MODIFIER_GROUPS,
    MODIFIERS,
    ORDERS,
    ORDER_LINES,
    STOCK_LEVELS,
    TICKETS,
    ROLES,
    EMPLOYEES,
    AUDIT_LOG,
    PAYMENTS,
    REFUNDS,
    TILLS,
    TILL_MOVEMENTS,
    SITE_SETTINGS,
)


def default_registry() -> Registry:
    """The registry of every synced table with its default strategy."""
    return Registry(TABLES)


def parse_strategies(text: str) -> dict[str, Strategy]:
    """Parse a ``"orders=manual, menu_items=server_wins"`` setting into ``{table: Strategy}``."""
    out: dict[str, Strategy] = {}
    known = {spec.name for spec in TABLES}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        table, sep, name = (part.strip() for part in item.partition("="))
        if not sep or not table or not name:
            raise ValueError(f"strategies: {item!r} is not table=strategy")
        if table not in known:
            raise ValueError(f"strategies: unknown table {table!r}")
        try:
            out[table] = Strategy(name)
        except ValueError:
            choices = ", ".join(s.value for s in Strategy)
            raise ValueError(
                f"strategies: unknown strategy {name!r} for {table} (one of {choices})"
            ) from None
        fixed = FIXED_STRATEGIES.get(table)
        if fixed is not None and out[table] is not fixed:
            raise ValueError(
                f"strategies: {table} is always {fixed.value}: money is never merged by a rule"
            )
    return out
