"""Make the embedded demo set `pairs.parquet`: short factual and arithmetic questions with a checkable preference.

chosen = the correct, concise answer; rejected = a wrong answer, an evasive ramble, or a wrong ramble. A known
fraction of pairs (20% by default) has its labels swapped and is marked `flipped = true`, so a run can show how
well the implicit reward margin finds them. Built from templates with a seeded RNG: no network, no model.

Run from anywhere: `python -m sera_cli.demo.make_demo_data` (rewrites `pairs.parquet` beside this file).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sera_cli.data.hashing import row_id

SYSTEM = "Answer in one short sentence."
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Greece": "Athens", "Turkey": "Ankara", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin",
    "Australia": "Canberra", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Chile": "Santiago",
    "Cuba": "Havana", "Belgium": "Brussels", "Denmark": "Copenhagen", "Hungary": "Budapest",
    "Nigeria": "Abuja", "Morocco": "Rabat", "Indonesia": "Jakarta", "South Korea": "Seoul",
    "Iran": "Tehran", "Colombia": "Bogota", "Switzerland": "Bern", "Netherlands": "Amsterdam",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
    "open": "closed", "early": "late", "wet": "dry", "old": "young", "full": "empty", "hard": "soft",
    "loud": "quiet", "rich": "poor", "strong": "weak", "tall": "short", "thick": "thin", "clean": "dirty",
}
COLOURS = {
    "the sky on a clear day": "blue", "fresh grass": "green", "snow": "white", "a ripe banana": "yellow",
    "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow", "milk": "white",
    "a crow": "black", "a strawberry": "red", "a lime": "green",
}
LEGS = {"dog": 4, "cat": 4, "spider": 8, "bird": 2, "ant": 6, "horse": 4, "chicken": 2, "bee": 6,
        "cow": 4, "octopus": 8, "duck": 2, "beetle": 6}
SYMBOLS = {"oxygen": "O", "hydrogen": "H", "carbon": "C", "nitrogen": "N", "gold": "Au", "silver": "Ag",
           "iron": "Fe", "sodium": "Na", "helium": "He", "copper": "Cu", "lead": "Pb", "calcium": "Ca"}
PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
           "woman": "women", "goose": "geese", "person": "people", "leaf": "leaves", "knife": "knives",
           "cactus": "cacti", "box": "boxes", "city": "cities", "wolf": "wolves"}
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
RAMBLES = [
    "Hmm, that is a really interesting question, and people think about it in many different ways. "
    "I would rather not commit to one answer here, but you could look it up somewhere reliable.",
    "Well, there are many factors to consider, and honestly it depends on how you look at it. "
    "It is hard to say for sure without more context, so I will leave that open.",
    "Great question! Questions like this have puzzled many people over the years. "
    "Let us think about it together step by step, although the answer may not be what you expect.",
]


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    wrong = value + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    return f"What is {a} {word} {b}?", f"{a} {word} {b} is {value}.", f"{a} {word} {b} is {wrong}."


def _lookup(rng: random.Random, table: dict[str, str], asks: list[str], answer: str) -> tuple[str, str, str]:
    """A question about one key of `table`: chosen gives its value, rejected another key's value."""
    key = rng.choice(sorted(table))
    other = rng.choice([v for k, v in sorted(table.items()) if k != key])
    return rng.choice(asks).format(key), answer.format(key, table[key]), answer.format(key, other)


def _capital(rng: random.Random) -> tuple[str, str, str]:
    return _lookup(rng, CAPITALS, ["What is the capital of {}?", "Which city is the capital of {}?",
                                   "Name the capital of {}."], "The capital of {} is {}.")


def _opposite(rng: random.Random) -> tuple[str, str, str]:
    return _lookup(rng, OPPOSITES, ["What is the opposite of '{}'?", "Give the opposite of the word '{}'."],
                   "The opposite of '{}' is '{}'.")


def _colour(rng: random.Random) -> tuple[str, str, str]:
    thing = rng.choice(sorted(COLOURS))
    other = rng.choice(sorted({c for c in COLOURS.values() if c != COLOURS[thing]}))
    ask = rng.choice(["What colour is {}?", "Tell me the colour of {}."])
    return (ask.format(thing), f"{thing[0].upper() + thing[1:]} is {COLOURS[thing]}.",
            f"{thing[0].upper() + thing[1:]} is {other}.")


