"""Haystack sources for BABILong: books, each a list of sentences in reading order.

BABILong hides bAbI facts in PG19 books (babilong.py builds the samples); this file supplies the
books. Three sources, all behind one small class, `Library` (`len(lib)` books, `lib[i]` book i's
sentences, loaded once): synthetic books of a small grammar's sentences (offline, the default), a
folder of Project Gutenberg .txt files (their license header and footer cut), and PG19 itself,
streamed from the Hugging Face hub with `datasets` (online only; the one place that package is
imported). Two ideas to hold: a book is loaded when first read, by a module-level function bound
with functools.partial, so a Library pickles into DataLoader workers; and sentences are split by one
regular expression that errs towards short fragments, which the sampler skips.
"""
import functools
import gzip
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

SYNTHETIC_BOOKS = 100  # books of the synthetic haystack (PG19's test split also has 100)
BOOK_SENTENCES = 5000  # sentences per synthetic book: ~100K tokens, about a novel
# the hub name of PG19, the books BABILong's haystack comes from (tests: a local folder)
PG19 = "deepmind/pg19"
PG19_SPLIT = "test"  # split read by source "pg19"; "pg19:train" etc. chooses another
# books read from the PG19 stream (the whole test split); a smaller split gives all it has
PG19_BOOKS = 100
# 1 in 10 books of a source (the last ones; at least one) is read by held-out rows only
HELD_OUT = 10
# lines around a Gutenberg book's own text
GUTENBERG_START, GUTENBERG_END = "*** START OF", "*** END OF"
SENTENCE = re.compile(r"\S.*?[.!?]+[\"'’”)\]]*(?=\s|$)|\S.+$")  # see split_sentences


# ----------------------------------------------------------------- synthetic prose: a small grammar

AGENTS = ("farmer sailor merchant painter doctor teacher soldier poet baker carpenter widow "
          "stranger child captain clerk lawyer priest miller weaver shepherd traveler musician "
          "hunter scholar tailor banker judge nurse pilot student writer neighbor rider fisherman "
          "blacksmith innkeeper mayor peddler").split()
THINGS = ("lantern letter engine wagon carriage clock mirror candle basket blanket coat hat book "
          "map key ring chair table window door fence ladder barrel rope bread coin painting "
          "ribbon umbrella kettle compass violin drum bell boat saddle bucket knife needle "
          "shovel").split()
SETTINGS = ("harbor market valley library station forest chapel field tower mill village square "
            "cellar attic courtyard bakery tavern orchard meadow cottage workshop quarry "
            "lighthouse shore pier barn").split()
ADJECTIVES = ("old young quiet tired small heavy bright narrow distant careful patient clever "
              "silent stubborn gentle nervous ancient broken golden wooden rusty dusty crowded "
              "empty proud honest foolish cheerful lonely restless curious faded polished strange "
              "humble weary sturdy fragile").split()
VERBS = ("repaired carried painted noticed borrowed sold bought described forgot remembered "
         "admired ignored followed praised studied mended counted inspected signed delivered hid "
         "found examined measured wrapped cleaned guarded traded "
         "built burned stole lost").split()  # transitive, past tense
INTRANSITIVE = ("waited laughed rested slept hesitated whistled listened sang wandered shivered "
                "sighed paused stumbled lingered argued complained prayed smiled nodded trembled "
                "worked hurried").split()
ADVERBS = ("quietly slowly carefully suddenly happily patiently softly briefly eagerly nervously "
           "gladly rarely often anxiously loudly calmly wearily proudly").split()
PREPOSITIONS = ("near beside behind under across beyond toward above below along inside "
                "outside").split()
DETERMINERS = "the this that one each some another".split()
CONJUNCTIONS = "and but so yet".split()  # join two clauses after a comma
# open or join a clause
SUBORDINATORS = "after when because although while before once since".split()
DETAIL_PROB = 0.5  # chance of each optional part: adjective, "of the place", prepositional phrase
WORDS = (10, 30)  # a haystack sentence has this many words, like a sentence of a novel


def _noun_phrase(rng: random.Random, nouns: list[str]) -> str:
    adjective = [rng.choice(ADJECTIVES)] if rng.random() < DETAIL_PROB else []
    origin = ["of", "the", rng.choice(SETTINGS)] if rng.random() < DETAIL_PROB else []
    return " ".join([rng.choice(DETERMINERS), *adjective, rng.choice(nouns), *origin])


def _clause(rng: random.Random) -> str:
    if rng.random() < DETAIL_PROB:
        action = f"{rng.choice(VERBS)} {_noun_phrase(rng, THINGS)}"
    else:
        action = f"{rng.choice(INTRANSITIVE)} {rng.choice(ADVERBS)}"
    where = (f" {rng.choice(PREPOSITIONS)} the {rng.choice(SETTINGS)}" if rng.random() < DETAIL_PROB
             else "")
    return f"{_noun_phrase(rng, AGENTS)} {action}{where}"


def haystack_sentences(rng: random.Random, n: int) -> list[str]:
    """n English-like sentences that never name a bAbI person, room or object, so they answer
    nothing."""
    out = []
    # a draw of the wrong length is thrown away (a lone clause is often too short)
    while len(out) < n:
        a, b = _clause(rng), _clause(rng)
        text = rng.choice([a, f"{a}, {rng.choice(CONJUNCTIONS)} {b}",
                           f"{rng.choice(SUBORDINATORS)} {a}, {b}",
                           f"{a} {rng.choice(SUBORDINATORS)} {b}"])
        if WORDS[0] <= len(text.split()) <= WORDS[1]:
            out.append(text[0].upper() + text[1:] + ".")
    return out


