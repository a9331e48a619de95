r"""bAbI tasks qa1–qa5 (Weston et al. 2015), simulated: the stories BABILong hides in long haystack
text.

A story is a list of turns; a turn tells a few facts, then asks one question that all facts so far
answer: `Turn = (facts, question, answer)`. The generator copies bAbI's cast, rooms, objects, verbs,
sentence templates and question forms, and its rhythm, measured on the train files of
../shared/data/babi/en (see `python -m data.babi --coverage DIR`). Two ideas to hold:

1. Two worlds in one. The *true* world places every person and object in a room from the start, and
   only true-world actions happen (grab what is in your room, give to someone in your room). The
   *told* world is what the sentences so far reveal; questions are asked only about the told world,
   so every answer follows from the text (a held object moves with its holder). Like bAbI, the text
   tells events two at a time and may ask after a pair about what that pair told; right after a
   question, about anything the last `WINDOW` facts told (bAbI often asks the same question again at
   once).
2. bAbI's conventions make every answer unique: "Where was the milk before the kitchen?" asks about
   the milk's latest arrival in the kitchen (its current room 79 % of the time, an earlier one
   21 %); qa5 asks about the latest gift, and "Who received the milk?" means its latest receiver;
   in qa4, "north of" means "the room directly north of".

`read_babi` parses the real files into the same turns, and `shape` / `coverage` compare the sentence
shapes ("{person} moved to the {place}.") of real and generated stories. All randomness comes from
the `random.Random` passed in.
"""

import argparse
import random
import re
import sys
from pathlib import Path

TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
PEOPLE = ("Mary", "John", "Daniel", "Sandra")  # the cast of bAbI qa1–qa3
GIVERS = ("Bill", "Fred", "Jeff", "Mary")  # the cast of bAbI qa5
PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")  # bAbI's six rooms
OBJECTS = ("football", "apple", "milk")  # bAbI's three portable objects
# bAbI's five ways to say "moved to"
MOVE = ("moved", "went", "journeyed", "travelled", "went back")
GRAB = ("got", "grabbed", "took", "picked up")  # bAbI's four verbs for picking an object up
DROP = ("dropped", "discarded", "left", "put down")  # ... for putting it down
GIVE = ("gave", "handed", "passed")  # ... for giving it to someone (qa5)
# qa4's four directions
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}

# questions per story: every story of the files
QUESTIONS = {"qa1": 5, "qa2": 5, "qa3": 5, "qa4": 1, "qa5": 5}
PAIR = 2  # facts come two at a time: every gap between questions in the files is even
# the newest fact that supports a question is among the last 5 (all 8,000 qa1/2/3/5 questions)
WINDOW = 5
GAPS = {  # facts before the first question, and between later ones: (min, max) over the train files
    "qa1": ((2, 2), (2, 2)),
    "qa2": ((2, 46), (2, 16)),
    "qa3": ((4, 144), (2, 122)),
    "qa4": ((2, 2), (2, 2)),  # qa4 has one question per story: the second range is never used
    "qa5": ((2, 94), (2, 40)),
}
# facts in a whole story: (min, max) over the train files
STORY_FACTS = {"qa1": (10, 10), "qa2": (12, 56), "qa3": (20, 224), "qa4": (2, 2), "qa5": (10, 102)}
# chance to ask about what the last pair told, when it told something askable (measured on the
# files: qa2 60 %, qa3 13-17 %; qa1 and qa5 always ask)
ASK = {"qa1": 1.0, "qa2": 0.6, "qa3": 0.13, "qa5": 1.0}
# the same right after a question, about anything the last WINDOW facts told: bAbI often asks again
# at once (most later gaps are 2 facts)
ASK_AGAIN = {"qa1": 1.0, "qa2": 0.73, "qa3": 0.57, "qa5": 1.0}
# relative weights of the kinds of event; fitted to each file's share of moves, grabs, drops, gives
ACTIONS = {
    "qa1": {"move": 1},
    "qa2": {"move": 4, "grab": 2, "drop": 2},  # train file: 64 % moves, 20 % grabs, 16 % drops
    "qa3": {"move": 5, "grab": 3, "drop": 2},  # 64 %, 19 %, 18 %
    "qa5": {"move": 3, "grab": 2, "drop": 1, "give": 3},  # 54 %, 17 %, 11 %, 17 % gives
}
# share of "got the milk there." among grabs, per file
GRAB_THERE = {"qa2": 1.0, "qa3": 0.19, "qa5": 1.0}
DROP_THERE = 0.2  # share of "dropped the milk there." among drops (qa2 21 %, qa3 22 %, qa5 17 %)
# qa4: chance a fact names the middle room first ("The hallway is west of ..."): 35 %
MIDDLE_SUBJECT = 0.35
# qa5 asks "What did Bill give to Fred?" twice as often as each of its other four forms
WHAT_WEIGHT = 2
# qa3 "before the Y?": weights of asking about the room the object entered d moves ago (0 = its
# current room); fitted so that the generated questions name it as often as the train file's 1,000
# do: 79.3, 16.2, 3.2, 1.1, 0.2 % (an earlier room 21 %)
QA3_DEPTH = (793, 206, 73, 41, 12)

