"""SmolTalk: general chat conversations (HuggingFaceTB/smol-smoltalk, ~460K train / ~24K test), for training.

Hub: HuggingFaceTB/smol-smoltalk, splits train / test, rows {"messages": [...]} with an optional system message.
Local: smoltalk/<split>.jsonl under NANOCHAT_DATA_DIR in the same format, or any such file given as filepath (the
CPU demo uses data/tasks/chat/chatterbot_corpus_english.jsonl as a small stand-in), which is shuffled and split:
its first 5% are test, the rest train.
"""

from tasks.common import Task, load_dataset_rows, local_path, shuffled
from tasks.customjson import check_messages, read_conversations

SPLITS = ("train", "test")


class SmolTalk(Task):
    def __init__(self, split, filepath=None, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"SmolTalk split must be one of {SPLITS}, got {split!r}")
        self.split = split
        if filepath is not None:
            rows = shuffled(read_conversations(filepath))
            num_test = max(1, len(rows) // 20)
            self.rows = rows[:num_test] if split == "test" else rows[num_test:]
        else:
            self.rows = load_dataset_rows("HuggingFaceTB/smol-smoltalk", None, split,
                                          lambda: read_conversations(local_path("smoltalk", f"{split}.jsonl")))

    def get_example(self, index):
        messages = self.rows[index]["messages"]
        check_messages(messages, f"SmolTalk {self.split} example {index}")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
