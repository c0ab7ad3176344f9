"""SpellingBee and SimpleSpelling: synthetic tasks that teach a small model to spell words and count letters.

Small models see tokens, not letters, so "how many r in strawberry" is hard for them. SimpleSpelling asks for a
word's spelling ("Spell the word: cat" -> "cat:c,a,t"). SpellingBee asks, in several languages and phrasings, how
many times a letter occurs in a word, and answers in a form a 4-layer model can follow. It asks the calculator:

    Counting 'r' in 'strawberry'. Python says:<|python_start|> 'strawberry'.count('r')<|python_end|>
    <|output_start|>3<|output_end|>
    #### 3

(the output follows the call on the same line). The call's leading space makes the word inside it the same tokens
as the word just before it (without it, "'s" of "'strawberry'" is a contraction to the tokenizer's split pattern),
so the model copies it token for token; the answer then copies the tool's output, the only number in reach.

When the call gets no output (the calculator switched off, or refusing), the model counts on its own: it spells the
word, writes the asked letter after each of its letters, and the count so far after each pair that matches, so that
every step of the count compares two tokens side by side (the asked letter only in the question, far back, is
what a 4-layer model fails to compare with: dev/BENCHMARKS.md), then answers with the last count:

    Counting 'r' in 'strawberry'. Python says:<|python_start|> 'strawberry'.count('r')<|python_end|>
    strawberry:s/r,t/r,r/r=1,a/r,w/r,b/r,e/r,r/r=2,r/r=3,y/r
    That makes 3.
    #### 3

A share of the training answers (NO_TOOL_OUTPUT) are of this second kind: the tool's output is never a training
target, so these are what teach the model to go on after a call that was not run (`chat_eval --calculator=off`).
Both kinds end in "#### N", scored like GSM8K.

Words: dwyl/english-words words_alpha.txt (~370K lowercase words), from words/words_alpha.zip under
NANOCHAT_DATA_DIR or downloaded once into the base dir. Example i of a split is drawn from its own
random.Random seeded with the string "<task>/<split>/<i>" (deterministic across runs and machines; string seeds
avoid the Random(1) == Random(-1) collision of signed integer seeds), so the splits draw disjoint seeds. Training
uses split="train", tuning split="val", reported evaluation split="test".
"""

import functools
import random
import string

from nanochat.common import download_file_with_lock
from tasks.common import Task, local_data_dir, local_path, read_zipped_lines
from tasks.gsm8k import extract_answer, number_key

WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
SPLITS = ("train", "val", "test")
LETTER_FROM_WORD = 0.9  # otherwise any letter of the alphabet, so "0" is a possible answer too
NO_TOOL_OUTPUT = 0.5  # share of answers whose calculator call gets no output: the model counts on its own

# How the question is asked: {letter} and {word} get filled in (quoted or not); several languages, as users do
TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many times does the letter {letter} appear in {word}",
    "Count the letter {letter} in the word {word}",
    "In the word {word}, how many times do you see {letter}",
    "How often does {letter} occur in {word}",
    "What is the number of {letter}'s in {word}",
    "Tell me how many {letter} there are in {word}",
    "¿Cuántas veces aparece la letra {letter} en la palabra {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans le mot {word}",
    "Wie oft kommt der Buchstabe {letter} im Wort {word} vor",
    "单词{word}中有几个字母{letter}",
    "{word}という単語に{letter}は何個ありますか",
    "{word}라는 단어에 글자 {letter}가 몇 개 있나요",
]


@functools.lru_cache(maxsize=2)
def _read_words(path):
    if path.endswith(".zip"):
        lines = read_zipped_lines(path)
    else:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    return tuple(word.strip() for word in lines if word.strip())


def load_words():
    """The word list: the local zip when NANOCHAT_DATA_DIR is set, else the downloaded text file."""
    if local_data_dir() is not None:
        path = local_path("words", "words_alpha.zip")
    else:
        path = download_file_with_lock(WORDS_URL, "words_alpha.txt")
    return _read_words(path)


def spell(word):
    """SimpleSpelling's answer: "cat:c,a,t"."""
    return f"{word}:{','.join(word)}"


def spell_counting(word, letter):
    """The word spelled out, each letter paired with the asked one, with a running count after each match:
    "berry:b/r,e/r,r/r=1,r/r=2,y/r"."""
    letters, hits = [], 0
    for character in word:
        hits += character == letter
        letters.append(f"{character}/{letter}={hits}" if character == letter else f"{character}/{letter}")
    return f"{word}:{','.join(letters)}"


class _SpellingTask(Task):
    eval_type = "generative"

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"{type(self).__name__} split must be one of {SPLITS}, got {split!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{type(self).__name__} size must be an int >= 1, got {size!r}")
        self.size, self.split = size, split
        self.words = load_words()

    def num_examples(self):
        return self.size

    def rng(self, index):
        return random.Random(f"{type(self).__name__}/{self.split}/{index}")


class SimpleSpelling(_SpellingTask):
    def get_example(self, index):
        word = self.rng(index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": spell(word)}]}

    def reference_answer(self, conversation):
        return conversation["messages"][-1]["content"]

    def evaluate(self, conversation, assistant_response):
        return assistant_response.strip() == self.reference_answer(conversation)


class SpellingBee(_SpellingTask):
    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < LETTER_FROM_WORD else rng.choice(string.ascii_lowercase)
        count = word.count(letter)

        quote = rng.choice(["", "'", '"'])
        question = rng.choice(TEMPLATES).format(letter=f"{quote}{letter}{quote}", word=f"{quote}{word}{quote}")
        if rng.random() < 0.3:
            question = question[0].lower() + question[1:]  # people often skip the capital
        if question.startswith("¿") or rng.random() < 0.7:
            question += "?"

        parts = [{"type": "text", "text": f"Counting '{letter}' in '{word}'. Python says:"},
                 {"type": "python", "text": f" '{word}'.count('{letter}')"}]
        if rng.random() < NO_TOOL_OUTPUT:  # drawn last: the words, letters and questions are those drawn without it
            own_count = f"\n{spell_counting(word, letter)}\nThat makes {count}.\n#### {count}"
            parts.append({"type": "text", "text": own_count})
        else:
            parts += [{"type": "python_output", "text": str(count)}, {"type": "text", "text": f"\n#### {count}"}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "word": word, "letter": letter}

    def reference_answer(self, conversation):
        return number_key(extract_answer(conversation["messages"][-1]["content"][-1]["text"]))

    def evaluate(self, conversation, assistant_response):
        answer = extract_answer(assistant_response)
        return answer is not None and number_key(answer) == self.reference_answer(conversation)
