"""Build the support-tickets warehouse: synthetic customer messages and the record each states.

Every ticket is written from seeded random templates (five channels, several phrasings per
part, varied products, order numbers like "A-10423", quantities in digits or words, cities,
dates and urgency words), and the record it states is kept beside it as the gold answer.

Table `tickets`:
    id       integer, 1..N
    channel  email, chat, web_form, phone or social (email is the hot group: the slice cap
             splits it)
    body     the customer's message, one line
    record   the gold: JSON text of {"order_id", "product", "quantity", "issue", "urgent"};
             a field the body does not state is null. Never allow-listed to agents.

Row i is drawn from its own generator seeded with (seed, i), so every build is identical and
a smaller build is the first rows of a larger one. Only the standard library is used.

    python examples/support_tickets/build_warehouse.py [--rows N] [--out PATH] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sqlite3
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent / "warehouse.db"
ISSUES = ("damaged", "late", "wrong_item", "refund")
FIELDS = ("order_id", "product", "quantity", "issue", "urgent")

CHANNELS = (("email", 0.35), ("chat", 0.25), ("web_form", 0.2), ("phone", 0.12),
            ("social", 0.08))
COLOURS = ("blue", "red", "black", "white", "green", "grey", "silver", "pink", "yellow", "navy",
           "orange", "purple")
NOUNS = ("kettle", "toaster", "desk lamp", "backpack", "blender", "coffee mug", "office chair",
         "rain jacket", "umbrella", "keyboard", "speaker", "pillow", "blanket", "teapot",
         "picture frame", "water bottle")
CITIES = ("London", "Leeds", "Glasgow", "Cardiff", "Bristol", "Manchester", "Dublin", "Belfast",
          "Leicester", "York", "Norwich", "Aberdeen")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
NAMES = ("Sam", "Priya", "Tom", "Aisha", "Ben", "Chloe", "Dev", "Emma", "Jack", "Mei", "Omar",
         "Rosa")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ORDER_ID = re.compile(r"\b[A-Z]-\d{5}\b")

# How often a ticket leaves a field out (its gold is then null).
OMIT = {"order_id": 0.15, "product": 0.1, "quantity": 0.25}
URGENT_SHARE = 0.3

# What a ticket says for each issue; {it}/{them}/{is} agree with the quantity, {other} is the
# product sent by mistake (with its article), {due} a date.
ISSUE_PHRASES = {
    "damaged": ("{It} arrived damaged.", "{It} came broken, the box was crushed.",
                "When I opened the box {it} {was} cracked.", "{It} {is} dented and scratched.",
                "{It} arrived smashed to pieces."),
    "late": ("{It} still {has} not arrived.", "{It} {was} due on {due} and never came.",
             "Tracking has not moved for a week, the delivery is late.",
             "I am still waiting for the delivery, it is well overdue.",
             "The parcel is late and nobody can tell me where it is."),
    "wrong_item": ("You sent me {other} instead.",
                   "The box contained {other}, not what I ordered.",
                   "I got the wrong item: {other}.",
                   "What arrived is {other}, which I never ordered."),
    "refund": ("I would like a refund.", "Please refund me, I no longer want {them}.",
               "I want my money back.", "I'd like to return {them} for a refund.",
               "Can you refund the full amount to my card?"),
}
# With no product named, a wrong item is not named either (the record could not tell the
# product ordered from the product received).
WRONG_ITEM_PLAIN = ("You sent me the wrong item.", "What arrived is not what I ordered.",
                    "The parcel had someone else's item in it.")
URGENT_PHRASES = ("This is urgent.", "URGENT, please reply today.", "I need this sorted asap.",
                  "Please treat this as urgent, it is a gift for {due}.",
                  "I need an answer immediately.", "Please deal with this right away.")
CALM_PHRASES = ("", "", "No rush, whenever you can.", "Thanks in advance.",
                "Thank you for your help.")
# Words that make a ticket urgent; none appears in a ticket whose gold says urgent: false.
URGENT_WORDS = re.compile(r"(?i)\b(urgent|asap|immediately|right away)\b")


def _quantity_text(rng: random.Random, q: int) -> str:
    return NUMBER_WORDS[q] if rng.random() < 0.35 else str(q)


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(MONTHS)}"


def _item(rng: random.Random, product: str | None, quantity: int | None) -> str:
    """The ordered goods as the ticket names them."""
    if product is None:
        if quantity is None:
            return rng.choice(("my order", "the parcel", "everything I ordered"))
        q, s = _quantity_text(rng, quantity), "s" if quantity > 1 else ""
        return rng.choice((f"my order of {q} item{s}", f"{q} item{s}",
                           f"an order of {q} item{s}"))
    if quantity is None:
        return rng.choice((f"the {product}", f"my {product}", f"the {product} from your sale"))
    q = _quantity_text(rng, quantity)
    return rng.choice((f"{q} x {product}", f"{q} of the {product}",
                       f"the {product} (quantity {q})", f"{product}, qty {q}"))


def _order_clause(rng: random.Random, item: str, order_id: str | None, city: str,
                  date: str) -> str:
    ref = ""
    if order_id is not None:
        ref = rng.choice((f"order {order_id}", f"order number {order_id}", f"ref {order_id}",
                          f"order #{order_id}"))
    if ref:
        return rng.choice((f"I ordered {item} on {date}, {ref}.",
                           f"Regarding {ref}: {item}, shipping to {city}.",
                           f"I bought {item} from your site on {date} ({ref}).",
                           f"{ref[0].upper()}{ref[1:]} was for {item}, sent to {city}."))
    missing = rng.choice(("", " I can't find my order number.",
                          " I don't have the order number to hand."))
    return rng.choice((f"I ordered {item} on {date}.{missing}",
                       f"I bought {item} from your site, shipping to {city}.{missing}",
                       f"This is about {item}, ordered on {date}.{missing}"))


def _issue_clause(rng: random.Random, issue: str, product: str | None, quantity: int | None,
                  due: str) -> str:
    if issue == "wrong_item" and product is None:
        return rng.choice(WRONG_ITEM_PLAIN)
    plural = quantity is not None and quantity > 1
    other = product
    while other == product:
        other = f"{rng.choice(COLOURS)} {rng.choice(NOUNS)}"
    other = f"{'an' if other[0] in 'aeiou' else 'a'} {other}"
    words = {"it": "they" if plural else "it", "them": "them" if plural else "it",
             "is": "are" if plural else "is",
             "was": "were" if plural else "was", "has": "have" if plural else "has"}
    words["It"] = words["it"].capitalize()
    return rng.choice(ISSUE_PHRASES[issue]).format(other=other, due=due, **words)


def make_ticket(row_id: int, seed: int = 0) -> dict:
    """One row of `tickets`: the body and the gold record it states."""
    rng = random.Random(f"support-tickets:{seed}:{row_id}")
    channel = rng.choices([c for c, _ in CHANNELS], weights=[w for _, w in CHANNELS])[0]
    order_id = f"{rng.choice('ABCDEK')}-{rng.randint(10000, 99999)}"
    product = f"{rng.choice(COLOURS)} {rng.choice(NOUNS)}"
    quantity = rng.choices([1, 2, 3, 4, 5, 6], weights=[50, 22, 12, 8, 5, 3])[0]
    issue = rng.choice(ISSUES)
    urgent = rng.random() < URGENT_SHARE
    order_id = None if rng.random() < OMIT["order_id"] else order_id
    product = None if rng.random() < OMIT["product"] else product
    quantity = None if rng.random() < OMIT["quantity"] else quantity
    city, date, due, name = rng.choice(CITIES), _date(rng), _date(rng), rng.choice(NAMES)

    order = _order_clause(rng, _item(rng, product, quantity), order_id, city, date)
    problem = _issue_clause(rng, issue, product, quantity, due)
    tone = rng.choice(URGENT_PHRASES if urgent else CALM_PHRASES).format(due=due)
    text = " ".join(p for p in (order, problem, tone) if p)

    if channel == "email":
        subject = rng.choice(("Problem with my order", "Order issue", "Complaint",
                              f"Order {order_id}" if order_id else "My recent order"))
        if urgent and rng.random() < 0.5:
            subject = f"URGENT: {subject}"
        body = f"Subject: {subject}. Hello, {text} Regards, {name}"
    elif channel == "chat":
        body = f"{rng.choice(('hi', 'hello', 'hey there'))}, {text[0].lower()}{text[1:]}"
    elif channel == "web_form":
        fields = [f"Order number: {order_id or 'not given'}."]
        if product is not None:
            fields.append(f"Product: {product}.")
        fields.append(f"Message: {text}")
        body = " ".join(fields)
    elif channel == "phone":
        body = f"Call note: customer {name} from {city} says: {text}"
    else:
        body = f"@ShopHelp {text}"

    record = {"order_id": order_id, "product": product, "quantity": quantity, "issue": issue,
              "urgent": urgent}
    return {"id": row_id, "channel": channel, "body": body, "record": json.dumps(record)}


def build(out: str | Path = DEFAULT_PATH, rows: int = 400, seed: int = 0) -> str:
    """Create (or replace) the `tickets` table in a SQLite file (a path, or a sqlite:/// URL).

    Returns the SQLAlchemy URL of the file."""
    path = Path(str(out).removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tickets = [make_ticket(i, seed) for i in range(1, rows + 1)]
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute("DROP TABLE IF EXISTS tickets")
            conn.execute("CREATE TABLE tickets (id INTEGER PRIMARY KEY, channel TEXT NOT NULL, "
                         "body TEXT NOT NULL, record TEXT NOT NULL)")
            conn.executemany("INSERT INTO tickets VALUES (:id, :channel, :body, :record)",
                             tickets)
    finally:
        conn.close()
    return f"sqlite:///{path.resolve()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400, help="tickets to write (default 400)")
    ap.add_argument("--out", default=str(DEFAULT_PATH), help="SQLite file to (re)write")
    ap.add_argument("--seed", type=int, default=0, help="seed of the templates (default 0)")
    args = ap.parse_args()
    if args.rows < 1:
        raise SystemExit("--rows must be at least 1")
    url = build(args.out, args.rows, args.seed)
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        channels = conn.execute("SELECT channel, count(*) FROM tickets GROUP BY channel "
                                "ORDER BY 2 DESC").fetchall()
    finally:
        conn.close()
    print(f"built {url}: {args.rows} tickets; channels "
          + ", ".join(f"{c}={n}" for c, n in channels))


if __name__ == "__main__":
    main()
