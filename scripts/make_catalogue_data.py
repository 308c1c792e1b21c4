"""Generate examples/data/catalogue.jsonl: the held-out task of examples/smollm2.yaml.

    python scripts/make_catalogue_data.py            # writes examples/data/catalogue.jsonl

Each row describes a person in one of several sentence shapes ("Maria Lopez was born in Lisbon
in 1987.") and asks for the catalogue entry; the answer is always "Lopez, Maria (Lisbon, 1987)".
The instruction names the task but not the format, so a base model cannot know it: it has to be
learned from the training rows. Short answers, checked by exact match. Deterministic (fixed
seed, fixed word lists); the data is ours, released under CC0-1.0 (examples/data/LICENSE).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def _words(text: str) -> list[str]:
    return text.split()


FIRST = _words(
    "Maria Ana Sofia Lucia Elena Clara Irene Nora Alma Rosa Ines Lena Mira Hana Yuki Aiko "
    "Priya Asha Leila Zara Amara Nia Freya Ingrid Astrid Greta Olga Vera Daria Katya "
    "John Peter Paul Mark Luca Marco Diego Pablo Tomas Hugo Felix Oscar Ivan Pavel Omar Karim "
    "Ravi Arjun Kenji Hiro Jin Wei Tariq Amir Kofi Kwame Lars Nils Sven Erik Otto Emil"
)
LAST = _words(
    "Lopez Garcia Silva Santos Rossi Bianchi Moreau Dubois Muller Schmidt Novak Horvat Kowalski "
    "Nowak Petrov Ivanov Jensen Larsen Nilsson Berg Tanaka Sato Suzuki Kim Park Chen Wang Singh "
    "Patel Khan Haddad Mansour Okafor Mensah Diallo Keita Walsh Murphy Byrne Evans Hughes Price "
    "Fischer Weber Wagner Costa Pereira Romero Navarro Castro Ortiz Vargas Reyes Cruz Lindqvist"
)
CITY = _words(
    "Lisbon Porto Madrid Seville Rome Milan Paris Lyon Berlin Munich Vienna Prague Warsaw Krakow "
    "Budapest Oslo Bergen Stockholm Helsinki Dublin Cork Leeds Bristol Glasgow Tokyo Osaka Seoul "
    "Busan Delhi Mumbai Cairo Lagos Accra Nairobi Dakar Lima Quito Bogota Santiago Havana Toronto "
    "Denver Boston Austin Chicago Sydney Perth Auckland"
)
SHAPES = (
    "{first} {last} was born in {city} in {year}.",
    "Born {year} in {city}: {first} {last}.",
    "{city}, {year}. Birth of {first} {last}.",
    "In {year}, {first} {last} was born in {city}.",
    "{first} {last} ({year}) comes from {city}.",
    "Record: {last}, {first}; born in {city}, year {year}.",
)
INSTRUCTION = "Write the catalogue entry for this person."


def rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    seen: set[tuple[str, str, str, int]] = set()
    out: list[dict[str, str]] = []
    while len(out) < count:
        person = (rng.choice(FIRST), rng.choice(LAST), rng.choice(CITY), rng.randint(1901, 2012))
        if person in seen:
            continue
        seen.add(person)
        first, last, city, year = person
        shape = rng.choice(SHAPES)
        out.append(
            {
                "id": f"c{len(out):04d}",
                "instruction": INSTRUCTION,
                "input": shape.format(first=first, last=last, city=city, year=year),
                "output": f"{last}, {first} ({city}, {year})",
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--seed", type=int, default=13)
    default = Path(__file__).resolve().parent.parent / "examples" / "data" / "catalogue.jsonl"
    parser.add_argument("--out", type=Path, default=default)
    args = parser.parse_args()
    lines = [json.dumps(row) for row in rows(args.rows, args.seed)]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"{args.out}: {len(lines)} rows")


if __name__ == "__main__":
    main()
