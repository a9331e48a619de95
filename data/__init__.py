"""What the model reads: bAbI stories, BABILong samples, book text, packed rows, the batches of a
step.

    babi.py       bAbI qa1-qa5: a simulation of the original tasks, and a reader of the real files
    books.py      haystack text: synthetic prose, a folder of Project Gutenberg books, or PG19
                  (online)
    babilong.py   BABILong's recipe: a story's facts hidden in order through book text, one question
    cwe.py        RULER's common-words extraction: a numbered list of words, its 10 most common
    sample_files.py  an evaluation's samples read back, every row checked: a folder in the
                  hub's layout (DIR/data/TASK/LEN.json) or BABILong on the hub (online)
    packing.py    samples (multi-turn or one question) packed into rows of --ctx tokens, their
                  targets
    tokenizer.py  GPT-2's BPE, offline, and the token ids the data and the model agree on
    batches.py    a step's batch as a pure function of (seed, split, step, micro-step), built ahead

Arrows run down this list's dependencies only: babi and tokenizer import nothing of the project,
books nothing but the standard library, packing babi and tokenizer (and model.py's IGNORE), babilong
those and books, cwe packing and tokenizer, sample_files babilong and books, batches all of them
(and model.target_positions).
"""
