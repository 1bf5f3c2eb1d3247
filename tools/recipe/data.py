"""Text for the default model's distillation and evaluation, all of it already on the machine.

Held out (never trained on): the odd-numbered topics of ``pydoc_data.topics`` and the GNU GPL v3 text
Debian ships in /usr/share/common-licenses (every GPL/LGPL licence is kept out of training, since
they share wording), the five chat prompts and the forty ``FACTUAL`` questions. Training: the
even-numbered pydoc topics, the other common licences, and the Python standard library's own sources,
plus the teacher's own answers, sampled on the GPU, to ``prompt_mix()``: conversation, questions,
short facts, instructions, continuations of prose from Debian's documentation and the licences, and
drills (short questions with one known answer, added in the third training session).

Run ``python -m tools.recipe.data OUT`` to write ``OUT/corpus.bin`` (uint16 tokens, documents separated
by EOS), ``OUT/corpus.json`` (sources and counts) and ``OUT/prompts.json`` (the prompt mix, built here
so that the GPU machine, whatever its documentation, answers the same prompts).
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


_CONVERSATION = (
    "How was your weekend?", "I just got a new puppy!", "What should I cook for dinner tonight?",
    "I can't sleep. What should I do?", "Can you recommend a good book?", "I feel a bit stressed today.",
    "What's a good way to start the morning?", "Do you like music?", "I'm learning to play the guitar.",
    "What's your favourite season and why?", "Any tips for a long flight?", "I passed my exam today!",
    "It's raining again.", "What do you think about working from home?", "Can you cheer me up?",
    "I'm planning a picnic. What should I bring?", "How do I make new friends in a new city?",
    "What's a fun thing to do on a Sunday?", "Tell me something interesting.", "How do I say no politely?",
)
_COUNTRIES = (  # none of FACTUAL's: those stay unseen
    "Portugal", "Greece", "Norway", "Sweden", "Kenya", "Peru", "Chile", "Australia", "India", "China",
    "Mexico", "Poland", "Ireland", "Turkey", "Argentina", "Thailand", "Austria", "Finland", "Denmark",
    "Hungary", "Morocco", "Vietnam", "Cuba", "Nigeria", "Belgium",
)
_FACT_TEMPLATES = (
    "What is the capital of {c}?", "Which continent is {c} in?", "What language do people speak in {c}?",
    "Name a famous food from {c}.",
)
_WORDS = ("happy", "fast", "big", "bright", "quiet", "brave", "tired", "ancient", "curious", "gentle")
_INSTRUCTIONS = (
    "Give a synonym for '{w}'.", "Give the opposite of '{w}'.", "Use the word '{w}' in a sentence.",
    "Write a short sentence that describes something {w}.",
)
_TASK_INSTRUCTIONS = (
    "Rewrite this sentence more politely: 'Give me the report now.'", "Turn this into a question: 'The shop is open.'",
    "Summarise in one sentence: 'The meeting moved to Friday because two people were ill.'",
    "List three fruits that are red.", "Write a two-line rhyme about a cat.", "Name three primary colours.",
    "Write a polite email subject line asking for a day off.", "Explain what a verb is with two examples.",
    "Sort these numbers from smallest to largest: 9, 2, 7, 4.", "Write a Python function that adds two numbers.",
    "Write a Python loop that prints the numbers 1 to 5.", "How do I reverse a string in Python?",
    "What does the Python 'return' statement do?", "Give an example of a Python dictionary.",
    "Convert 3 kilometres to metres and show the working.", "What is 15 plus 27? Show the working.",
    "What is 9 times 6? Answer with the number.", "Count the vowels in the word 'banana'.",
)
# Drills: short questions with one known answer, in the forms FACTUAL asks but never about FACTUAL's own
# subjects (its eight countries, Brazil, its sums, the mouse, the spider, hot and cold, ...). Added for the
# third training round: the student matched the teacher's short answers worst, and 145 of the first
# 1,553 prompts were facts.
_DRILL_COUNTRIES = (
    *_COUNTRIES, "Russia", "South Korea", "Indonesia", "the Netherlands", "Switzerland", "Colombia", "Venezuela",
    "Iran",
    "Saudi Arabia", "Ukraine", "Romania", "Bulgaria", "Croatia", "Iceland", "New Zealand", "the Philippines",
    "Malaysia", "Pakistan", "Nepal", "Ethiopia", "Ghana", "South Africa", "Algeria", "Uruguay", "Bolivia",
    "Jamaica", "Mongolia", "Lebanon", "Slovakia", "Lithuania", "Estonia", "Sri Lanka", "Cambodia",
    "Kazakhstan", "Tanzania", "Senegal", "Czechia", "Serbia", "Qatar", "Ecuador",
)
_DRILL_CAPITAL = (
    "What is the capital of {c}? Answer in one sentence.", "Which city is the capital of {c}?",
    "Name the capital city of {c}.",
)
_DRILL_LANGUAGE = ("Which language is mainly spoken in {c}?",)
_DRILL_NUMBERS = ((4, 8, 11, 14, 20, 30, 64, 81, 90, 120), (2, 3, 4, 6, 9))
_DRILL_OPERATIONS = ("plus", "minus", "times", "divided by")
_DRILL_COUNTS = (
    "hours are in a day", "seconds are in a minute", "months are in a year", "days are in a year",
    "weeks are in a year", "years are in a century", "years are in a decade", "eggs are in a dozen",
    "centimetres are in a metre", "grams are in a kilogram", "letters are in the English alphabet",
    "planets are in our solar system", "sides does a triangle have", "sides does a hexagon have",
    "sides does a square have", "legs does a dog have", "legs does an insect have", "arms does an octopus have",
    "wheels does a bicycle have", "strings does a standard guitar have", "players are on a football team",
)
_DRILL_SCIENCE = (
    "What is the boiling point of water in degrees Celsius?", "What is the chemical symbol for gold?",
    "What is the chemical symbol for oxygen?", "What is the chemical symbol for iron?",
    "What is the chemical symbol for sodium?", "What gas do humans breathe out?",
    "What gas do humans need to breathe in to live?", "Which planet is closest to the Sun?",
    "Which planet is famous for its rings?", "What is the largest ocean on Earth?",
    "What is the tallest mountain in the world?", "What is the largest mammal?",
    "What is the fastest land animal?", "What do caterpillars turn into?", "What do you call a baby cat?",
    "What do you call a baby dog?", "Which organ do humans breathe with?",
    "What force pulls things towards the ground?",
    "Which part of a plant takes in water from the soil?", "What is the main ingredient of bread?",
    "What does a barometer measure?", "What does a ruler measure?", "What does a clock measure?",
    "What does a speedometer measure?", "What does a compass show?", "What is the hardest natural material?",
    "What is frozen water called?", "Which season comes after spring?", "What do cows produce that people drink?",
    "What colour do you get by mixing red and white?", "What colour do you get by mixing red and yellow?",
    "What colour do you get by mixing blue and red?", "What colour do you get by mixing black and white?",
)
_DRILL_OPPOSITES = ("up", "big", "happy", "fast", "light", "early", "open", "full", "old", "wet", "day", "loud")
_DRILL_PLURALS = ("child", "tooth", "foot", "goose", "man", "woman", "person", "sheep", "leaf", "knife", "box",
                  "city", "baby", "potato", "fish", "cactus")
_DRILL_DEFINE = ("verb", "adjective", "adverb", "pronoun", "prime number", "triangle", "planet", "mammal",
                 "volcano", "island", "habitat", "sentence")
_DRILL_WORDS = ("antonym", "homophone", "generous", "ancient", "fragile", "vocabulary", "curious", "enormous")
_DRILL_PYTHON = (
    "which keyword skips to the next iteration of a loop", "which keyword starts a conditional statement",
    "which keyword catches an exception", "which keyword imports a module", "which keyword defines a class",
    "which keyword sends a value back from a function", "which keyword makes an anonymous function",
    "which statement does nothing", "which function reads a line typed by the user",
    "which function converts a string to an integer", "which function returns the largest item",
    "which function adds up the numbers in a list", "which function returns a new sorted list",
    "which function makes a sequence of numbers for a loop", "which function returns the type of an object",
    "which function opens a file", "which method removes and returns the last item of a list",
    "which string method joins a list of strings", "which string method splits a string into words",
    "which string method makes a string upper case", "which string method removes spaces from both ends",
    "which dictionary method returns its keys", "which list method sorts the list in place",
    "which built-in type is an unchangeable sequence", "which built-in type stores unique items",
    "which built-in type holds text", "which built-in type holds True or False",
)
_DRILL_PYTHON_VALUES = ("2 ** 3", "7 // 2", "7 % 3", "10 / 4", "len('hello')", "'ab' * 2", "3 + 4 * 2",
                        "abs(-5)", "max(3, 9, 4)", "int('12') + 1")
_DRILL_PYTHON_LITERALS = ("42", "'hi'", "True", "[1, 2]", "(1, 2)", "None", "{'a': 1}")
DRILL_SUFFIX = " Answer briefly."


def _drills() -> list[str]:
    """The third round's short questions; each also asked with DRILL_SUFFIX, as users add such asks."""
    first, second = _DRILL_NUMBERS
    questions = [t.format(c=c) for c, t in itertools.product(_DRILL_COUNTRIES, _DRILL_CAPITAL + _DRILL_LANGUAGE)]
    questions += [f"What is {a} {op} {b}?" for a, b, op in itertools.product(first, second, _DRILL_OPERATIONS)
                  if op != "divided by" or a % b == 0]
    questions += [f"What is half of {a}?" for a in first] + [f"What is double {a}?" for a in first]
    questions += [f"How many {c}?" for c in _DRILL_COUNTS] + list(_DRILL_SCIENCE)
    questions += [f"What is the opposite of '{w}'?" for w in _DRILL_OPPOSITES]
    questions += [f"What is the plural of '{w}'?" for w in _DRILL_PLURALS]
    questions += [f"What is a {w}? Define it in one sentence." for w in _DRILL_DEFINE]
    questions += [f"Define the word '{w}' in one sentence." for w in _DRILL_WORDS]
    questions += [f"In Python, {q}?" for q in _DRILL_PYTHON]
    questions += [f"In Python, what does the expression {e} evaluate to?" for e in _DRILL_PYTHON_VALUES]
    questions += [f"In Python, what type does the literal {v} have?" for v in _DRILL_PYTHON_LITERALS]
    return questions + [q + DRILL_SUFFIX for q in questions]