class Library:
    """A haystack source: `len(lib)` books, `lib[i]` a list of sentences in order, made by `load(i)`
    once. The loaders below are partials of module-level functions, so a Library pickles (DataLoader
    workers)."""

    def __init__(self, name: str, n_books: int, load: Callable[[int], list[str]]):
        self.name, self.n_books, self.load, self.cache = name, n_books, load, {}

    def __len__(self) -> int:
        return self.n_books

    def __getitem__(self, i: int) -> list[str]:
        if i not in self.cache:
            self.cache[i] = self.load(i)
        return self.cache[i]

    def __iter__(self) -> Iterator[list[str]]:
        return (self[i] for i in range(self.n_books))

    def __repr__(self) -> str:
        return f"Library({self.name!r}, {self.n_books} books)"


def split(library: Library, part: str) -> Library:
    """The books a split reads: "eval" the last len/HELD_OUT (at least one), "train" the others. A
    source of one book cannot be split: both read it."""
    n_eval = max(1, len(library) // HELD_OUT) if len(library) > 1 else 0
    chosen = (range(len(library) - n_eval, len(library)) if part == "eval"
              else range(len(library) - n_eval))
    chosen = chosen or range(len(library))
    return Library(f"{library.name}:{part}", len(chosen),
                   functools.partial(_book_of, library, chosen))


def _book_of(library: Library, chosen: range, i: int) -> list[str]:
    return library[chosen[i]]


def strip_gutenberg(text: str) -> str:
    """The book's own text: what lies between the "*** START OF" and "*** END OF" lines, when
    present."""
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith(GUTENBERG_START)), 0)
    end = next((i for i, line in enumerate(lines) if line.startswith(GUTENBERG_END)), len(lines))
    return "\n".join(lines[start:end])


def split_sentences(text: str) -> list[str]:
    """Sentences of a text, with every run of whitespace (line breaks included) made one space.

    The rule: a sentence ends at '.', '!' or '?' (and any closing quotes or brackets after them)
    that is followed by a space or the end of the text; a tail without such an ending is a sentence
    too. Abbreviations ("Mr. Darcy") are split too: the fragments are short and the sampler skips
    them.
    """
    return SENTENCE.findall(" ".join(text.split()))


def synthetic_books(seed: int) -> Library:
    """SYNTHETIC_BOOKS books of haystack_sentences; book i depends only on (seed, i)."""
    return Library("synthetic", SYNTHETIC_BOOKS, functools.partial(_synthetic_book, seed))


def _synthetic_book(seed: int, i: int) -> list[str]:
    return haystack_sentences(random.Random(f"synthetic-{seed}-{i}"), BOOK_SENTENCES)


def folder_books(folder: str | Path) -> Library:
    """The .txt (or gzipped .txt.gz) books of a folder (Project Gutenberg header and footer
    removed), in file-name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"haystack folder {folder} does not exist")
    files = sorted([*folder.glob("*.txt"), *folder.glob("*.txt.gz")])
    if not files:
        raise ValueError(f"haystack folder {folder} holds no .txt (or .txt.gz) books")
    return Library(str(folder), len(files), functools.partial(_file_book, files))


def _file_book(files: list[Path], i: int) -> list[str]:
    raw = files[i].read_bytes()
    raw = gzip.decompress(raw) if files[i].suffix == ".gz" else raw
    return split_sentences(strip_gutenberg(raw.decode("utf-8", errors="replace")))


def from_hub(what: str, read: Callable, hint: str = ""):
    """read(datasets): the `datasets` package is imported here only, so nothing else needs it. A
    missing package, or any failure of the download (offline, unknown revision, ...), becomes one
    RuntimeError."""
    try:
        import datasets
    except ImportError:
        raise RuntimeError(f"{what} needs the `datasets` package "
                           f"(pip install datasets){hint}") from None
    try:
        return read(datasets)
    # offline: ConnectionError, or datasets' own errors when HF_DATASETS_OFFLINE is set
    except Exception as e:
        offline = isinstance(e, (ConnectionError, TimeoutError)) or "offline" in str(e).lower()
        raise RuntimeError(f"{what} failed ({type(e).__name__}: {e})"
                           f"{'; it needs the network' if offline else ''}{hint}") from None


def pg19_books(seed: int, split: str = PG19_SPLIT) -> Library:
    """The first PG19_BOOKS books (all, if the split has fewer) of PG19's split streamed from the
    hub in a seeded order (needs `datasets` and the network)."""
    def read(datasets):
        stream = datasets.load_dataset(PG19, split=split, streaming=True).shuffle(seed=seed)
        return [row["text"] for _, row in zip(range(PG19_BOOKS), stream)]
    texts = from_hub("haystack 'pg19'", read,
                     hint="; offline, use 'synthetic' or a folder of .txt books")
    return Library(f"pg19:{split}", len(texts), functools.partial(_text_book, texts))


def _text_book(texts: list[str], i: int) -> list[str]:
    return split_sentences(texts[i])


def haystack(source: str, seed: int = 0) -> Library:
    """The haystack source named by `source`: "synthetic" (or "synthetic:SEED", books of that seed
    whatever the run's), "pg19" (or "pg19:SPLIT"), or a folder of .txt books."""
    if source == "synthetic" or source.startswith("synthetic:"):
        given = source.partition(":")[2]
        if given and not given.isdigit():
            raise ValueError(f"haystack {source}: the seed after 'synthetic:' must be a whole "
                             "number")
        return synthetic_books(int(given or seed))
    if source == "pg19" or source.startswith("pg19:"):
        return pg19_books(seed, source.partition(":")[2] or PG19_SPLIT)
    return folder_books(source)
