"""The built-in demo corpus: generated deterministically from a seed, no download.

Three tasks a tiny model can learn in minutes, none by a single trivial rule:

* sentiment: review sentences with intensifiers, negation ("was not good"),
  contrast ("X, but Y", "although X, Y") and agreement ("X and Y");
* extractive QA: short passages stating several facts about several people,
  with a question about any one fact; distractor facts share the relation;
* translation English -> German over a small lexicon with gender, case
  inflection, V2 inversion after a time adverb, verb-final subordinate clauses
  and negation placement.

Plus plain text for language modelling. Train and dev never share an input:
dev examples are drawn from their own random stream and rejected when their
input text occurs in train.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

from raylm.data.formatting import example_key

# --------------------------------------------------------------------------- sentiment

_SUBJECTS = [
    "the movie", "the film", "the acting", "the plot", "the music", "the ending", "the story",
    "the cast", "the dialogue", "the soundtrack", "the script", "the pacing", "the camera work",
    "the humor", "the lead actor", "the final scene", "the sequel", "the direction",
]
_POSITIVE = [
    "good", "great", "wonderful", "brilliant", "charming", "moving", "delightful", "superb",
    "funny", "clever", "beautiful", "gripping", "fresh", "touching", "smart", "lovely",
]
_NEGATIVE = [
    "bad", "boring", "dull", "awful", "terrible", "weak", "clumsy", "tedious", "bland", "messy",
    "predictable", "painful", "silly", "flat", "lifeless", "forgettable",
]
_INTENSIFIERS = ["", "", "very ", "really ", "quite ", "truly ", "rather "]
_NEGATIONS = ["was not", "was never", "is not", "was hardly"]
_AFFIRMATIONS = ["was", "is", "felt", "seemed"]
NEGATION_RATE = 0.3


def _clause(rng: random.Random, polarity: int) -> str:
    """A clause whose overall polarity is ``polarity`` (1 positive, 0 negative)."""
    negated = rng.random() < NEGATION_RATE
    adjective_polarity = polarity ^ int(negated)
    adjective = rng.choice(_POSITIVE if adjective_polarity else _NEGATIVE)
    verb = rng.choice(_NEGATIONS if negated else _AFFIRMATIONS)
    return f"{rng.choice(_SUBJECTS)} {verb} {rng.choice(_INTENSIFIERS)}{adjective}"


def make_sentiment_example(rng: random.Random) -> dict:
    label = rng.randint(0, 1)
    form = rng.random()
    if form < 0.5:
        text = _clause(rng, label)
    elif form < 0.7:
        text = f"{_clause(rng, 1 - label)}, but {_clause(rng, label)}"
    elif form < 0.85:
        text = f"although {_clause(rng, 1 - label)}, {_clause(rng, label)}"
    else:
        text = f"{_clause(rng, label)} and {_clause(rng, label)}"
    return {"task": "sentiment", "text": text, "label": "positive" if label else "negative"}


# --------------------------------------------------------------------------- QA

_NAMES = [
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Greta", "Hugo", "Ida", "Jonas", "Karl",
    "Lena", "Marta", "Nils", "Olga", "Paul", "Rosa", "Sven", "Tina", "Umar", "Vera", "Walter",
    "Yusuf", "Zoe", "Maria", "Leon", "Nora", "Oskar", "Pia", "Theo",
]
_CITIES = [
    "Berlin", "Paris", "Madrid", "Rome", "Vienna", "Oslo", "Lisbon", "Prague", "Dublin", "Athens",
    "Warsaw", "Zurich", "Munich", "Lyon", "Porto", "Bergen", "Krakow", "Seville",
]
_JOBS = [
    "baker", "doctor", "teacher", "pilot", "farmer", "nurse", "lawyer", "painter", "chef",
    "driver", "writer", "dentist", "gardener", "plumber", "singer", "tailor",
]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "gray"]
_INSTRUMENTS = ["piano", "guitar", "violin", "drums", "flute", "cello", "trumpet", "harp"]
_PETS = ["dog", "cat", "parrot", "rabbit", "horse", "turtle", "hamster", "goat"]

# relation -> (value pool, statement template, question template)
_RELATIONS: dict[str, tuple[list[str], str, str]] = {
    "city": (_CITIES, "{name} lives in {value}.", "Where does {name} live?"),
    "job": (_JOBS, "{name} works as a {value}.", "What is the job of {name}?"),
    "color": (_COLORS, "The favorite color of {name} is {value}.", "What is the favorite color of {name}?"),
    "age": ([str(age) for age in range(18, 90)], "{name} is {value} years old.", "How old is {name}?"),
    "instrument": (_INSTRUMENTS, "{name} plays the {value}.", "Which instrument does {name} play?"),
    "pet": (_PETS, "{name} owns a {value}.", "What animal does {name} own?"),
}


def make_qa_example(rng: random.Random) -> dict:
    people = rng.sample(_NAMES, rng.randint(2, 3))
    facts: list[tuple[str, str, str]] = []
    for person in people:
        for relation in rng.sample(list(_RELATIONS), 2):
            pool = _RELATIONS[relation][0]
            facts.append((person, relation, rng.choice(pool)))
    rng.shuffle(facts)
    person, relation, answer = rng.choice(facts)
    context = " ".join(_RELATIONS[rel][1].format(name=name, value=value) for name, rel, value in facts)
    question = _RELATIONS[relation][2].format(name=person)
    statement = _RELATIONS[relation][1].format(name=person, value=answer)
    answer_start = context.index(statement) + statement.rindex(answer)
    return {
        "task": "qa",
        "context": context,
        "question": question,
        "answers": {"text": [answer], "answer_start": [answer_start]},
    }


# --------------------------------------------------------------------------- translation

# English noun -> (German noun, gender)
_NOUNS = {
    "dog": ("Hund", "m"), "cat": ("Katze", "f"), "horse": ("Pferd", "n"), "man": ("Mann", "m"),
    "woman": ("Frau", "f"), "child": ("Kind", "n"), "bird": ("Vogel", "m"), "house": ("Haus", "n"),
    "car": ("Auto", "n"), "book": ("Buch", "n"), "apple": ("Apfel", "m"), "teacher": ("Lehrer", "m"),
    "girl": ("Mädchen", "n"), "boy": ("Jungen", "m"), "ball": ("Ball", "m"), "flower": ("Blume", "f"),
    "table": ("Tisch", "m"), "door": ("Tür", "f"), "cake": ("Kuchen", "m"), "letter": ("Brief", "m"),
    "lamp": ("Lampe", "f"), "picture": ("Bild", "n"),
}
# Nominative forms for nouns whose stem changes ("den Jungen" but "der Junge").
_NOMINATIVE_OVERRIDES = {"Jungen": "Junge"}
_ADJECTIVES = {
    "big": "groß", "small": "klein", "old": "alt", "young": "jung", "red": "rot", "black": "schwarz",
    "white": "weiß", "new": "neu", "happy": "froh", "quiet": "leise", "green": "grün", "fast": "schnell",
}
_ANIMATE = {"dog", "cat", "horse", "man", "woman", "child", "bird", "teacher", "girl", "boy"}
# English verb: (3rd person singular, German 3rd person singular)
_VERBS = {
    "see": ("sees", "sieht"), "like": ("likes", "mag"), "find": ("finds", "findet"),
    "buy": ("buys", "kauft"), "have": ("has", "hat"), "carry": ("carries", "trägt"),
    "paint": ("paints", "malt"), "want": ("wants", "will"), "hold": ("holds", "hält"),
    "know": ("knows", "kennt"),
}
_TIME_ADVERBS = {"today": "heute", "tomorrow": "morgen", "now": "jetzt", "sometimes": "manchmal"}

_ARTICLES = {
    ("nom", "m"): "der", ("nom", "f"): "die", ("nom", "n"): "das",
    ("acc", "m"): "den", ("acc", "f"): "die", ("acc", "n"): "das",
}


def _noun_phrase(rng: random.Random, animate: bool, case: str) -> tuple[str, str]:
    pool = sorted(_ANIMATE) if animate else sorted(_NOUNS)
    noun = rng.choice(pool)
    german_noun, gender = _NOUNS[noun]
    if case == "nom":
        german_noun = _NOMINATIVE_OVERRIDES.get(german_noun, german_noun)
    article = _ARTICLES[(case, gender)]
    if rng.random() < 0.5:
        adjective = rng.choice(sorted(_ADJECTIVES))
        # Weak adjective ending after the definite article: -en only in masculine accusative.
        ending = "en" if (case == "acc" and gender == "m") else "e"
        return f"the {adjective} {noun}", f"{article} {_ADJECTIVES[adjective]}{ending} {german_noun}"
    return f"the {noun}", f"{article} {german_noun}"


def make_translation_example(rng: random.Random) -> dict:
    subject_en, subject_de = _noun_phrase(rng, animate=True, case="nom")
    object_en, object_de = _noun_phrase(rng, animate=False, case="acc")
    verb = rng.choice(sorted(_VERBS))
    verb_en, verb_de = _VERBS[verb]
    form = rng.random()
    if form < 0.35:
        src = f"{subject_en} {verb_en} {object_en}"
        tgt = f"{subject_de} {verb_de} {object_de}"
    elif form < 0.6:
        adverb = rng.choice(sorted(_TIME_ADVERBS))
        src = f"{adverb} {subject_en} {verb_en} {object_en}"
        tgt = f"{_TIME_ADVERBS[adverb]} {verb_de} {subject_de} {object_de}"
    elif form < 0.8:
        src = f"{subject_en} does not {verb} {object_en}"
        tgt = f"{subject_de} {verb_de} {object_de} nicht"
    else:
        src = f"i think that {subject_en} {verb_en} {object_en}"
        tgt = f"ich glaube, dass {subject_de} {object_de} {verb_de}"
    return {"task": "translate", "source": src + ".", "target": tgt[0].upper() + tgt[1:] + "."}


# --------------------------------------------------------------------------- plain text


def make_lm_example(rng: random.Random) -> dict:
    sentences = []
    for _ in range(rng.randint(3, 6)):
        kind = rng.random()
        if kind < 0.4:
            sentences.append(_clause(rng, rng.randint(0, 1)).capitalize() + ".")
        elif kind < 0.8:
            relation = rng.choice(list(_RELATIONS))
            pool, template, _ = _RELATIONS[relation]
            sentences.append(template.format(name=rng.choice(_NAMES), value=rng.choice(pool)))
        else:
            sentences.append(make_translation_example(rng)["source"].capitalize())
    return {"task": "lm", "text": " ".join(sentences)}


GENERATORS: dict[str, Callable[[random.Random], dict]] = {
    "lm": make_lm_example,
    "sentiment": make_sentiment_example,
    "qa": make_qa_example,
    "translate": make_translation_example,
}


def _unique_examples(task: str, seed: int, count: int, exclude: set[str]) -> Iterator[dict]:
    rng = random.Random(f"raylm-demo/{task}/{seed}")
    seen = set(exclude)
    produced = 0
    attempts = 0
    while produced < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise RuntimeError(f"demo corpus: could not draw {count} distinct {task} examples")
        example = GENERATORS[task](rng)
        key = example_key(example)
        if key in seen:
            continue
        seen.add(key)
        produced += 1
        yield example


def generate_demo_corpus(seed: int = 0, num_train: int = 6000, num_dev: int = 300,
                         tasks: tuple[str, ...] | list[str] = tuple(GENERATORS)) -> dict[str, list[dict]]:
    """Return ``{"train": [...], "dev": [...]}`` with ``num_*`` examples per task.

    The same seed always gives the same lists; dev inputs never occur in train.
    """
    train: list[dict] = []
    dev: list[dict] = []
    for task in tasks:
        task_train = list(_unique_examples(task, seed, num_train, exclude=set()))
        train_keys = {example_key(example) for example in task_train}
        task_dev = list(_unique_examples(task, seed + 1_000_003, num_dev, exclude=train_keys))
        train.extend(task_train)
        dev.extend(task_dev)
    random.Random(seed).shuffle(train)
    return {"train": train, "dev": dev}
