"""Write the single-digit sums task used with a real model: data/sums_train.jsonl and data/sums_test.jsonl.

    python data/make_sums.py

Every pair a + b with a, b in 0..9 is one chat prompt, "What is a + b?", with the sum in an `answer` column
for the built-in `accuracy` reward. 10 pairs a < b are held out for evaluation in both orders (20 prompts):
training never sees a + b or b + a for them. The other 80 prompts are for training.
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))


def rows(pairs):
    return [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)} for a, b in pairs]


def main() -> None:
    # Hold out 10 pairs a < b in both orders: 20 test prompts, and the other 80 to train on.
    unordered = [(a, b) for a in range(10) for b in range(a + 1, 10)]
    held_out = set(random.Random(0).sample(unordered, 10))
    is_held_out = {(a, b) for a, b in held_out} | {(b, a) for a, b in held_out}
    test = sorted(is_held_out)
    train = [(a, b) for a in range(10) for b in range(10) if (a, b) not in is_held_out]
    for name, pairs in (("sums_train.jsonl", train), ("sums_test.jsonl", test)):
        with open(os.path.join(HERE, name), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows(pairs))
        print(f"wrote {len(pairs)} prompts to data/{name}")


if __name__ == "__main__":
    main()
