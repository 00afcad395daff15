"""Data shared by the top-level tests (a plain module: conftest.py names clash across folders)."""

import json

PAIRS = [
    {"prompt": "Question: What is the best ice cream?\nAnswer:", "chosen": " Haagen-Dazs is rich.",
     "rejected": " GB"},
    {"prompt": "Question: Name a fast animal.\nAnswer:", "chosen": " The cheetah.", "rejected": " A snail, I think."},
    {"prompt": "Question: What is two plus two?\nAnswer:", "chosen": " Four.", "rejected": " Seven."},
    {"prompt": "Question: What color is the sky?\nAnswer:", "chosen": " Blue on a clear day.",
     "rejected": " Purple, probably."},
]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
