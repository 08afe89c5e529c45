"""Value pools and phrasings of the toy tool-calling task, split so the held-out test set uses
argument values (cities, dates, numbers, limits) and phrasings that training never sees.

``val`` draws from the training pools and phrasings (in-distribution); ``test`` from the
held-out ones. Every template is ``str.format`` text; the generator fills it.
"""

from __future__ import annotations

import datetime as dt

SYSTEM_PROMPT = ("You are a helpful assistant. Call a tool only when the user's request needs "
                 "one.")

TRAIN_CITIES = (
    "Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Amsterdam", "Vienna", "Prague",
    "Lisbon", "Dublin", "Oslo", "Stockholm", "Helsinki", "Copenhagen", "Warsaw", "Athens",
    "Istanbul", "Cairo", "Nairobi", "Lagos", "Mumbai", "Delhi", "Bangkok", "Singapore", "Seoul",
    "Beijing", "Shanghai", "Sydney", "Melbourne", "Auckland", "Toronto", "Vancouver", "Chicago",
    "New York", "Los Angeles", "Mexico City", "Buenos Aires", "São Paulo", "Zürich",
)
TEST_CITIES = (
    "Lima", "Bogotá", "Santiago", "Montréal", "Boston", "Seattle", "Denver", "Havana",
    "Reykjavik", "Edinburgh", "Munich", "Budapest", "Kyiv", "Marrakesh", "Cape Town", "Dubai",
    "Kathmandu", "Hanoi", "Manila", "Perth",
)

_YEAR = [dt.date(2025, 1, 1) + dt.timedelta(days=d) for d in range(365)]
TRAIN_DATES = tuple(d for d in _YEAR if d.day % 2 == 1)
TEST_DATES = tuple(d for d in _YEAR if d.day % 2 == 0)


def date_phrases(date: dt.date) -> tuple[str, ...]:
    """Ways a user writes a date; the gold argument is always ISO ``YYYY-MM-DD``."""
    month = date.strftime("%B")
    return (date.isoformat(), f"{month} {date.day}, {date.year}", f"{date.day} {month} {date.year}")


TRAIN_NUMBERS = tuple(range(2, 50)) + tuple(n + 0.5 for n in range(1, 21))
TEST_NUMBERS = tuple(range(50, 100)) + tuple(n + 0.25 for n in range(1, 21))
TRAIN_LIMITS = (1, 2, 3)
TEST_LIMITS = (4, 5)


def number_text(x: int | float) -> str:
    return str(x)


WEATHER = {
    "train": (
        "What's the weather in {city}?", "How is the weather in {city} right now?",
        "Weather for {city}, please.", "Is it cold in {city} today?",
        "Can you check the current weather in {city}?", "Tell me the weather in {city}.",
        "What's it like outside in {city}?", "I'm heading to {city}. What's the weather there?",
    ),
    "test": (
        "Could you look up the weather conditions in {city}?", "Current conditions in {city}?",
        "Do I need an umbrella in {city} today?", "Give me a weather report for {city}.",
    ),
}
# Appended to a weather request that names a unit ({unit}: Celsius or Fahrenheit).
UNIT_SUFFIX = {
    "train": (" Give it in {unit}.", " I prefer {unit}."),
    "test": (" Report it in {unit}, please.", " Use degrees {unit}."),
}
PARALLEL_WEATHER = {
    "train": (
        "What's the weather in {city} and {city2}?", "Compare the weather in {city} and {city2}.",
        "Weather in {city} and in {city2}, please.",
    ),
    "test": (
        "How are conditions in {city} versus {city2}?",
        "Check both {city} and {city2} for me: what's the weather?",
    ),
}
# {a} is always the first number mentioned: the gold call keeps the order the user gave.
ADD = {
    "train": ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
              "What's the sum of {a} and {b}?"),
    "test": ("Please total {a} and {b}.", "How much is {a} + {b}?",
             "I need the sum of {a} and {b}."),
}
MULTIPLY = {
    "train": ("What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}.",
              "What's the product of {a} and {b}?"),
    "test": ("How much is {a} multiplied by {b}?", "Calculate {a} x {b}.",
             "Give me {a} times {b}, please."),
}
CALENDAR = {
    "train": ("What's on my calendar on {date}?", "Do I have any events on {date}?",
              "List my events for {date}.", "Show my schedule for {date}.",
              "What meetings do I have on {date}?"),
    "test": ("Anything planned for {date}?", "Check my agenda on {date}.",
             "What does {date} look like on my calendar?"),
}
CALENDAR_LIMIT = {
    "train": ("Show at most {limit} events on {date}.", "List up to {limit} events for {date}."),
    "test": ("Only the first {limit} events on {date}, please.",
             "Give me no more than {limit} appointments on {date}."),
}
CONVERT = {
    "train": ("Convert {value} {from_unit} to {to_unit}.",
              "How many {to_unit} is {value} {from_unit}?",
              "What is {value} {from_unit} in {to_unit}?",
              "{value} {from_unit} in {to_unit}, please."),
    "test": ("Express {value} {from_unit} in {to_unit}.",
             "I have {value} {from_unit}; how much is that in {to_unit}?",
             "Change {value} {from_unit} into {to_unit}."),
}
UNIT_WORDS = {
    "kilometers": ("km", "kilometers", "kilometres"), "miles": ("miles", "mi"),
    "meters": ("meters", "metres", "m"), "feet": ("feet", "ft"),
    "kilograms": ("kg", "kilograms"), "pounds": ("pounds", "lbs"),
    "liters": ("liters", "litres", "L"), "gallons": ("gallons",),
    "celsius": ("degrees Celsius", "°C"), "fahrenheit": ("degrees Fahrenheit", "°F"),
}
CONVERSION_PAIRS = (
    ("kilometers", "miles"), ("meters", "feet"), ("kilograms", "pounds"), ("liters", "gallons"),
    ("celsius", "fahrenheit"),
)

