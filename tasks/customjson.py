"""CustomJSON: conversations from a JSONL file of your own (e.g. the identity conversations that teach the model
its name and maker), for training only.

One conversation per line: either a JSON array of messages or an object {"messages": [...]} (the SmolTalk format),
messages alternating user / assistant (an optional system message first). The file is read whole and kept in file
order (mixtures shuffle). Never evaluated.
"""

import json
import os

from nanochat.common import MissingFileError, UserError
from nanochat.tokenizer import chat_messages
from tasks.common import Task

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"


def check_messages(messages, where):
    """Raise UserError naming `where` unless messages are a conversation the tokenizer renders (an optional system
    message, then user and assistant alternating, str content) with at least one reply."""
    try:
        if len(chat_messages({"messages": messages})) < 2:
            raise ValueError("a conversation needs at least a user and an assistant message")
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def read_conversations(filepath):
    """The conversations of a JSONL file, each {"messages": [...]} (other fields dropped), checked."""
    if not os.path.exists(filepath):
        raise MissingFileError(f"conversation file {filepath} not found; the identity conversations can be fetched "
                               f"with: curl -o {filepath} {IDENTITY_URL}")
    conversations = []
    with open(filepath, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{filepath}:{line_number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e})") from e
            messages = item.get("messages") if isinstance(item, dict) else item
            check_messages(messages, where)
            conversations.append({"messages": messages})
    return conversations


class CustomJSON(Task):
    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.filepath = filepath
        self.conversations = read_conversations(filepath)

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]
