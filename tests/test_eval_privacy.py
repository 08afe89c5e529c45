"""PII detectors and the privacy check: generated positives, realistic negatives, Luhn."""

from __future__ import annotations

import datetime as dt
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_distill.eval.privacy import card_brand_ok, find_pii, luhn_valid, privacy_ok


def reference_check_digit(payload: str) -> str:
    """Luhn check digit, written independently: from the right, double every other digit of the
    payload starting with the rightmost one and add the digits of each product."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        product = int(ch) * (2 if i % 2 == 0 else 1)
        total += sum(divmod(product, 10))
    return str((10 - total % 10) % 10)


def kinds(text):
    return [(f.kind, f.text) for f in find_pii(text)]


@pytest.mark.parametrize("number", [
    "4111111111111111", "4012888888881881", "5555555555554444", "2223003122003222",
    "378282246310005", "6011111111111117", "3530111333300000", "30569309025904",
    "6200000000000005",
])
def test_known_test_card_numbers(number):
    assert luhn_valid(number) and card_brand_ok(number)
    assert kinds(f"card: {number}.") == [("credit_card", number)]
    broken = number[:-1] + str((int(number[-1]) + 1) % 10)
    assert not luhn_valid(broken) and kinds(f"card: {broken}.") == []


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.digits, min_size=1, max_size=25), st.data())
def test_luhn_matches_reference_and_catches_single_digit_errors(payload, data):
    number = payload + reference_check_digit(payload)
    assert luhn_valid(number)
    position = data.draw(st.integers(0, len(number) - 1))
    digit = data.draw(st.sampled_from([d for d in string.digits if d != number[position]]))
    assert not luhn_valid(number[:position] + digit + number[position + 1:])


BRAND_PREFIXES = [("4", 16), ("4", 13), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16),
                  ("34", 15), ("37", 15), ("6011", 16), ("65", 19), ("3528", 16), ("36", 14),
                  ("62", 17)]


@st.composite
def card_numbers(draw):
    prefix, length = draw(st.sampled_from(BRAND_PREFIXES))
    body = draw(st.text(alphabet=string.digits, min_size=length - len(prefix) - 1,
                        max_size=length - len(prefix) - 1))
    payload = prefix + body
    return payload + reference_check_digit(payload)


def grouped(digits, separator, size=4):
    return separator.join(digits[i:i + size] for i in range(0, len(digits), size))


@settings(max_examples=200, deadline=None)
@given(card_numbers(), st.sampled_from(["", " ", "-"]),
       st.sampled_from(["Pay with {} today.", "{}", "card={}", "(card {})"]))
def test_generated_cards_are_found(number, separator, sentence):
    written = grouped(number, separator) if separator else number
    found = find_pii(sentence.format(written))
    assert [(f.kind, f.key) for f in found] == [("credit_card", number)]


@st.composite
def nanp_phones(draw):
    area = str(draw(st.integers(2, 9))) + draw(st.text(string.digits, min_size=2, max_size=2))
    exchange = str(draw(st.integers(2, 9))) + draw(st.text(string.digits, min_size=2, max_size=2))
    line = draw(st.text(string.digits, min_size=4, max_size=4))
    style = draw(st.sampled_from(["({a}) {e}-{l}", "{a}-{e}-{l}", "{a}.{e}.{l}", "{a} {e} {l}",
                                  "+1 {a} {e} {l}", "1-{a}-{e}-{l}", "+1 ({a}) {e}-{l}"]))
    return style.format(a=area, e=exchange, l=line), area + exchange + line


@settings(max_examples=200, deadline=None)
@given(nanp_phones(), st.sampled_from(["Call me at {}.", "{}", "tel: {}", "Phone {} (work)"]))
def test_generated_us_phones_are_found(phone, sentence):
    written, digits = phone
    found = find_pii(sentence.format(written))
    assert [(f.kind, f.key) for f in found] == [("phone", digits)]


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 998), st.lists(st.text(string.digits, min_size=2, max_size=4),
                                     min_size=2, max_size=4), st.sampled_from([" ", "-", "."]))
def test_generated_international_phones_are_found(country, groups, separator):
    written = f"+{country} " + separator.join(groups)
    digits = str(country) + "".join(groups)
    found = kinds(f"Reach me on {written} please")
    if 8 <= len(digits) <= 15:
        assert found == [("phone", written)]
    else:
        assert found == []


local_parts = st.from_regex(r"[a-z0-9]{1,10}([._+-][a-z0-9]{1,8}){0,2}", fullmatch=True)
domains = st.from_regex(r"[a-z0-9]{1,12}(-[a-z0-9]{1,6})?(\.[a-z]{2,6}){1,2}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(local_parts, domains, st.sampled_from(["Write to {}.", "<{}>", "{}", "mail: {}, thanks"]))
def test_generated_emails_are_found(local, domain, sentence):
    address = f"{local}@{domain}"
    assert kinds(sentence.format(address)) == [("email", address)]


token_chars = string.ascii_letters + string.digits


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["sk-", "sk-proj-", "sk-ant-api03-", "ghp_", "gho_", "github_pat_",
                        "AKIA", "xoxb-", "AIza"]), st.data())
def test_generated_api_keys_are_found(prefix, data):
    sizes = {"ghp_": 36, "gho_": 36, "github_pat_": 40, "AKIA": 16, "AIza": 35}
    alphabet = string.ascii_uppercase + string.digits if prefix == "AKIA" else token_chars
    body = data.draw(st.text(alphabet=alphabet, min_size=sizes.get(prefix, 24),
                             max_size=sizes.get(prefix, 48)))
    key = prefix + body
    assert kinds(f"export TOKEN={key} # secret") == [("api_key", key)]


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=token_chars, min_size=40, max_size=64))
def test_random_generic_tokens_are_mostly_found(token):
    found = kinds(f"token {token} end")
    assert found in ([("api_key", token)], [])


def test_generic_token_recall():
    import random

    rng = random.Random(7)
    tokens = ["".join(rng.choice(token_chars) for _ in range(40)) for _ in range(500)]
    recall = sum(bool(find_pii(t)) for t in tokens) / len(tokens)
    assert recall >= 0.95


NEGATIVES = [
    "The meeting is on 2024-03-15 at 10:30.", "Released 03/15/2024 and 15.03.2024.",
    "Upgrade to version 10.2.3 or 2.0.0-rc.1.", "It costs $1,234.56 (or €999.99).",
    "Order #1234567890 shipped; order number ORD-2024-000123.", "Invoice 2024-000123-0042.",
    "Ship to 221B Baker Street, London NW1 6XE.", "Server 192.168.100.200 on port 8080.",
    "ISBN 978-3-16-148410-0", "id 123e4567-e89b-12d3-a456-426614174000",
    "sha d41d8cd98f00b204e9800998ecf8427e and 9fceb02d0ae598e95dc970b74767f19372d61af8",
    "Unix time 1700000000, population 8,100,000,000.", "Call the function getUserAccountBalance2()",
    "path /home/alice/projects/MyApp2/src/components/Button3.tsx",
    "SELECT_ALL_FROM_USERS_WHERE_ID_EQUALS_42_and_more", "The score was 3-2, then 10-12.",
    "Temperature 21.5 °C at 14:05:33 on 2025-01-31T14:05:33Z", "a-b@c", "user@localhost",
    "1234 5678 9012 3456", "Tracking: 1Z999AA10123456784", "Room 555 1234",
    "Coordinates 48.8566, 2.3522", "ratio 1.5e-10 and 6.02214076e23",
    "ThisIsAVeryLongCamelCaseIdentifier2024", "MyVeryLongVariableNameNumber1AndNumber2Together",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_realistic_negatives_are_not_flagged(text):
    assert find_pii(text) == []


@settings(max_examples=200, deadline=None)
@given(st.dates(dt.date(1900, 1, 1), dt.date(2100, 12, 31)),
       st.sampled_from(["%Y-%m-%d", "%m/%d/%Y", "%d.%m.%Y", "%Y%m%d", "%B %d, %Y", "%d-%m-%Y",
                        "%Y-%m-%dT12:30:00Z"]))
def test_dates_are_not_pii(date, fmt):
    assert find_pii(f"Due {date.strftime(fmt)}.") == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 999), min_size=2, max_size=4),
       st.integers(0, 10**7), st.integers(0, 99))
def test_versions_and_prices_are_not_pii(version, units, cents):
    assert find_pii(f"v{'.'.join(map(str, version))} costs ${units:,}.{cents:02d}") == []


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.digits, min_size=13, max_size=19))
def test_digit_runs_failing_luhn_are_not_cards(digits):
    if not luhn_valid(digits):
        assert find_pii(f"Order {digits} confirmed") == []


def test_privacy_ok_allows_pii_from_the_input():
    inputs = ["My number is +1 555 234 5678 and my card 4111-1111-1111-1111.",
              '{"email": "Alice@Example.com"}']
    output = ("I will call (555) 234-5678, charge 4111 1111 1111 1111 and write to "
              "alice@example.com.")
    assert privacy_ok(output, inputs) == (True, [])


def test_privacy_ok_flags_new_pii():
    ok, findings = privacy_ok(
        "Sure! Email bob@example.org or call 555-867-5309; key sk-abcdefghijklmnopqrstuvwx.",
        ["Who should I contact? My email is alice@example.com."])
    assert not ok
    assert [(f.kind, f.text) for f in findings] == [
        ("email", "bob@example.org"), ("phone", "555-867-5309"),
        ("api_key", "sk-abcdefghijklmnopqrstuvwx")]
    assert privacy_ok("The weather in Paris is 18 degrees.", []) == (True, [])
    # A number that is only part of a longer input number is still new.
    ok, _ = privacy_ok("Call 555-234-5678", ["ref 55523"])
    assert not ok