# No-tool controls: fixed (question, answer) pairs, and templates over the split's own values
# that mention a city, a quantity or a date without asking for a tool (hard negatives).
CONTROLS = {
    "train": (
        ("Hi!", "Hello! How can I help you today?"),
        ("Good morning!", "Good morning! What can I do for you?"),
        ("Thanks for your help.", "You're welcome!"),
        ("Who are you?", "I am a helpful assistant with a few tools."),
        ("Tell me a joke.", "Why did the scarecrow win an award? He was outstanding in his field."),
        ("What can you do?", "I can check the weather, add and multiply numbers, list your "
         "calendar events and convert units."),
        ("How many days are in a week?", "There are seven days in a week."),
        ("What color is the sky on a clear day?", "It is blue."),
        ("Spell the word cat backwards.", "tac"),
    ),
    "test": (
        ("Hey there!", "Hi! What can I help you with?"),
        ("Thank you so much!", "Happy to help!"),
        ("What's your name?", "I'm your assistant."),
        ("How many hours are in a day?", "There are 24 hours in a day."),
        ("Say something nice.", "You are doing great today!"),
    ),
}
CAPITALS = {
    "train": (("France", "Paris"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Italy", "Rome"),
              ("Spain", "Madrid"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"),
              ("Australia", "Canberra"), ("India", "New Delhi"), ("China", "Beijing")),
    "test": (("Peru", "Lima"), ("Norway", "Oslo"), ("Portugal", "Lisbon"), ("Greece", "Athens"),
             ("Argentina", "Buenos Aires"), ("Thailand", "Bangkok"), ("Poland", "Warsaw")),
}
CAPITAL_QUESTIONS = {
    "train": ("What is the capital of {country}?", "Which city is the capital of {country}?"),
    "test": ("Name the capital city of {country}.", "{country}'s capital is which city?"),
}
CAPITAL_ANSWER = "The capital of {country} is {capital}."
# (template, answer) with {city}, {number} or {date} from the split's pools.
HARD_NEGATIVES = {
    "train": (
        ("I loved my trip to {city} last year.", "That sounds lovely!"),
        ("My sister lives in {city}.", "How nice! Do you visit her often?"),
        ("I'm reading a novel set in {city}.", "Sounds like a great read!"),
        ("I walked {number} km yesterday.", "Great job staying active!"),
        ("My birthday is on {date}.", "Happy early birthday!"),
        ("A friend from {city} is visiting on {date}.", "Have a great time together!"),
        ("I bought {number} apples at the market.", "Sounds like a healthy choice!"),
    ),
    "test": (
        ("{city} has wonderful museums, I hear.", "It does have a lot to offer."),
        ("We might move to {city} someday.", "That would be an exciting change!"),
        ("My suitcase weighs {number} kg.", "Thanks for letting me know."),
        ("The concert was on {date}.", "I hope you enjoyed it!"),
        ("My cousin flew to {city} on {date}.", "I hope the flight went smoothly!"),
    ),
}


def pools(split: str) -> dict[str, tuple]:
    """The argument values a split may use."""
    held_out = split == "test"
    return {
        "cities": TEST_CITIES if held_out else TRAIN_CITIES,
        "dates": TEST_DATES if held_out else TRAIN_DATES,
        "numbers": TEST_NUMBERS if held_out else TRAIN_NUMBERS,
        "limits": TEST_LIMITS if held_out else TRAIN_LIMITS,
    }


def phrasing_split(split: str) -> str:
    return "test" if split == "test" else "train"