def _legs(rng: random.Random) -> tuple[str, str, str]:
    animal = rng.choice(sorted(LEGS))
    wrong = rng.choice([n for n in (2, 4, 6, 8, 10) if n != LEGS[animal]])
    ask = rng.choice(["How many legs does a {} have?", "Count the legs of a {}."])
    return (ask.format(animal), f"A {animal} has {LEGS[animal]} legs.",
            f"A {animal} has {wrong} legs.")


def _day(rng: random.Random) -> tuple[str, str, str]:
    i = rng.randrange(7)
    wrong = DAYS[(i + rng.choice([2, 3, 4, 5])) % 7]
    ask = rng.choice(["Which day comes after {}?", "What is the day after {}?"])
    return (ask.format(DAYS[i]), f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}.",
            f"{wrong} comes after {DAYS[i]}.")


def _symbol(rng: random.Random) -> tuple[str, str, str]:
    return _lookup(rng, SYMBOLS, ["What is the chemical symbol for {}?",
                                  "Which symbol stands for {} in chemistry?"], "The symbol for {} is {}.")


def _plural(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(sorted(PLURALS))
    wrong = word + "s" if not word.endswith(("s", "x")) else word + "es"
    if wrong == PLURALS[word]:
        wrong = word + "ies"
    ask = rng.choice(["What is the plural of '{}'?", "Give the plural form of '{}'."])
    return ask.format(word), f"The plural of '{word}' is '{PLURALS[word]}'.", f"The plural of '{word}' is '{wrong}'."


def _month(rng: random.Random) -> tuple[str, str, str]:
    i = rng.randrange(12)
    wrong = MONTHS[(i + rng.choice([2, 3, 5, 7])) % 12]
    ask = rng.choice(["Which month comes after {}?", "What month follows {}?"])
    return ask.format(MONTHS[i]), f"{MONTHS[(i + 1) % 12]} comes after {MONTHS[i]}.", f"{wrong} comes after {MONTHS[i]}."


TEMPLATES = {"arithmetic": _arithmetic, "capital": _capital, "opposite": _opposite, "colour": _colour,
             "legs": _legs, "day": _day, "symbol": _symbol, "plural": _plural, "month": _month}
WEIGHTS = {"arithmetic": 3, "capital": 3, "opposite": 1, "colour": 1, "legs": 1, "day": 1, "symbol": 1,
           "plural": 1, "month": 1}


def _rejected(rng: random.Random, wrong: str) -> str:
    """A wrong concise answer (half), an evasive ramble (a quarter) or a wrong answer padded with a ramble."""
    u = rng.random()
    if u < 0.5:
        return wrong
    ramble = rng.choice(RAMBLES)
    return ramble if u < 0.75 else f"{ramble} Anyway, {wrong[0].lower()}{wrong[1:]}"


def make_pairs(rows: int = 240, flip: float = 0.2, seed: int = 0) -> pa.Table:
    """`rows` distinct pairs; exactly round(flip * rows) of them, chosen at random, have swapped labels."""
    rng = random.Random(seed)
    names = sorted(TEMPLATES)
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < rows:
        kind = rng.choices(names, weights=[WEIGHTS[n] for n in names])[0]
        question, right, wrong = TEMPLATES[kind](rng)
        if question in seen:
            continue
        seen.add(question)
        out.append({"category": kind, "question": question, "chosen": right, "rejected": _rejected(rng, wrong)})
    flipped = set(rng.sample(range(rows), round(flip * rows)))
    table: dict[str, list] = {"id": [], "prompt": [], "chosen": [], "rejected": [], "flipped": [], "category": []}
    for i, r in enumerate(out):
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["question"]}]
        chosen, rejected = (r["rejected"], r["chosen"]) if i in flipped else (r["chosen"], r["rejected"])
        table["prompt"].append(prompt)
        table["chosen"].append([{"role": "assistant", "content": chosen}])
        table["rejected"].append([{"role": "assistant", "content": rejected}])
        table["id"].append(row_id(prompt, table["chosen"][-1], table["rejected"][-1]))
        table["flipped"].append(i in flipped)
        table["category"].append(r["category"])
    return pa.table(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--flip", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(Path(__file__).with_name("pairs.parquet")))
    args = parser.parse_args()
    table = make_pairs(args.rows, args.flip, args.seed)
    pq.write_table(table, args.output, compression="zstd")
    print(f"wrote {table.num_rows} pairs ({sum(table.column('flipped').to_pylist())} flipped) to {args.output}")


if __name__ == "__main__":
    main()