Turn = tuple[list[str], str, str]  # (facts told in this turn, question, one-word answer)


# ----------------------------------------------------------------------- qa1, qa2, qa3, qa5: people
class World:
    """People walking between rooms, carrying, dropping and giving objects; the text tells the
    story."""

    def __init__(self, task: str, rng: random.Random):
        self.task, self.cast = task, GIVERS if task == "qa5" else PEOPLE
        self.room = {p: rng.choice(PLACES) for p in self.cast}  # true room of each person
        self.spot = {o: rng.choice(PLACES) for o in OBJECTS}  # true room of each object
        self.holder = {}  # object -> person carrying it
        self.n = 0  # facts told so far
        self.moved = {}  # person -> number of the fact that told their room (their last move)
        self.seen = {}  # object -> number of the last fact that told or implied its room
        self.trail = {o: [] for o in OBJECTS}  # rooms the text says each object was in, in order
        self.gifts = []  # (giver, object, receiver, fact number), in story order

    def act(self, rng: random.Random) -> str:
        """One random event that the true world allows, as the sentence that tells it."""
        self.n += 1
        kinds = ACTIONS[self.task]
        # like bAbI: draw a kind of event, again if nothing of that kind is possible now
        while True:
            kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
            if options := self._options(kind):
                return getattr(self, kind)(rng, *rng.choice(options))

    def _options(self, kind: str) -> list[tuple]:
        if kind == "move":
            return [(p,) for p in self.cast]
        if kind == "grab":  # a free object in p's room
            return [(p, o) for p in self.cast for o in OBJECTS
                    if o not in self.holder and self.spot[o] == self.room[p]]
        if kind == "drop":
            return [(p, o) for o, p in self.holder.items()]
        # give: to someone else in the giver's room
        return [(p, o, q) for o, p in self.holder.items()
                for q in self.cast if q != p and self.room[q] == self.room[p]]

    def _see(self, obj: str) -> None:
        """The text now tells where obj is (someone whose room it told holds it or just put it
        down)."""
        self.seen[obj] = self.n
        if self.trail[obj][-1:] != [self.spot[obj]]:
            self.trail[obj].append(self.spot[obj])

    def _arrivals(self, obj: str) -> list[tuple[int, str]]:
        """(index in the trail, room) of each room's latest arrival; the first room has none."""
        return [(i, room) for room, i in {room: i for i, room in enumerate(self.trail[obj])
                                          if i > 0}.items()]

    def move(self, rng: random.Random, p: str) -> str:
        # bAbI never moves to the same room
        self.room[p] = rng.choice([r for r in PLACES if r != self.room[p]])
        self.moved[p] = self.n
        for o in [o for o, q in self.holder.items() if q == p]:
            self.spot[o] = self.room[p]
            self._see(o)
        return f"{p} {rng.choice(MOVE)} to the {self.room[p]}."

    def grab(self, rng: random.Random, p: str, o: str) -> str:
        self.holder[o] = p
        # else the text has not told p's room: what it says of o's room stays true
        if p in self.moved:
            self._see(o)
        there = " there" if rng.random() < GRAB_THERE[self.task] else ""
        return f"{p} {rng.choice(GRAB)} the {o}{there}."

    def drop(self, rng: random.Random, p: str, o: str) -> str:
        del self.holder[o]
        if p in self.moved:
            self._see(o)
        return f"{p} {rng.choice(DROP)} the {o}{' there' if rng.random() < DROP_THERE else ''}."

    def give(self, rng: random.Random, p: str, o: str, q: str) -> str:
        self.holder[o] = q
        self.gifts.append((p, o, q, self.n))
        return f"{p} {rng.choice(GIVE)} the {o} to {q}."

    def questions(self, window: int) -> list[tuple[str, str, int]]:
        """(question, answer, weight) of everything a fact among the last `window` told; [] if
        nothing."""
        old = self.n - window  # facts numbered above this are among the last `window`
        if self.task == "qa1":
            return [(f"Where is {p}?", self.room[p], 1) for p, k in self.moved.items() if k > old]
        if self.task == "qa2":
            return [(f"Where is the {o}?", self.spot[o], 1) for o, k in self.seen.items()
                    if k > old]
        # a room the object arrived in (latest arrival), and the room before it
        if self.task == "qa3":
            return [(f"Where was the {o} before the {room}?", self.trail[o][i - 1],
                     QA3_DEPTH[depth])
                    for o, k in self.seen.items() if k > old
                    for i, room in self._arrivals(o)
                    if (depth := len(self.trail[o]) - 1 - i) < len(QA3_DEPTH)]
        if not self.gifts or self.gifts[-1][3] <= old:  # qa5: only the latest gift is asked about
            return []
        p, o, q, _ = self.gifts[-1]
        return [(f"What did {p} give to {q}?", o, WHAT_WEIGHT), (f"Who gave the {o} to {q}?", p, 1),
                (f"Who gave the {o}?", p, 1), (f"Who did {p} give the {o} to?", q, 1),
                (f"Who received the {o}?", q, 1)]


