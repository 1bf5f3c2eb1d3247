"""Text for the default model's distillation and evaluation, all of it already on the machine.

Held out (never trained on): the odd-numbered topics of ``pydoc_data.topics`` and the GNU GPL v3 text
Debian ships in /usr/share/common-licenses (every GPL/LGPL licence is kept out of training, since
they share wording). Training: the even-numbered pydoc topics, the other common licences, and the
Python standard library's own sources, plus chat answers the teacher generates on the GPU from
``chat_prompts()`` (the five evaluation prompts excluded).

Run ``python -m tools.recipe.data OUT`` to write ``OUT/corpus.bin``
(uint16 tokens, documents separated by EOS) and ``OUT/corpus.json`` (sources and counts).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

LICENSES = Path("/usr/share/common-licenses")
HELD_OUT_LICENSE = LICENSES / "GPL-3"
STDLIB_TOKENS = 3_000_000

EVAL_PROMPTS = (
    "Hi! How are you today?",
    "What is a Python list comprehension? Give a short example.",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn.",
    "What are three tips for staying focused while studying?",
)

# Short questions with known answers, scored by contains-match (any accepted answer, case-insensitive) on the
# teacher's and the MoE's greedy replies. Written for this project; kept out of every training prompt.
FACTUAL: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France? Answer in one sentence.", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of Spain?", ("madrid",)),
    ("What is the capital of Egypt?", ("cairo",)),
    ("What is the capital of Canada?", ("ottawa",)),
    ("What is the capital of the United Kingdom?", ("london",)),
    ("What is 2 + 2?", ("4", "four")),
    ("What is 7 times 8?", ("56", "fifty-six", "fifty six")),
    ("What is 10 minus 3?", ("7", "seven")),
    ("What is 100 divided by 4?", ("25", "twenty-five", "twenty five")),
    ("How many days are there in a week?", ("7", "seven")),
    ("How many minutes are in an hour?", ("60", "sixty")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("What is half of 50?", ("25", "twenty-five", "twenty five")),
    ("What gas do plants take in from the air for photosynthesis?", ("carbon dioxide", "co2")),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
    ("What is the chemical symbol for water?", ("h2o",)),
    ("What star is at the centre of our solar system?", ("sun",)),
    ("Which organ pumps blood through the human body?", ("heart",)),
    ("What do bees make from nectar?", ("honey",)),
    ("What is a noun? Define it in one sentence.", ("person", "place", "thing")),
    ("Define the word 'synonym' in one sentence.", ("same", "similar")),
    ("What does a thermometer measure?", ("temperature",)),
    ("What is the opposite of 'hot'?", ("cold",)),
    ("What is the plural of 'mouse'?", ("mice",)),
    ("Which language is mainly spoken in Brazil?", ("portuguese",)),
    ("What colour do you get by mixing blue and yellow?", ("green",)),
    ("How many continents are there on Earth?", ("7", "seven")),
    ("In Python, which keyword defines a function?", ("def",)),
    ("In Python, what function returns the length of a list?", ("len",)),
    ("In Python, which function prints text to the screen?", ("print",)),
    ("In Python, what does the expression 3 ** 2 evaluate to?", ("9", "nine")),
    ("In Python, what type does the literal 3.14 have?", ("float",)),
    ("In Python, which method adds an item to the end of a list?", ("append",)),
    ("In Python, which keyword leaves a loop early?", ("break",)),
    ("In Python, which built-in type stores key-value pairs?", ("dict",)),
)
SIDE_BY_SIDE = (0, 9, 16, 27, 33)  # the factual prompts the report shows in full


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def calibration_texts() -> list[str]:
    """Even pydoc topics: training-side text for choosing a static committee, never scored."""
    return _topics()[0::2]


def heldout() -> dict[str, list[str]]:
    """The two evaluation texts: pydoc odd topics (documents) and the GPL-3 text."""
    return {"pydoc": _topics()[1::2], "gpl3": [HELD_OUT_LICENSE.read_text()]}


def _licenses() -> Iterator[str]:
    for path in sorted(LICENSES.iterdir()):
        if path.is_file() and not path.is_symlink() and "GPL" not in path.name:
            yield path.read_text(errors="replace")


def _stdlib_sources() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"test", "tests", "idlelib", "site-packages", "lib2to3"}:
            continue
        yield path.read_text(errors="replace")


def training_documents() -> Iterator[tuple[str, str]]:
    """(source, text) pairs in a fixed order."""
    yield from (("pydoc-even", t) for t in _topics()[0::2])
    yield from (("licences", t) for t in _licenses())
    yield from (("stdlib", t) for t in _stdlib_sources())


_SUBJECTS = (
    "Python lists", "Python dictionaries", "recursion", "sorting algorithms", "binary search", "HTTP",
    "the water cycle", "photosynthesis", "the moon", "volcanoes", "climate change", "healthy breakfast",
    "time management", "learning a new language", "the French Revolution", "the Roman Empire",
    "black holes", "gravity", "electric cars", "solar panels", "machine learning", "neural networks",
    "databases", "SQL joins", "Git branches", "unit testing", "regular expressions", "the Linux shell",
    "cats", "dogs", "gardening", "coffee", "tea", "baking bread", "running", "sleep", "meditation",
    "chess", "music theory", "the piano", "painting", "poetry", "writing an essay", "job interviews",
    "saving money", "budgeting", "travel in Japan", "the ocean", "rainforests", "bees", "dinosaurs",
    "the human heart", "vitamins", "friendship", "kindness", "the internet", "email etiquette",
    "open source software", "prime numbers", "fractions", "the Pythagorean theorem", "probability",
    "a birthday party", "a rainy day", "the seasons", "mountains", "rivers", "public speaking",
)
_TASKS = (
    "What is {s}?", "Explain {s} to a ten-year-old.", "Give me three facts about {s}.",
    "Write a short poem about {s}.", "What are the pros and cons of {s}?", "Summarise {s} in one paragraph.",
    "How do I get started with {s}?", "Tell me a fun fact about {s}.", "Why is {s} important?",
    "Write a short story that involves {s}.", "What are common mistakes people make with {s}?",
    "Can you give me a simple example related to {s}?", "List five questions a student might ask about {s}.",
    "Describe {s} in three sentences.", "What should a beginner know about {s}?",
)
_SMALL_TALK = (
    "Hello!", "Good morning!", "Hey, what's up?", "Thanks for your help!", "Can you help me?",
    "Who are you?", "What can you do?", "Tell me a joke.", "I'm bored. Any ideas?", "Goodbye!",
)


def chat_prompts() -> list[str]:
    """Prompts the teacher answers to make chat training data (never the evaluation prompts)."""
    prompts = list(_SMALL_TALK) + [t.format(s=s) for s, t in itertools.product(_SUBJECTS, _TASKS)]
    held_out = set(EVAL_PROMPTS) | {prompt for prompt, _ in FACTUAL}
    return [p for p in prompts if p not in held_out]


def correct(reply: str, accepted: tuple[str, ...]) -> bool:
    """Contains-match: any accepted answer as a whole word (or phrase) of the reply, case-insensitive."""
    import re

    text = reply.lower()
    return any(re.search(rf"(?<![\w.]){re.escape(answer)}(?![\w])", text) for answer in accepted)


def write_corpus(out: Path, tokenizer, eos_id: int, stdlib_tokens: int = STDLIB_TOKENS) -> dict:
    """Tokenise the training documents into ``out/corpus.bin``; returns what ``corpus.json`` records."""
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    chunks: list[np.ndarray] = []
    for source, text in training_documents():
        if source == "stdlib" and counts.get(source, 0) >= stdlib_tokens:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id]
        counts[source] = counts.get(source, 0) + len(ids)
        chunks.append(np.asarray(ids, dtype=np.uint16))
    tokens = np.concatenate(chunks)
    (out / "corpus.bin").write_bytes(tokens.tobytes())
    record = {
        "tokens": int(tokens.size), "by_source": counts, "python": sys.version.split()[0],
        "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
    }
    (out / "corpus.json").write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    from expertswap.models.default_model.gguf_source import _reader, find_gguf, load_tokenizer, read_shape

    gguf = find_gguf()
    shape = read_shape(_reader(gguf))
    print(json.dumps(write_corpus(Path(sys.argv[1]), load_tokenizer(gguf), shape.eos_token_id), indent=2))
