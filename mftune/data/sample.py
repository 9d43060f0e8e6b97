"""Bundled sample data for the embedded demo: small alpaca-format tasks a tiny model can learn.

`python -m mftune.data.sample --output mftune/data/sample_alpaca.json` regenerates the committed
file byte for byte (fixed seed, fixed tables). Every answer is a short deterministic function of
the prompt, so the loss of a 2-layer model falls visibly within a few hundred CPU steps:

  reverse words, uppercase, capital of a country (fixed table), add two small numbers,
  sort letters, repeat a word three times, opposite of a word (fixed table).

`write_tokenizer_corpus` writes the text a demo tokenizer is trained on: every record as the
exact Vicuna-templated text the preprocessor tokenises, so frequent template words become
single pieces. With `train_sentencepiece(corpus, prefix, 1000)` the longest record is 97 tokens
(<s> ... </s>), i.e. every record fits seq_length 96 without truncation; the mean is ~89, most of
it the (masked) system and alpaca prompt.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from mftune.data.conversation import alpaca_prompt, vicuna_prompt
from mftune.data.tokenizer import train_sentencepiece

SAMPLE_ALPACA_PATH = str(Path(__file__).with_name("sample_alpaca.json"))
DEMO_VOCAB_SIZE = 1000  # longest templated record: 97 tokens = seq_length 96 + 1
DEFAULT_NUM_RECORDS = 2000
DEFAULT_SEED = 1234

WORDS = ("cat", "dog", "sun", "moon", "red", "blue", "green", "tree", "fish", "bird", "book", "star",
         "rain", "snow", "milk", "bread", "apple", "river", "stone", "cloud", "house", "light", "water",
         "fire", "wind", "road", "ship", "door", "king", "queen", "cake", "lamp", "hill", "sand", "leaf",
         "rose", "gold", "salt", "bell", "boat")

CAPITALS = (("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"),
            ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Russia", "Moscow"),
            ("China", "Beijing"), ("India", "New Delhi"), ("Chile", "Santiago"), ("Cuba", "Havana"),
            ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"),
            ("Austria", "Vienna"), ("Finland", "Helsinki"), ("Mexico", "Mexico City"), ("Thailand", "Bangkok"),
            ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
            ("Australia", "Canberra"), ("Denmark", "Copenhagen"))

OPPOSITES = (("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new"),
             ("day", "night"), ("open", "closed"), ("happy", "sad"), ("light", "dark"), ("early", "late"),
             ("full", "empty"), ("hard", "soft"), ("high", "low"), ("left", "right"), ("wet", "dry"),
             ("rich", "poor"), ("strong", "weak"), ("long", "short"), ("near", "far"), ("first", "last"))

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _reverse(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(3, 4))
    return _rec("Reverse the following words.", " ".join(words), " ".join(reversed(words)))


def _uppercase(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(2, 3))
    return _rec("Convert to uppercase.", " ".join(words), " ".join(words).upper())


def _capital(rng: random.Random) -> dict:
    country, city = rng.choice(CAPITALS)
    return _rec(f"What is the capital of {country}?", "", f"The capital of {country} is {city}.")


def _add(rng: random.Random) -> dict:
    a, b = rng.randint(0, 50), rng.randint(0, 49)
    return _rec("Add these numbers.", f"{a} and {b}", str(a + b))


def _sort_letters(rng: random.Random) -> dict:
    letters = rng.sample(LETTERS, rng.randint(3, 5))
    return _rec("Sort these letters.", " ".join(letters), " ".join(sorted(letters)))


def _repeat(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    return _rec("Repeat the word three times.", word, " ".join([word] * 3))


def _opposite(rng: random.Random) -> dict:
    a, b = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        a, b = b, a
    return _rec(f"What is the opposite of {a}?", "", f"The opposite of {a} is {b}.")


TASKS = (_reverse, _uppercase, _capital, _add, _sort_letters, _repeat, _opposite)


def _rec(instruction: str, input: str, output: str) -> dict:  # noqa: A002
    return {"instruction": instruction, "input": input, "output": output}


def generate_records(num_records: int = DEFAULT_NUM_RECORDS, seed: int = DEFAULT_SEED) -> list[dict]:
    """`num_records` alpaca records; each picks its task and content from one `random.Random(seed)`."""
    rng = random.Random(seed)
    return [rng.choice(TASKS)(rng) for _ in range(num_records)]


def dumps_records(records: list[dict]) -> str:
    """A JSON list with one record per line (compact and diff-friendly)."""
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    return "[\n" + body + "\n]\n"


def load_sample_records(path: str = SAMPLE_ALPACA_PATH) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def tokenizer_corpus_texts(records: list[dict]) -> list[str]:
    """Each record as the Vicuna-templated text the preprocessor tokenises (without "</s>")."""
    return [vicuna_prompt(alpaca_prompt(r["instruction"], r.get("input", "")), r["output"]).removesuffix("</s>")
            for r in records]


def write_tokenizer_corpus(output_path: str, records: list[dict] | None = None) -> str:
    """Write the tokenizer training text for `records` (default: the bundled sample) to `output_path`,
    one line per text line; return the path. Feed it to `train_sentencepiece`."""
    records = load_sample_records() if records is None else records
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as f:
        for text in tokenizer_corpus_texts(records):
            for line in text.split("\n"):
                if line.strip():
                    f.write(line + "\n")
    return output_path


def train_sample_tokenizer(model_prefix: str, vocab_size: int = DEMO_VOCAB_SIZE,
                           records: list[dict] | None = None) -> str:
    """Train the demo tokenizer on the templated sample records; return `<model_prefix>.model`.

    Train on the templated text (not on the bare alpaca fields): the Vicuna system prompt is in
    every record, and only if its words are single pieces does a record fit seq_length 96.
    """
    corpus = str(model_prefix) + ".corpus.txt"
    write_tokenizer_corpus(corpus, records)
    try:
        return train_sentencepiece(corpus, model_prefix, vocab_size)
    finally:
        os.remove(corpus)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the bundled alpaca-format sample data.")
    p.add_argument("--output", default=SAMPLE_ALPACA_PATH, help="output JSON path")
    p.add_argument("--num_records", type=int, default=DEFAULT_NUM_RECORDS)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = p.parse_args(argv)
    records = generate_records(args.num_records, args.seed)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(dumps_records(records))
    print(f"Wrote {len(records)} records to {args.output}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