DOCS = Path("/usr/share/doc")
CONTINUATIONS = 300  # prose passages from Debian's documentation and the (non-GPL) licences


def _passages() -> Iterator[str]:
    """Prose paragraphs (30-120 words, mostly letters) from Debian's package READMEs, then the licences."""
    import gzip

    def texts() -> Iterator[str]:
        for path in sorted(DOCS.glob("*/README*")):
            if path.is_file() and not path.is_symlink():
                raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
                yield raw.decode("utf-8", errors="replace")
        yield from _licenses()

    for text in texts():
        for paragraph in text.split("\n\n"):
            words = paragraph.split()
            letters = sum(ch.isalpha() for ch in paragraph)
            if 30 <= len(words) <= 120 and letters > 0.7 * len(paragraph.replace(" ", "")):
                yield " ".join(words)


def prompt_mix() -> dict[str, list[str]]:
    """The prompts the teacher answers, by kind; the evaluation prompts and FACTUAL never among them."""
    arithmetic = [f"What is {a} {op} {b}?" for a, b, op in itertools.product(
        (3, 6, 12, 19, 45), (2, 5, 9), ("plus", "minus", "times"))]
    passages = list(itertools.islice(_passages(), CONTINUATIONS))
    mix = {
        "conversation": list(_SMALL_TALK) + list(_CONVERSATION),
        "questions": [t.format(s=s) for s, t in itertools.product(_SUBJECTS, _TASKS)],
        "facts": [t.format(c=c) for c, t in itertools.product(_COUNTRIES, _FACT_TEMPLATES)] + arithmetic,
        "instructions": [t.format(w=w) for w, t in itertools.product(_WORDS, _INSTRUCTIONS)]
                        + list(_TASK_INSTRUCTIONS),
        "continuations": [f"Continue this text:\n\n{' '.join(p.split()[:40])}" for p in passages],
        "drills": _drills(),
    }
    held_out = set(EVAL_PROMPTS) | {prompt for prompt, _ in FACTUAL}
    return {kind: [p for p in prompts if p not in held_out] for kind, prompts in mix.items()}


def chat_prompts() -> list[str]:
    """Prompts the teacher answers to make chat training data, all kinds in one list (see ``prompt_mix``)."""
    return [p for prompts in prompt_mix().values() for p in prompts]


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
    mix = prompt_mix()
    (out / "prompts.json").write_text(json.dumps(mix, indent=1))
    record["prompts"] = {kind: len(prompts) for kind, prompts in mix.items()}
    return record


if __name__ == "__main__":
    from expertswap.models.default_model.gguf_source import _reader, find_gguf, load_tokenizer, read_shape

    gguf = find_gguf()
    shape = read_shape(_reader(gguf))
    print(json.dumps(write_corpus(Path(sys.argv[1]), load_tokenizer(gguf), shape.eos_token_id), indent=2))