def _people_story(task: str, rng: random.Random) -> list[Turn] | None:
    """A story of qa1/qa2/qa3/qa5, or None if it is longer or shorter than any story of the train
    file."""
    world, story, facts = World(task, rng), [], []
    while len(story) < QUESTIONS[task]:
        facts += [world.act(rng) for _ in range(PAIR)]
        if len(facts) > GAPS[task][1 if story else 0][1] or world.n > STORY_FACTS[task][1]:
            return None
        again = bool(story) and len(facts) == PAIR  # the first pair after a question
        asks = world.questions(WINDOW if again else PAIR)
        if asks and rng.random() < (ASK_AGAIN if again else ASK)[task]:
            question, answer, _ = rng.choices(asks, weights=[w for *_, w in asks])[0]
            story.append((facts, question, answer))
            facts = []
    return story if world.n >= STORY_FACTS[task][0] else None


# ---------------------------------------------------------------------- qa4: two-argument relations
def _relations_story(rng: random.Random) -> list[Turn]:
    """Three rooms in a straight line; two facts tie the middle room to each end; one question on
    one fact."""
    a, b, c = rng.sample(PLACES, 3)  # a is `d` of b, and b is `d` of c
    d = rng.choice(list(OPPOSITE))
    facts = []  # (first room, direction, second room): "The first is direction of the second."
    for x, y in rng.sample([(a, b), (b, c)], 2):  # either fact may come first
        middle_first = rng.random() < MIDDLE_SUBJECT
        facts.append((x, d, y) if (x == b) == middle_first else (y, OPPOSITE[d], x))
    sentences = [f"The {first} is {way} of the {second}." for first, way, second in facts]
    # bAbI asks about a fact's second room; the answer is its first
    answer, way, second = rng.choice(facts)
    question = rng.choice([f"What is {way} of the {second}?",
                           f"What is the {second} {OPPOSITE[way]} of?"])
    return [(sentences, question, answer)]


