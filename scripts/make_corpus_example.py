"""Write data/corpus/example.jsonl, the corpus job's example: 520 lines of this project's own text.

Each line joins one to nine sentences from the list below, so lengths run from a few words to
about 500 characters. Lines alternate between the two bundled voices; every 40th line changes
a sampling value, and every 100th has a seed. The same seed gives the same file.

    python scripts/make_corpus_example.py           # write the file
    python scripts/make_corpus_example.py --check   # exit 1 if the committed file differs
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "corpus" / "example.jsonl"
LINES = 520
SENTENCES = [
    "Good morning.",
    "The kettle is on.",
    "Please mind the gap between the platform and the train.",
    "Our garden has three apple trees and a very stubborn fox.",
    "The lighthouse keeper counted the ships as they passed in the fog.",
    "A small boat drifted past the harbour wall just after sunrise.",
    "Every recipe in this book starts with a pinch of salt and a little patience.",
    "The library opens at nine, and the reading room fills up by ten.",
    "If the bridge is closed, take the ferry across the river instead.",
    "She tuned the old piano until every key rang clear and true.",
    "Turn left at the bakery, then follow the lane to the blue door.",
    "The forecast promises rain in the afternoon and stars by midnight.",
    "Our train will arrive at the coast a few minutes ahead of schedule.",
    "He wrote the letter twice, because the first draft sounded too formal.",
    "The museum keeps its oldest maps in a cool room without windows.",
    "Bring a warm coat; the wind on the hill is sharper than it looks.",
    "The choir rehearsed the final chorus until the hall went quiet.",
    "A good story needs a beginning, a middle, and an ending that surprises.",
    "The market sells fresh bread, honey from the valley, and wild mushrooms.",
    "Each chapter closes with a short summary and a few exercises.",
    "The river rose overnight, but the old stone bridge held firm.",
    "Water the seedlings every evening until the first leaves appear.",
    "The night bus stops at the square on the hour and at half past.",
    "Nobody could remember who had planted the tall oak by the school.",
    "The engineers measured every change before they trusted it.",
    "Press the green button once, then wait for the light to turn steady.",
    "The cat watched the rain from the windowsill all afternoon.",
    "After the storm, the beach was covered in shells and driftwood.",
    "The orchestra tuned to a single note from the oboe.",
    "Grandfather kept his tools in a wooden chest that smelled of cedar.",
    "Your parcel will be left with the neighbour at number twelve.",
    "The hikers reached the summit just as the clouds began to lift.",
    "Thank you for calling; a member of our team will be with you shortly.",
    "The first snow of the year fell quietly on the empty fields.",
    "Read the question twice before you write a single word of the answer.",
    "The old clock in the hall chimes a little late every hour.",
    "Fresh paint dries faster on a warm day with a gentle breeze.",
    "She found the missing key inside the pocket of her winter coat.",
    "The ferry carries cars, bicycles, and the occasional curious dog.",
    "At the end of the lane there is a gate, and beyond it an open meadow.",
]
# A few lines change one sampling value, within the ranges the job accepts.
OVERRIDES = [dict(temperature=0.6), dict(cfg_weight=0.3), dict(repetition_penalty=1.5), dict(top_p=0.9),
             dict(min_p=0.1)]


def lines(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    made = []
    for i in range(LINES):
        # Mostly short lines, as dialogue and prompts are, with a tail of long paragraphs.
        count = min(9, 1 + int(rng.expovariate(0.5)))
        line = dict(id=f"example-{i:04d}", text=" ".join(rng.sample(SENTENCES, count)),
                    voice=("alto", "tenor")[i % 2])
        if i % 40 == 7:
            line.update(OVERRIDES[(i // 40) % len(OVERRIDES)])
        if i % 100 == 13:
            line["seed"] = i
        made.append(line)
    return made


def text() -> str:
    return "".join(json.dumps(line) + "\n" for line in lines())


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        if not OUT.is_file() or OUT.read_text() != text():
            print(f"{OUT} differs from what this script writes: run it without --check")
            return 1
        return 0
    if argv:
        print(__doc__)
        return 2
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text())
    print(f"wrote {OUT} ({LINES} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