def make_story(task: str, rng: random.Random) -> list[Turn]:
    """A story of several turns; each adds facts, then asks one question the facts so far answer."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    if task == "qa4":
        return _relations_story(rng)
    # rare: keep story lengths within bAbI's range
    while (story := _people_story(task, rng)) is None:
        pass
    return story


# ----------------------------------------------------------------------------- the real files
def babi_file(folder: str | Path, task: str, split: str) -> Path:
    """The bAbI file of a task and split in folder, e.g. qa1_single-supporting-fact_train.txt."""
    found = sorted(Path(folder).glob(f"{task}_*_{split}.txt"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one {task}_*_{split}.txt in {folder}, "
                                f"found {len(found)}")
    return found[0]


def read_babi(path: str | Path) -> list[list[Turn]]:
    """Stories of a bAbI file as turns: (facts since the story's previous question, question,
    answer).

    A line is "N sentence" or "N question\tanswer\tsupporting fact numbers"; N = 1 starts a story.
    """
    stories, facts = [], []
    for line in Path(path).read_text().splitlines():
        number, text = line.split(" ", 1)
        if number == "1":
            stories.append([])
            facts = []
        if "\t" in text:
            question, answer, _ = text.split("\t")
            # bAbI leaves a space before the tab
            stories[-1].append((facts, question.strip(), answer))
            facts = []
        else:
            facts.append(text)
    return stories


# ----------------------------------------------------------------------------- sentence shapes
SLOTS = {**{w: "{person}" for w in PEOPLE + GIVERS}, **{w: "{place}" for w in PLACES},
         **{w: "{object}" for w in OBJECTS}}  # the words a shape leaves out


# every word of a fact
FACT_WORDS = {w for phrase in PEOPLE + GIVERS + PLACES + OBJECTS + MOVE + GRAB + DROP + GIVE
              + tuple(OPPOSITE)
              for w in phrase.split()} | {"the", "to", "there", "is", "of", "The"}
# the shortest facts: "Mary got the milk." (qa2/qa3), "Bill took the apple." (qa5)
FACT_MIN_WORDS = 4


def fact_sentences(text: str) -> list[str]:
    """The bAbI facts in a text, in order: runs of at least FACT_MIN_WORDS words of FACT_WORDS that
    start with a capital and end with a full stop. Haystack prose is rarely made of these words
    alone, so this finds the facts also where a book names a room or a person (and where a fact
    follows a sentence cut mid-way)."""
    first = "|".join(sorted(w for w in FACT_WORDS if w[0].isupper()))
    word = "|".join(sorted(FACT_WORDS))
    return re.findall(rf"\b(?:{first})(?: (?:{word})){{{FACT_MIN_WORDS - 1},}}\.", text)


def shape(sentence: str) -> str:
    """The sentence with names, rooms and objects replaced by slots: "{person} moved to the
    {place}."."""
    return re.sub(r"\w+", lambda m: SLOTS.get(m.group(), m.group()), sentence)


def _shapes(stories: list[list[Turn]]) -> set[str]:
    sentences = {s for story in stories for facts, question, _ in story for s in [*facts, question]}
    return {shape(s) for s in sentences}


def coverage(real: list[list[Turn]], generated: list[list[Turn]]) -> tuple[float, set[str]]:
    """(share of the real fact and question shapes that the generated stories produce, shapes real
    lacks)."""
    want, got = _shapes(real), _shapes(generated)
    return len(want & got) / len(want), got - want


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="bAbI qa1-qa5 generator: show stories or compare with real files")
    p.add_argument("--coverage", metavar="DIR",
                   help="compare shapes with DIR's qa*_train.txt files")
    p.add_argument("--stories", type=int, default=2000, help="stories generated per task")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    if args.coverage is None:  # show one short story per task
        for task in TASKS:
            print(f"--- {task}")
            for facts, question, answer in make_story(task, rng)[:2]:
                print(*facts, question, f"-> {answer}", sep="\n")
        return
    if not Path(args.coverage).is_dir():
        sys.exit(f"babi.py: error: {args.coverage} is not a folder")
    try:
        files = {task: babi_file(args.coverage, task, "train") for task in TASKS}
    except FileNotFoundError as error:
        sys.exit(f"babi.py: error: {error}")
    print(f"{'task':6}{'real shapes':>12}{'covered':>10}{'extra':>7}")
    for task, path in files.items():
        real = read_babi(path)
        share, extra = coverage(real, [make_story(task, rng) for _ in range(args.stories)])
        print(f"{task:6}{len(_shapes(real)):>12}{share:>10.1%}{len(extra):>7}")
        for s in sorted(extra):
            print(f"      extra: {s}")


if __name__ == "__main__":
    main()
